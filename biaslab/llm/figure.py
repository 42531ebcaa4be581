"""The ``biaslab llm`` figure: per configuration, the relative bias along the reverse-KL reference with its
confidence interval, the cosines to the reverse / forward / token-level forward directions, and the per-sample
variance. Written atomically as PNG + CSV + JSON (options, seed, version) into one folder."""

from __future__ import annotations

from pathlib import Path

from ..core.io import atomic_write_figure, csv_text
from ..figures.plotting import png_bytes

FIELDS = ["config", "label", "n", "rel_bias_along_reference", "ci_low", "ci_high", "rel_bias_toward_forward_token",
          "toward_ci_low", "toward_ci_high", "rel_bias_norm", "rel_bias_norm_ci_low", "rel_bias_norm_ci_high",
          "p_value_raw", "p_value", "biased", "verdict", "detectable_rel_bias", "variance", "rel_variance",
          "cos_reverse", "cos_forward", "cos_forward_token", "test_method"]


def _png(report: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = report["configs"]
    labels = [r["label"] for r in rows]
    y = list(range(len(rows)))
    fig = Figure(figsize=(13, 0.45 * len(rows) + 2.2))
    ax_b, ax_c, ax_v = fig.subplots(1, 3, sharey=True, gridspec_kw={"width_ratios": [1.3, 1.2, 1.0]})
    along = [r["rel_bias_along_reference"] for r in rows]
    lim = 5.0  # unbounded Fieller intervals are drawn to the edge
    err = [[min(a - r["ci_low"], lim) for a, r in zip(along, rows)],
           [min(r["ci_high"] - a, lim) for a, r in zip(along, rows)]]
    colors = ["tab:red" if r["biased"] else "tab:blue" for r in rows]
    ax_b.errorbar(along, y, xerr=err, fmt="none", ecolor="0.4", capsize=3)
    ax_b.scatter(along, y, c=colors, zorder=3)
    ax_b.axvline(0, color="0.2", lw=0.8)
    ax_b.set_yticks(y, labels)
    ax_b.invert_yaxis()
    alpha = report["options"]["alpha"]
    ax_b.set_xlabel(f"relative bias along grad KL(pi||pi_ref), {100 * (1 - alpha):.0f}% Fieller CI\n"
                    "(red: biased, Holm family-wise)")
    for key, marker, name in (
        ("cos_reverse", "o", "reverse KL"),
        ("cos_forward", "s", "forward KL"),
        ("cos_forward_token", "^", "forward KL, token"),
    ):
        ax_c.scatter([r[key] for r in rows], y, marker=marker, label=name)
    ax_c.axvline(0, color="0.2", lw=0.8)
    ax_c.set_xlim(-1.05, 1.05)
    ax_c.set_xlabel("cosine of the mean gradient to")
    ax_c.legend(fontsize=7, loc="lower left")
    ax_v.barh(y, [max(r["rel_variance"], 1e-300) for r in rows], color="0.6")
    ax_v.set_xscale("log")
    ax_v.set_xlabel("per-sample variance / ||grad KL||^2")
    kl = report["sequence_kl"]
    fig.suptitle(
        f"{report['model']['name']}: {report['configs'][0]['n']} samples, params {report['parameters']['spec']} "
        f"({report['parameters']['count']} numbers), KL(pi||pi_ref) = {kl['mean']:.3g} +- {kl['se']:.2g}",
        fontsize=10,
    )
    fig.tight_layout()
    return png_bytes(fig)


def write_figure(report: dict, out: str | Path, stem: str = "llm") -> list[Path]:
    """``<out>/<stem>.png``, ``.csv`` (one row per configuration) and ``.json`` (the whole report)."""
    return atomic_write_figure(out, stem, _png(report), csv_text(report["configs"], FIELDS), report)


__all__ = ["FIELDS", "write_figure"]
