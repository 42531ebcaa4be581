"""Exact sweeps behind the figures: every configuration's bias and variance as T or the KL changes.

Each row is one (toy model, configuration) evaluated by ``ExactEngine`` (no sampling): the relative bias
||E[g] - grad KL(pi || pi_ref)|| / ||grad KL(pi || pi_ref)|| (reverse KL, sequence level), the per-sample variance
tr Cov[g] = E||g - E[g]||^2, the cosines of E[g] with the reverse- and forward-KL gradients, and the verdict.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..core.io import Rows
from ..core.placements import KLConfig, all_configs, make_config
from ..core.verdict import cosine
from ..engines.exact import ExactEngine
from ..engines.toy import make_pair

#: The configurations of the paper's Fig. 2 analog: (short plot label, estimator, placement, level, credit).
FIG_CONFIGS: tuple[tuple[str, str, str, str, str | None], ...] = (
    ("k1 in reward", "k1", "reward", "token", "rtg"),
    ("k3 in reward", "k3", "reward", "token", "rtg"),
    ("k1 in loss", "k1", "loss", "token", None),
    ("k2 in loss", "k2", "loss", "token", None),
    ("k3 in loss", "k3", "loss", "token", None),
    ("k3 in reward+loss", "k3", "both", "token", "rtg"),
    ("k2 in loss (seq)", "k2", "loss", "sequence", None),
    ("k3 in loss (seq)", "k3", "loss", "sequence", None),
)

ROW_FIELDS = [
    *("model", "vocab", "length", "seed", "kl_scale", "kl_reverse", "kl_forward", "grad_norm"),
    *("config", "estimator", "placement", "level", "credit"),
    *("rel_bias", "bias_sq", "variance", "cos_reverse", "cos_forward", "verdict", "matches"),
]


def fig_configs() -> list[tuple[str, KLConfig]]:
    """(label, KLConfig) for ``FIG_CONFIGS``."""
    return [(label, make_config(e, p, lv, c)) for label, e, p, lv, c in FIG_CONFIGS]


def direction_configs(estimators: Sequence[str] = ("k1", "k2", "k3")) -> list[tuple[str, KLConfig]]:
    """Every placement x level of ``estimators`` with reward-to-go credit (credit never changes E[g])."""
    out = []
    for cfg in all_configs(tuple(estimators), credits=("rtg",)):
        label = f"{cfg.estimator.name} in {cfg.placement.value}" + (" (seq)" if cfg.level.value == "sequence" else "")
        out.append((label, cfg))
    return out


def evaluate_rows(
    model: str,
    vocab_size: int,
    length: int,
    seed: int,
    kl_scale: float,
    configs: Sequence[tuple[str, KLConfig]] | None = None,
    with_directions: bool = False,
) -> list[dict]:
    """One row per configuration for the toy pair ``make_pair(model, V, T, seed, kl_scale)`` (fields ROW_FIELDS,
    ``kind`` = "config"); with ``with_directions`` also one row per named direction of ``ExactEngine.truths``
    (``kind`` = "direction", its cosines with the reverse- and forward-KL gradients)."""
    configs = fig_configs() if configs is None else configs
    policy, ref = make_pair(model, vocab_size, length, seed=seed, kl_scale=kl_scale)
    engine = ExactEngine(policy, ref)
    tr = engine.truths()
    base = {"model": model, "vocab": vocab_size, "length": length, "seed": seed, "kl_scale": float(kl_scale),
            "kl_reverse": tr.kl_reverse, "kl_forward": tr.kl_forward, "grad_norm": float(tr.grad_reverse.norm())}
    rows = Rows()
    for label, cfg in configs:
        r = engine.evaluate(cfg)
        rows.append({
            "kind": "config", **base, "config": label, "estimator": cfg.estimator.name,
            "placement": cfg.placement.value, "level": cfg.level.value,
            "credit": cfg.credit.value if cfg.credit is not None else "",
            "rel_bias": r.rel_bias, "bias_sq": float(((r.expected_grad - tr.grad_reverse) ** 2).sum()),
            "variance": r.variance, "cos_reverse": r.cos_reverse, "cos_forward": r.cos_forward,
            "verdict": r.verdict, "matches": r.matches,
        })
    if with_directions:
        for name, d in tr.directions.items():
            if name != "zero":
                rows.append({
                    "kind": "direction", **base, "config": name,
                    "cos_reverse": cosine(d, tr.grad_reverse), "cos_forward": cosine(d, tr.grad_forward),
                })
    return rows


def sweep(
    model: str,
    vocab_size: int,
    lengths: Iterable[int],
    kl_scales: Iterable[float],
    seed: int = 0,
    configs: Sequence[tuple[str, KLConfig]] | None = None,
    progress: bool = False,
    desc: str = "sweep",
) -> list[dict]:
    """``evaluate_rows`` over the grid lengths x kl_scales (a tqdm bar when ``progress``)."""
    from tqdm import tqdm  # plain bars: no ipywidgets needed inside notebooks

    grid = [(T, s) for T in lengths for s in kl_scales]
    rows = Rows()
    for T, s in tqdm(grid, desc=desc, disable=not progress, leave=False):
        rows += evaluate_rows(model, vocab_size, T, seed, s, configs)
    return rows
