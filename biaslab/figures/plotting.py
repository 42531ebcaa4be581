"""Matplotlib drawing shared by ``biaslab figures`` and the notebooks (no pyplot state: works under Agg).

Relative biases of unbiased configurations are float64 round-off (~1e-15), printed as 0 in the CSVs; on a log axis
they are drawn at ``BIAS_FLOOR`` inside a shaded band labelled as exact zeros, so that a reader sees "unbiased",
not "bias 1e-16".
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Sequence

BIAS_FLOOR = 1e-12

#: Plot style per configuration label of ``biaslab.workflows.sweeps.FIG_CONFIGS``.
STYLES: dict[str, dict] = {
    "k1 in reward": dict(color="tab:blue", marker="o", ms=9, mfc="none", ls="-"),
    "k3 in reward": dict(color="tab:red", marker="s", ms=6, ls="-"),
    "k1 in loss": dict(color="tab:gray", marker="x", ms=7, ls="-"),
    "k2 in loss": dict(color="tab:green", marker="^", ms=6, ls="-"),
    "k3 in loss": dict(color="tab:orange", marker="v", ms=6, ls="-"),
    "k3 in reward+loss": dict(color="tab:purple", marker="D", ms=6, mfc="none", ls="--"),
    "k2 in loss (seq)": dict(color="tab:olive", marker="*", ms=5, ls=":"),
    "k3 in loss (seq)": dict(color="tab:brown", marker=">", ms=6, ls="--"),
}


def style(label: str) -> dict:
    return STYLES.get(label, dict(marker="o", ls="-"))


def plot_bias_variance(ax_bias, ax_var, rows: Sequence[dict], x: str, xlabel: str, log_x: bool = False) -> None:
    """Relative bias (log y, exact zeros at the floor) and per-sample variance (log y) of each configuration
    against the field ``x`` of ``rows`` (rows as from ``biaslab.workflows.sweeps``, numbers as floats)."""
    for label in dict.fromkeys(r["config"] for r in rows):  # configurations in first-seen order
        rs = sorted((r for r in rows if r["config"] == label), key=lambda r: float(r[x]))
        xs = [float(r[x]) for r in rs]
        st = style(label)
        ax_bias.plot(xs, [max(float(r["rel_bias"]), BIAS_FLOOR) for r in rs], label=label, **st)
        ax_var.plot(xs, [float(r["variance"]) for r in rs], label=label, **st)
    ax_bias.set_yscale("log")
    # a grey band at the bottom marks where exact zeros (up to round-off) are drawn
    ax_bias.axhspan(BIAS_FLOOR / 10, BIAS_FLOOR * 3, color="0.9", zorder=0)
    ax_bias.text(0.02, BIAS_FLOOR * 4, "exactly unbiased (|bias| < 1e-12, float64 round-off)",
                 transform=ax_bias.get_yaxis_transform(), fontsize=7, color="0.35", va="bottom")
    ax_bias.set_ylim(BIAS_FLOOR / 10, max(ax_bias.get_ylim()[1], 3.0))  # keep the range up to O(1) biases in view
    ax_bias.set_ylabel(r"relative bias $\|E[g]-\nabla KL\| \,/\, \|\nabla KL\|$")
    ax_var.set_yscale("log")
    ax_var.set_ylabel(r"per-sample variance tr Cov$[g]$")
    for ax in (ax_bias, ax_var):
        ax.set_xlabel(xlabel)
        if log_x:
            ax.set_xscale("log")
        ax.grid(True, which="major", alpha=0.3)


def legend_below(fig, ax) -> None:
    """One legend for the whole figure, under the axes."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, frameon=False, fontsize=9)


