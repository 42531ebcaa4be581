"""slime: ``ppo_utils.compute_approx_kl(..., kl_loss_type, importance_ratio)`` (k1, k2, k3; low_var_kl is k3 with
the value clamped to +-10 and no input clamp), in the loss as a per-sample token mean; ``--use-unbiased-kl``
multiplies it by the differentiable ratio pi/pi_old (slime clamps low_var_kl after that product, the preset before
it: identical while |ratio * k3| < 10); ``--kl-coef`` puts the same estimator, from the rollout log-probs, in the
reward only for ppo / reinforce_plus_plus(_baseline) (with grpo slime ignores it).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..estimators import clamped
from ..recipes import Recipe
from .base import Key, Preset, estimator_of

KL_TYPES = {"k1": "k1", "k2": "k2", "k3": "k3", "low_var_kl": clamped("k3", output_clamp=10.0, name="k3_outclamp")}
ESTIMATORS = ("grpo", "ppo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")


class Slime(Preset):
    name = "slime"
    title = "slime"
    version = "main (late 2026)"
    functions = "slime.utils.ppo_utils.compute_approx_kl"
    keys = (
        Key("advantage-estimator", "grpo", "choice", ESTIMATORS),
        Key("use-kl-loss", False, "bool"),
        Key("kl-loss-coef", 0.0, "float"),
        Key("kl-loss-type", "k1", "choice", tuple(KL_TYPES)),
        Key("use-unbiased-kl", False, "bool"),
        Key("kl-coef", 0.0, "float"),
        Key("eps-clip", 0.2, "float"),
        Key("eps-clip-high", None, "float", nullable=True),
        Key("calculate-per-token-loss", False, "bool"),
        Key("n-samples-per-prompt", 1, "int"),
    )
    search_keys = ("kl-loss-type", "use-unbiased-kl", "use-kl-loss", "advantage-estimator", "calculate-per-token-loss")

    def recipe(self, cfg: Mapping[str, object]) -> Recipe:
        adv = cfg["advantage-estimator"]
        est = estimator_of(KL_TYPES, "kl-loss-type", cfg["kl-loss-type"])
        reward_on = adv != "grpo" and float(cfg["kl-coef"]) != 0
        loss_on = cfg["use-kl-loss"] and float(cfg["kl-loss-coef"]) != 0
        agg = "token-mean" if cfg["calculate-per-token-loss"] else "seq-mean-token-mean"
        eps = float(cfg["eps-clip"])
        hi = eps if cfg["eps-clip-high"] is None else float(cfg["eps-clip-high"])
        return Recipe(
            name="slime",
            reward_estimator=est if reward_on else None,
            reward_coef=float(cfg["kl-coef"]) if reward_on else 0.0,
            reward_credit="rtg",
            baseline={"grpo": "grpo", "reinforce_plus_plus_baseline": "batch_mean"}.get(adv, "none"),
            pg_ratio="token",
            pg_clip=(eps, hi),
            pg_agg=agg,
            loss_estimator=est if loss_on else None,
            loss_coef=float(cfg["kl-loss-coef"]) if loss_on else 0.0,
            loss_weight="ratio" if cfg["use-unbiased-kl"] else "none",
            loss_agg=agg,
        )

    def enable_kl(self, cfg: dict[str, object]) -> tuple[dict[str, object], dict[str, object]]:
        changed = {"use-kl-loss": True, "kl-loss-coef": 0.001}
        return {**cfg, **changed}, changed

    def group_size(self, cfg: Mapping[str, object]) -> int:
        return int(cfg["n-samples-per-prompt"])

    def notes(self, cfg: Mapping[str, object]) -> list[str]:
        out = []
        if cfg["advantage-estimator"] == "grpo" and float(cfg["kl-coef"]) != 0:
            out.append("kl-coef is ignored with advantage-estimator grpo (a silent no-op in slime)")
        if cfg["advantage-estimator"] != "grpo" and float(cfg["kl-coef"]) != 0:
            out.append("KL in reward: the kl-loss-type estimator per token with reward-to-go credit, critic taken as 0")
        return out
