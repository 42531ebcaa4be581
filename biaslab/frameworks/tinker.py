"""Tinker cookbook (thinking-machines-lab/tinker-cookbook, late 2026): ``rl/metrics.incorporate_kl_penalty`` adds
``kl_penalty_coef * mask * (avg_logp_diff - logp_diff)`` to the advantages, with logp_diff = sampled log-prob minus
base log-prob (k1 from the sampler's log-probs) and avg_logp_diff its mean over every token of the batch (a
centring); with ``kl_discount_factor`` > 0 those per-token penalties are summed into discounted future sums, with
0 (the default) each token keeps only its own penalty: a per-token partial gradient. Task advantages are the
reward minus the group mean (``compute_advantages``); the loss is the ``importance_sampling`` token sum.

Sources (tinker-cookbook main, late 2026): tinker_cookbook/rl/metrics.py (incorporate_kl_penalty),
tinker_cookbook/rl/data_processing.py (compute_advantages), tinker_cookbook/rl/train.py (Config defaults:
kl_penalty_coef 0.0, kl_discount_factor 0.0, num_substeps 1).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..core.recipes import Recipe
from .base import Key, Preset, kl_terms


class Tinker(Preset):
    name = "tinker"
    title = "Tinker cookbook"
    version = "main (late 2026)"
    functions = "tinker_cookbook.rl.metrics.incorporate_kl_penalty"
    sources = "tinker-cookbook main (late 2026): tinker_cookbook/rl/metrics.py, rl/data_processing.py, rl/train.py"
    keys = (
        Key("kl_penalty_coef", 0.0, "float"),
        Key("kl_discount_factor", 0.0, "float", search=(1.0,)),
        Key("group_size", 4, "int"),
        Key("num_substeps", 1, "int"),
    )
    search_keys = ("kl_discount_factor",)
    group_key = "group_size"
    kl_switch = {"kl_penalty_coef": 0.01}
    lag_keys = ("num_substeps",)
    unit_keys = ("kl_discount_factor",)

    def recipe(self, cfg: Mapping[str, object]) -> Recipe:
        coef = float(cfg["kl_penalty_coef"])
        return Recipe(
            name="tinker",
            **kl_terms(reward=("k1", coef) if coef != 0 else None),
            reward_credit="rtg",
            reward_lambda=float(cfg["kl_discount_factor"]),
            baseline="batch_mean",
            baseline_on="task",
            # the batch-wide token-mean centring in its large-batch limit: a constant subtracted from every token's
            # advantage = mean-only whitening (exact for kl_discount_factor 0; with > 0 Tinker centres before
            # discounting, the model after); group-level centring is Recipe(reward_kl_center="group_token_mean")
            whiten=True,
            whiten_std=False,
            pg_agg="token-sum",
        )

    def notes(self, cfg: Mapping[str, object]) -> list[str]:
        return [
            "the KL penalty is centred by its mean over the batch's tokens, taken in the large-batch limit (a constant "
            "subtracted from every token's advantage)",
            f"kl_discount_factor={cfg['kl_discount_factor']:g}: "
            + (
                "each token is penalised for its own KL only (a per-token partial gradient)"
                if cfg["kl_discount_factor"] == 0
                else "discounted future KL sums"
            ),
        ]