def png_bytes(fig) -> bytes:
    """``fig`` rendered to PNG bytes without timestamps or versions in the metadata (identical from run to run)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None}, bbox_inches="tight")
    return buf.getvalue()


def direction_groups(rows: Sequence[dict]) -> tuple[list[tuple[float, float, list[str], str]], list[str]]:
    """Configurations grouped by their point (cos_reverse, cos_forward), numbered from the top right, and the
    configurations whose E[g] is zero (no direction). Each group: (x, y, labels, matched direction)."""
    groups: dict[tuple[float, float], list[dict]] = {}
    zero: list[str] = []
    for r in rows:
        if r.get("kind", "config") != "config":
            continue
        x, y = float(r["cos_reverse"]), float(r["cos_forward"])
        if not (math.isfinite(x) and math.isfinite(y)):
            zero.append(r["config"])
            continue
        groups.setdefault((round(x, 6), round(y, 6)), []).append(r)
    out = []
    for (x, y), rs in sorted(groups.items(), key=lambda kv: (-kv[0][0] - kv[0][1], -kv[0][0])):
        out.append((x, y, [r["config"] for r in rs], str(rs[0].get("matches", ""))))
    return out, zero


def _scatter_directions(
    ax, rows: Sequence[dict], numbered: Sequence[tuple[int, float, float]], ms: float, span: float = 2.0
) -> None:
    """Stars for the named directions, numbered circles for the configurations; a number whose point lies within
    3% of ``span`` of an earlier one is moved aside with a leader line so that both stay readable."""
    for r in rows:
        if r.get("kind") == "direction":
            x, y = float(r["cos_reverse"]), float(r["cos_forward"])
            ax.plot([x], [y], marker="*", ms=ms + 8, color="gold", mec="k", mew=0.6, zorder=1, ls="none")
    placed: list[tuple[float, float]] = []
    for i, x, y in numbered:
        ax.plot([x], [y], marker="o", ms=ms, color="tab:blue", alpha=0.35, zorder=2, ls="none")
        crowded = sum(math.hypot(x - px, y - py) < 0.03 * span for px, py in placed)
        if crowded:
            ax.annotate(str(i), (x, y), xytext=(-14 * crowded, -16 * crowded), textcoords="offset points", ha="center",
                        va="center", fontsize=7, weight="bold", zorder=3,
                        arrowprops=dict(arrowstyle="-", color="0.4", lw=0.6))
        else:
            ax.annotate(str(i), (x, y), ha="center", va="center", fontsize=7, weight="bold", zorder=3)
        placed.append((x, y))


def plot_directions(ax, rows: Sequence[dict], zoom_ax=None, text_ax=None, zoom_min: float = 0.7) -> None:
    """Scatter each configuration's E[g] at (cos with grad reverse KL, cos with grad forward KL).

    Configurations landing on the same point share one numbered marker (listed in ``text_ax`` with the direction
    their E[g] equals); the named directions of ``ExactEngine.truths`` are gold stars. ``zoom_ax`` enlarges the
    points where both cosines exceed ``zoom_min``, where the interesting configurations crowd.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    groups, zero = direction_groups(rows)
    numbered = [(i, g[0], g[1]) for i, g in enumerate(groups, start=1)]
    xs_all = [x for _, x, _ in numbered] or [0.0, 1.0]
    _scatter_directions(ax, rows, numbered, 13, span=max(xs_all) - min(xs_all) + 0.2)
    xlabel = r"cos(E[g], $\nabla$KL($\pi\|\pi_{ref}$))  (reverse KL: the objective)"
    ylabel = r"cos(E[g], $\nabla$KL($\pi_{ref}\|\pi$))  (forward KL)"
    for a in (ax, zoom_ax):
        if a is None:
            continue
        a.set_xlabel(xlabel)
        a.set_ylabel(ylabel)
        a.grid(True, alpha=0.3)
    ax.margins(0.1)
    handles = [
        Line2D([], [], marker="o", ms=10, color="tab:blue", alpha=0.35, ls="none", label="configuration(s), numbered"),
        Line2D([], [], marker="*", ms=14, color="gold", mec="k", ls="none", label="a named gradient direction"),
    ]
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    if zoom_ax is not None:
        inside = [(i, x, y) for i, x, y in numbered if x >= zoom_min and y >= zoom_min]
        pts = [(x, y) for _, x, y in inside] + [
            (float(r["cos_reverse"]), float(r["cos_forward"])) for r in rows if r.get("kind") == "direction"
        ]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        lo_x, hi_x = _padded(min(xs), max(xs))
        lo_y, hi_y = _padded(min(ys), max(ys))
        _scatter_directions(zoom_ax, rows, inside, 15, span=max(hi_x - lo_x, hi_y - lo_y))
        zoom_ax.set_xlim(lo_x, hi_x)
        zoom_ax.set_ylim(lo_y, hi_y)
        zoom_ax.set_title("zoom on the dashed box", fontsize=9)
        ax.add_patch(Rectangle((lo_x, lo_y), hi_x - lo_x, hi_y - lo_y, fill=False, ls="--", ec="0.4"))
    if text_ax is not None:
        lines = []
        for i, (_x, _y, labels, matched) in enumerate(groups, start=1):
            eq = f"   [E[g] = {matched}]" if matched not in ("", "none") else ""
            lines.append(f"{i}: " + ", ".join(labels) + eq)
        if zero:
            lines.append("E[g] = 0 (no direction, not drawn): " + ", ".join(zero))
        text_ax.axis("off")
        text = "\n".join(textwrap.fill(line, 110, subsequent_indent="   ") for line in lines)
        text_ax.text(0, 1, text, va="top", ha="left", fontsize=8, family="monospace", transform=text_ax.transAxes)


