"""Fig. 2: exact relative bias ||E[g] - grad KL|| / ||grad KL|| and per-sample variance tr Cov[g] of each
configuration against the length T (``fig2_length``) and against KL(pi || pi_ref) (``fig2_kl``), tabular and neural
toys, from ``biaslab.workflows.sweeps``."""

from __future__ import annotations

from pathlib import Path

from .artifact import Artifact, new_figure
from .plotting import BIAS_FLOOR, legend_below, plot_bias_variance
from .registry import figure

FIG2_LENGTH = {  # model -> (V, lengths, kl_scale); quick sizes second
    "tabular": ((3, list(range(1, 11)), 0.5), (3, [1, 2, 3, 4], 0.5)),
    "neural": ((3, list(range(1, 9)), 1.0), (3, [1, 2, 3], 1.0)),
}
FIG2_KL = {  # model -> (V, T, kl_scales); quick sizes second
    "tabular": ((3, 4, [round(0.03 * 1.5**i, 6) for i in range(12)]), (3, 3, [0.05, 0.3, 1.0, 2.0])),
    "neural": ((3, 4, [round(0.03 * 1.46**i, 6) for i in range(12)]), (3, 3, [0.05, 0.3, 1.0, 2.0])),
}
SEED = 0


def _fig2(out: Path, quick: bool, progress: bool, stem: str, by_length: bool) -> list[Path]:
    from ..workflows.sweeps import FIG_CONFIGS, ROW_FIELDS, sweep

    art = Artifact(out, stem)
    spec = FIG2_LENGTH if by_length else FIG2_KL
    rows, config = [], {}
    for model, sizes in spec.items():
        if by_length:
            V, lengths, scale = sizes[quick]
            scales = [scale]
            config[model] = {"vocab": V, "lengths": lengths, "kl_scale": scale, "seed": SEED}
        else:
            V, T, scales = sizes[quick]
            lengths = [T]
            config[model] = {"vocab": V, "length": T, "kl_scales": scales, "seed": SEED}
        rows += sweep(model, V, lengths, scales, seed=SEED, progress=progress, desc=f"{stem} {model}")
    rows = art.add_csv(rows, ROW_FIELDS)

    fig = new_figure(11, 8.5)
    axes = fig.subplots(2, 2)
    for i, model in enumerate(spec):
        rs = [r for r in rows if r["model"] == model]
        V = int(rs[0]["vocab"])
        if by_length:
            plot_bias_variance(axes[i, 0], axes[i, 1], rs, "length", "sequence length T")
            for ax in axes[i]:
                ax.xaxis.get_major_locator().set_params(integer=True)
            what = f"V={V}, kl_scale {config[model]['kl_scale']}"
        else:
            plot_bias_variance(
                axes[i, 0], axes[i, 1], rs, "kl_reverse", r"KL($\pi\,\|\,\pi_{ref}$) (sequence level)", log_x=True
            )
            what = f"V={V}, T={int(rs[0]['length'])}"
        axes[i, 0].set_title(f"{model} toy ({what}): relative gradient bias", fontsize=10)
        axes[i, 1].set_title(f"{model} toy ({what}): per-sample variance", fontsize=10)
    legend_below(fig, axes[0, 0])
    fig.get_layout_engine().set(rect=(0, 0.07, 1, 0.93))
    x = "sequence length" if by_length else "KL(pi || pi_ref)"
    fig.suptitle(
        "Gradient estimates of $\\nabla$KL($\\pi\\|\\pi_{ref}$) by configuration: exact relative bias and variance "
        f"against {'sequence length T' if by_length else 'the KL'} (enumeration, no sampling)",
        fontsize=11,
    )
    art.add_png(fig)
    art.add_meta(
        {
            "what": f"exact relative bias and per-sample variance against {x}",
            "method": "biaslab.engines.exact.ExactEngine (enumeration of all V**T sequences, float64)",
            "configs": [dict(zip(("label", "estimator", "placement", "level", "credit"), c)) for c in FIG_CONFIGS],
            "models": config,
            "quick": quick,
            "bias_floor_in_plot": BIAS_FLOOR,
        },
        seed=SEED,
    )
    return art.commit()


@figure("fig2_length")
def fig2_length(out: Path, quick: bool, progress: bool = False) -> list[Path]:
    """(a) The paper's Fig. 2 analog: exact relative bias and variance of each configuration against T."""
    return _fig2(out, quick, progress, "fig2_length", by_length=True)


@figure("fig2_kl")
def fig2_kl(out: Path, quick: bool, progress: bool = False) -> list[Path]:
    """(b) The same against the KL between policy and reference (kl_scale varied)."""
    return _fig2(out, quick, progress, "fig2_kl", by_length=False)
