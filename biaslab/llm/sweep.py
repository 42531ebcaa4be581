"""The paper's Fig. 2 on a real model: bias and variance of each configuration against the sequence KL and the
response length, each point averaged over several perturbation seeds with the seed-to-seed spread.

Each point (target KL K, length cap L, seed s) is one full statistics pass (``run.run_llm``) with the perturbation
rescaled to KL(pi_theta || pi_ref) = K (reverse, sequence level, pilot estimate; the measured KL is reported).
Per configuration the point holds the mean over seeds of the relative bias along the reference (with the mean of
the Fieller bounds, and the spread: standard deviation over seeds), of |b|/|r| and of the relative variance, and
how many seeds' tests said ``biased``. Written atomically as ``llm_sweep.{png,csv,json}``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path

from .._version import __version__
from ..core.io import atomic_write_figure, csv_text
from ..figures.plotting import png_bytes
from . import distributed as D
from .run import LLMOptions, run_llm

SWEEP_FIELDS = ["target_kl", "max_new_tokens", "sequence_kl", "n_seeds", "config", "label", "rel_bias_mean",
                "rel_bias_spread", "ci_low_mean", "ci_high_mean", "rel_bias_norm_mean", "rel_variance_mean",
                "biased_seeds"]


def _spread(xs: list[float]) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return statistics.fmean(xs) if xs else math.nan


def run_sweep(make_opts: Callable[..., LLMOptions], kls: list[float | None], lengths: list[int], n_seeds: int,
              out: str | None) -> dict | None:
    """One pass per (KL, length, seed); returns the sweep report on rank 0 (None elsewhere), written to ``out``."""
    base = make_opts()
    points = []
    for kl in kls:
        for length in lengths:
            reports = []
            for s in range(n_seeds):
                opts = make_opts(target_kl=kl, max_new_tokens=length, seed=base.seed + s, truncations=())
                opts.resolve()
                used_length = int(opts.max_new_tokens)
                reports.append(run_llm(opts))
            if D.world()[0] != 0:
                continue
            configs = []
            for i, row in enumerate(reports[0]["configs"]):
                rows = [r["configs"][i] for r in reports]
                configs.append({
                    "config": row["config"],
                    "label": row["label"],
                    "rel_bias_mean": _mean([r["rel_bias_along_reference"] for r in rows]),
                    "rel_bias_spread": _spread([r["rel_bias_along_reference"] for r in rows]),
                    "ci_low_mean": _mean([r["ci_low"] for r in rows]),
                    "ci_high_mean": _mean([r["ci_high"] for r in rows]),
                    "rel_bias_norm_mean": _mean([r["rel_bias_norm"] for r in rows]),
                    "rel_variance_mean": _mean([r["rel_variance"] for r in rows]),
                    "biased_seeds": sum(bool(r["biased"]) for r in rows),
                    "per_seed": [{k: r[k] for k in ("rel_bias_along_reference", "ci_low", "ci_high", "verdict")}
                                 for r in rows],
                })
            points.append({
                "target_kl": kl,
                "max_new_tokens": used_length,
                "seeds": [base.seed + s for s in range(n_seeds)],
                "n_seeds": n_seeds,
                "sequence_kl": _mean([r["sequence_kl"]["mean"] for r in reports]),
                "sequence_kl_spread": _spread([r["sequence_kl"]["mean"] for r in reports]),
                "mean_response_tokens": _mean([r["mean_response_tokens"] for r in reports]),
                "numeric_floor_nats": max((r["numeric_floor"] or {}).get("nats", 0.0) for r in reports),
                "configs": configs,
            })
    if D.world()[0] != 0:
        return None
    report = {
        "kind": "sweep" if len(points) > 1 else f"{n_seeds} perturbation seeds",
        "biaslab_version": __version__,
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(base).items() if k != "extra"},
        "sweep": {"target_kls": kls, "lengths": lengths, "n_seeds": n_seeds},
        "points": points,
    }
    if out:
        report["written"] = [str(p) for p in write_sweep(report, out)]
    return report


def _png(report: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    points = report["points"]
    n_seeds = report["sweep"]["n_seeds"]
    lengths = sorted({p["max_new_tokens"] for p in points})
    # one panel row per length; a sweep with one point per length (the truncation sweep: KL and L change together)
    # is one row of curves, each point marked with its length
    joint = len(lengths) > 1 and all(sum(p["max_new_tokens"] == L for p in points) == 1 for L in lengths)
    rows = [None] if joint else lengths
    fig = Figure(figsize=(12, 4.2 * len(rows)))
    axes = fig.subplots(len(rows), 2, squeeze=False)
    labels = [c["label"] for c in points[0]["configs"]]
    for row, length in enumerate(rows):
        pts = sorted((p for p in points if length is None or p["max_new_tokens"] == length),
                     key=lambda p: p["sequence_kl"])
        ax_b, ax_v = axes[row]
        x = [p["sequence_kl"] for p in pts]
        for i, label in enumerate(labels):
            cs = [p["configs"][i] for p in pts]
            y = [c["rel_bias_mean"] for c in cs]
            if n_seeds > 1:  # bars: the seed-to-seed spread
                e = [c["rel_bias_spread"] for c in cs]
            else:  # bars: the calibrated interval (clipped to the axis where Fieller's is unbounded)
                e = [[max(v - max(c["ci_low_mean"], -2.5), 0.0) for v, c in zip(y, cs)],
                     [max(min(c["ci_high_mean"], 2.5) - v, 0.0) for v, c in zip(y, cs)]]
            ax_b.errorbar(x, y, yerr=e, marker="o", capsize=3, label=label, alpha=0.85)
            ax_v.plot(x, [max(c["rel_variance_mean"], 1e-300) for c in cs], marker="o", label=label)
        if length is None:
            for p in pts:
                ax_b.annotate(f"L={p['max_new_tokens']}", (p["sequence_kl"], 1.85), ha="center", fontsize=8)
        what = "L = " + ("cut after L tokens" if length is None else str(length))
        alpha = report["options"].get("alpha")
        bars = "seed spread" if n_seeds > 1 else f"{100 * (1 - alpha):g}% CI" if alpha else "CI"
        ax_b.axhline(0, color="0.2", lw=0.8)
        ax_b.set_xscale("log")
        ax_b.set_ylim(-2, 2)
        ax_b.set_xlabel("sequence KL(pi || pi_ref), nats (measured)")
        ax_b.set_ylabel(f"relative bias along grad KL, {what}\n(mean over seeds, bars: {bars})")
        ax_v.set_xscale("log")
        ax_v.set_yscale("log")
        ax_v.set_xlabel("sequence KL(pi || pi_ref), nats (measured)")
        ax_v.set_ylabel("per-sample variance / ||grad KL||^2")
    axes[0][1].legend(fontsize=7, loc="best")
    opts = report["options"]
    fig.suptitle(f"{opts['model']}: {opts['samples']} samples per point, {report['sweep']['n_seeds']} perturbation "
                 f"seed(s), params {opts['params']}", fontsize=10)
    fig.tight_layout()
    return png_bytes(fig)


def write_sweep(report: dict, out: str | Path, stem: str = "llm_sweep") -> list[Path]:
    """``<out>/<stem>.png``, ``.csv`` (one row per point and configuration) and ``.json`` (config, seeds, version)."""
    rows = [{**{k: p[k] for k in ("target_kl", "max_new_tokens", "sequence_kl", "n_seeds")}, **c}
            for p in report["points"] for c in p["configs"]]
    return atomic_write_figure(out, stem, _png(report), csv_text(rows, SWEEP_FIELDS), report)


def run_seeds(make_opts: Callable[..., LLMOptions], n_seeds: int) -> dict | None:
    """Several perturbation seeds at one point: ``run_sweep`` with a single KL and length."""
    base = make_opts()
    base.resolve()
    return run_sweep(make_opts, [base.target_kl], [int(base.max_new_tokens)], n_seeds, None)


__all__ = ["SWEEP_FIELDS", "run_seeds", "run_sweep", "write_sweep"]
