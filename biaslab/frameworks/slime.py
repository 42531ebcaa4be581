"""slime: ``ppo_utils.compute_approx_kl(..., kl_loss_type, importance_ratio)`` (k1, k2, k3; low_var_kl is k3 with
the value clamped to +-10 and no input clamp), in the loss as a per-sample token mean; ``--use-unbiased-kl``
multiplies it by the differentiable ratio pi/pi_old (slime clamps low_var_kl after that product, the preset before
it: identical while |ratio * k3| < 10); ``--kl-coef`` puts the same estimator, from the rollout log-probs, in the
reward only for ppo / reinforce_plus_plus(_baseline) (with grpo slime ignores it).

Sources (slime main, late 2026): slime/utils/ppo_utils.py (compute_approx_kl; get_reinforce_plus_plus_returns:
token rewards -kl_coef * k_t plus the task reward at the last token, discounted returns with --gamma;
get_reinforce_plus_plus_baseline_advantages: (R - group mean of the task reward) - kl_coef * k_t on each token,
its own KL only, no reward-to-go; both whitened afterwards), slime/backends/megatron_utils/loss.py (advantages,
policy and KL loss), slime/utils/arguments.py (defaults; --global-batch-size vs rollout-batch-size x
n-samples-per-prompt = optimizer steps per rollout).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..core.estimators import clamped
from ..core.recipes import Recipe
from .base import Key, Preset, clip_range, kl_terms

KL_TYPES = {"k1": "k1", "k2": "k2", "k3": "k3", "low_var_kl": clamped("k3", output_clamp=10.0, name="k3_outclamp")}
ESTIMATORS = ("grpo", "ppo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")


class Slime(Preset):
    name = "slime"
    title = "slime"
    version = "main (late 2026)"
    functions = "slime.utils.ppo_utils.compute_approx_kl, get_reinforce_plus_plus_baseline_advantages"
    sources = "slime main (late 2026): slime/utils/ppo_utils.py, backends/megatron_utils/loss.py, utils/arguments.py"
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
        Key("gamma", 1.0, "float"),
        Key("lambd", 1.0, "float"),
        Key("rollout-batch-size", None, "int", nullable=True),
        Key("global-batch-size", None, "int", nullable=True),
    )
    search_keys = ("kl-loss-type", "use-unbiased-kl", "use-kl-loss", "advantage-estimator", "calculate-per-token-loss")
    group_key = "n-samples-per-prompt"
    kl_switch = {"use-kl-loss": True, "kl-loss-coef": 0.001}
    rollout_keys = ("rollout-batch-size", group_key)  # --global-batch-size samples per optimizer step
    minibatch_key = "global-batch-size"
    positive_keys = (minibatch_key,)
    unit_keys = ("gamma", "lambd")
    critic_when = ("advantage-estimator", "ppo")

    def recipe(self, cfg: Mapping[str, object]) -> Recipe:
        adv = cfg["advantage-estimator"]
        est = KL_TYPES[cfg["kl-loss-type"]]
        reward_on = adv != "grpo" and float(cfg["kl-coef"]) != 0
        loss_on = cfg["use-kl-loss"] and float(cfg["kl-loss-coef"]) != 0
        agg = "token-mean" if cfg["calculate-per-token-loss"] else "seq-mean-token-mean"
        # ppo: GAE (critic 0) with gamma * lambd; reinforce_plus_plus: discounted returns (gamma);
        # reinforce_plus_plus_baseline: each token only its own KL (discount 0), baseline over the task reward
        discount = {
            "ppo": float(cfg["gamma"]) * float(cfg["lambd"]),
            "reinforce_plus_plus": float(cfg["gamma"]),
            "reinforce_plus_plus_baseline": 0.0,
        }.get(adv, 1.0)
        return Recipe(
            name="slime",
            **kl_terms(
                reward=(est, cfg["kl-coef"]) if reward_on else None,
                loss=(est, cfg["kl-loss-coef"]) if loss_on else None,
            ),
            reward_credit="rtg",
            reward_lambda=discount,
            baseline={"grpo": "grpo", "reinforce_plus_plus_baseline": "batch_mean"}.get(adv, "none"),
            baseline_on="task" if adv == "reinforce_plus_plus_baseline" else "total",
            whiten=adv in ("reinforce_plus_plus", "reinforce_plus_plus_baseline"),
            pg_clip=clip_range(cfg, "eps-clip", "eps-clip-high"),
            pg_agg=agg,
            loss_weight="ratio" if cfg["use-unbiased-kl"] else "none",
            loss_agg=agg,
        )

    def no_kl_reason(self, cfg: Mapping[str, object]) -> str:
        if cfg["advantage-estimator"] == "grpo" and float(cfg["kl-coef"]) != 0 and not cfg["use-kl-loss"]:
            return "kl-coef is ignored with advantage-estimator grpo (a silent no-op in slime, #397): no KL term"
        return ""

    def notes(self, cfg: Mapping[str, object]) -> list[str]:
        out = []
        if cfg["advantage-estimator"] == "grpo" and float(cfg["kl-coef"]) != 0:
            out.append("kl-coef is ignored with advantage-estimator grpo (a silent no-op in slime)")
        adv = cfg["advantage-estimator"]
        if adv == "reinforce_plus_plus_baseline" and float(cfg["kl-coef"]) != 0:
            out.append(
                "reinforce_plus_plus_baseline: each token gets only its own -kl_coef * k_t (no reward-to-go); "
                "the group mean is over the task reward only; whitened (large-batch limit)"
            )
        elif adv in ("ppo", "reinforce_plus_plus") and float(cfg["kl-coef"]) != 0:
            out.append(
                "KL in reward: the kl-loss-type estimator per token with discounted reward-to-go"
                + (", critic taken as 0" if adv == "ppo" else ", whitened (large-batch limit)")
            )
        return out