def _padded(lo: float, hi: float) -> tuple[float, float]:
    pad = max(0.1 * (hi - lo), 0.01)
    return lo - pad, hi + pad



DIRECTION_LABELS = {
    "reverse_kl": "reverse KL\n(the objective)",
    "forward_kl": "forward KL",
    "forward_kl_token": "forward KL\ntoken level",
    "reverse_kl_token": "reverse KL\ntoken level",
    "expected_value": "grad E[K]\n(its own value)",
}


def plot_direction_matrix(ax, rows: Sequence[dict], columns: Sequence[str], row_labels: bool = True) -> None:
    """Configurations (rows) x named directions (columns): the cosine of each configuration's E[g] with each
    direction, printed in its cell and coloured from -1 (blue) to +1 (red). A gold box marks a direction that E[g]
    equals exactly (the ``matches`` field, ';'-separated); a configuration whose E[g] is exactly zero is greyed out
    and says so. ``rows`` as in ``biaslab.figures.DIRECTION_FIELDS`` (fields ``config``, ``matches``,
    ``cos_<direction>``)."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    values = np.array([[float(r[f"cos_{c}"]) for c in columns] for r in rows], dtype=float)  # (configs, dirs)
    shown = np.ma.masked_invalid(values)
    cmap = colormaps["RdBu_r"].with_extremes(bad="0.85")
    ax.imshow(shown, cmap=cmap, vmin=-1, vmax=1, aspect="auto")
    for i, r in enumerate(rows):
        matched = set(str(r.get("matches") or "").split(";"))
        if "zero" in matched or not np.isfinite(values[i]).any():
            ax.text((len(columns) - 1) / 2, i, "E[g] = 0 exactly: no direction", ha="center", va="center", fontsize=8)
            continue
        for j, c in enumerate(columns):
            v = values[i, j]
            exact = c in matched
            if exact:
                text = "= 1" if abs(v - 1) < 1e-9 else f"= ({v + 0.0:.3f})"
            else:  # near 1, the distance to 1: a close but inexact direction never reads 1.000
                text = f"1 - {1 - v:.0e}" if v > 0.9995 else f"{v + 0.0:.3f}"
            color = "white" if abs(v) > 0.6 else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color, weight="bold" if exact else None)
            if exact:
                ax.add_patch(Rectangle((j - 0.45, i - 0.42), 0.9, 0.84, fill=False, ec="gold", lw=3))
    ax.set_xticks(range(len(columns)), [DIRECTION_LABELS.get(c, c) for c in columns], fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(rows)), [r["config"] for r in rows] if row_labels else [""] * len(rows), fontsize=8)
    ax.set_xticks(np.arange(-0.5, len(columns)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(rows)), minor=True)
    ax.grid(which="minor", color="white", lw=1.5)
    ax.tick_params(which="minor", length=0)

