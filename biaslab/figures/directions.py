"""The directions figure: each configuration's exact E[g] by its cosines with the named directions (reverse and
forward KL, sequence and per-token, the estimator's own expected value)."""

from __future__ import annotations

from pathlib import Path

from .artifact import Artifact, new_figure
from .plotting import plot_direction_matrix
from .registry import figure

DIRECTION_MODELS = (("tabular", 3, 4, 0, 1.0), ("neural", 3, 4, 0, 1.0))  # (model, V, T, seed, kl_scale)
DIRECTION_MODELS_QUICK = (("tabular", 3, 3, 0, 1.0), ("neural", 3, 3, 0, 1.0))
#: the named directions, in column order: those of ExactEngine.truths(), then the configuration's own grad E[K]
DIRECTION_COLUMNS = ("reverse_kl", "forward_kl", "forward_kl_token", "reverse_kl_token", "expected_value")
DIRECTION_FIELDS = [
    *("model", "vocab", "length", "seed", "kl_scale", "config", "estimator", "placement", "level", "credit"),
    *("verdict", "rel_bias", "matches", *[f"cos_{d}" for d in DIRECTION_COLUMNS]),
]


#: (label, estimator, placement, level, credit): k1, k2, k3 x token / sequence x reward / loss / both, reward-to-go
#: credit (credit never changes E[g])
DIRECTION_SPECS: tuple[tuple[str, str, str, str, str], ...] = tuple(
    (
        f"{est} in {'reward+loss' if placement == 'both' else placement}" + (" (seq)" if level == "sequence" else ""),
        est,
        placement,
        level,
        "" if placement == "loss" else "rtg",
    )
    for est in ("k1", "k2", "k3")
    for level in ("token", "sequence")
    for placement in ("reward", "loss", "both")
)


def direction_rows(model: str, V: int, T: int, seed: int, kl_scale: float) -> list[dict]:
    """One row per configuration of ``DIRECTION_SPECS``: cosines of its exact E[g] with each named direction (NaN
    when E[g] = 0) and the directions it equals exactly (``ExactResult.all_matches``, joined by ';').

    ``expected_value`` is grad E_pi[K] of the configuration's own estimator and level: under enumeration it is the
    exact E[g] of that estimator placed in reward + loss with full credit."""
    from ..core.placements import make_config
    from ..core.verdict import cosine
    from ..engines.exact import ExactEngine
    from ..engines.toy import make_pair

    policy, ref = make_pair(model, V, T, seed=seed, kl_scale=kl_scale)
    engine = ExactEngine(policy, ref)
    named = engine.truths().directions
    rows = []
    for label, est, placement, level, credit in DIRECTION_SPECS:
        r = engine.evaluate(make_config(est, placement, level, credit or None))
        dirs = {k: named[k] for k in DIRECTION_COLUMNS if k in named}
        dirs["expected_value"] = engine.evaluate(make_config(est, "both", level, "full")).expected_grad
        zero = r.verdict == "zero"
        values = (model, V, T, seed, float(kl_scale), label, est, placement, level, credit, r.verdict, r.rel_bias)
        rows.append(
            {
                **dict(zip(DIRECTION_FIELDS, values)),
                "matches": ";".join(r.all_matches),
                **{f"cos_{k}": float("nan") if zero else cosine(r.expected_grad, dirs[k]) for k in DIRECTION_COLUMNS},
            }
        )
    return rows


@figure("directions")
def directions(out: Path, quick: bool, progress: bool = False) -> list[Path]:
    """(d) For each configuration, the cosine of its exact E[g] with every named gradient direction, as a
    configurations x directions matrix per toy, with the directions E[g] equals exactly marked."""
    from tqdm.auto import tqdm

    art = Artifact(out, "directions")
    models = DIRECTION_MODELS_QUICK if quick else DIRECTION_MODELS
    rows = []
    for model, V, T, seed, scale in tqdm(models, desc="directions", disable=not progress, leave=False):
        rows += direction_rows(model, V, T, seed, scale)
    rows = art.add_csv(rows, DIRECTION_FIELDS)

    n_configs = len(DIRECTION_SPECS)
    fig = new_figure(6.2 * len(models), 0.42 * n_configs + 2.6)
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for i, (ax, (model, V, T, seed, scale)) in enumerate(zip(axes, models)):
        plot_direction_matrix(ax, [r for r in rows if r["model"] == model], DIRECTION_COLUMNS, row_labels=i == 0)
        ax.set_title(f"{model} toy (V={V}, T={T}, seed {seed}, kl_scale {scale})", fontsize=10)
    fig.suptitle(
        "Which direction does each configuration's expected gradient follow? cos(E[g], direction), exact;\n"
        "a gold box and '= 1' mark the directions E[g] equals exactly (relative tolerance 1e-8)",
        fontsize=11,
    )
    art.add_png(fig)
    art.add_meta(
        {
            "what": "cosine of each configuration's exact E[g] with every named gradient direction",
            "method": "biaslab.engines.exact.ExactEngine.evaluate and truths; grad E[K] = E[g] of reward+loss, "
                      "full credit; "
            "credit rtg (credit does not change E[g])",
            "directions": list(DIRECTION_COLUMNS),
            "models": [dict(zip(("model", "vocab", "length", "seed", "kl_scale"), m)) for m in models],
            "quick": quick,
        },
        seed=sorted({m[3] for m in models}),
    )
    return art.commit()
