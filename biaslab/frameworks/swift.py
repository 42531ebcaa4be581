"""ms-swift GRPO (modelscope/ms-swift, late 2026): with ``kl_in_reward`` the summed k1 of the old vs reference
log-probs times ``beta`` is subtracted from each response's reward before the advantage estimator (grpo: group
mean and std; rloo: leave-one-out; reinforce_plus_plus: group mean, batch std); otherwise k3 (log-ratio clamped to
+-20, value to +-10) times ``beta`` is added to the loss, aggregated by ``loss_type``. ``kl_in_reward`` and
``scale_rewards`` default by estimator (swift/arguments rlhf_args: grpo -> false / group, rloo -> true / none,
reinforce_plus_plus -> true / batch).

Sources (ms-swift main, late 2026): swift/trainers/rlhf_trainer/grpo_trainer.py (_compute_advantages with
kl_in_reward, _compute_loss), swift/trainers/rlhf_arguments.py / arguments/rlhf_args.py (defaults: beta 0.04,
kl_in_reward false, num_generations 8, loss_type grpo, scale_rewards group, num_iterations 1).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..core.estimators import clamped
from ..core.recipes import Recipe
from .base import Key, Preset, clip_range, kl_terms

K3_SWIFT = clamped("k3", input_clamp=20.0, output_clamp=10.0, name="k3_swift")
LOSS_TYPES = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dapo": "token-mean"}


class MsSwift(Preset):
    name = "ms-swift"
    title = "ms-swift GRPO"
    version = "main (late 2026)"
    functions = "swift.trainers.rlhf_trainer.grpo_trainer.GRPOTrainer (_compute_advantages, _compute_loss)"
    sources = "ms-swift main (late 2026): swift/trainers/rlhf_trainer/grpo_trainer.py, rlhf arguments"
    keys = (
        Key("beta", 0.04, "float"),
        Key("advantage_estimator", "grpo", "choice", ("grpo", "rloo", "reinforce_plus_plus")),
        Key("kl_in_reward", None, "bool", nullable=True),  # null: by advantage_estimator
        Key("num_generations", 8, "int"),
        Key("loss_type", "grpo", "choice", tuple(LOSS_TYPES), why="other loss types are not modelled"),
        Key("scale_rewards", "auto", "choice", ("auto", "group", "batch", "none")),
        Key("epsilon", 0.2, "float"),
        Key("epsilon_high", None, "float", nullable=True),
        Key("num_iterations", 1, "int"),
    )
    search_keys = ("kl_in_reward", "advantage_estimator", "loss_type", "scale_rewards")
    group_key = "num_generations"
    lag_keys = ("num_iterations",)

    @staticmethod
    def resolved(cfg: Mapping[str, object]) -> tuple[bool, str]:
        """(kl_in_reward, scale_rewards) with the estimator-dependent defaults filled in."""
        adv = cfg["advantage_estimator"]
        kl_in_reward = cfg["kl_in_reward"] if cfg["kl_in_reward"] is not None else adv != "grpo"
        scale = cfg["scale_rewards"]
        if scale == "auto":  # the argument left unset (None in ms-swift)
            scale = {"grpo": "group", "rloo": "none", "reinforce_plus_plus": "batch"}[adv]
        return bool(kl_in_reward), scale

    def recipe(self, cfg: Mapping[str, object]) -> Recipe:
        beta = float(cfg["beta"])
        kl_in_reward, scale = self.resolved(cfg)
        adv = cfg["advantage_estimator"]
        if adv == "rloo":
            baseline = "rloo"
        elif adv == "reinforce_plus_plus" or scale != "group":
            baseline = "batch_mean"
        else:
            baseline = "grpo"
        agg = LOSS_TYPES[cfg["loss_type"]]
        in_r = kl_in_reward and beta != 0
        in_l = not kl_in_reward and beta != 0
        return Recipe(
            name="ms-swift",
            **kl_terms(reward=("k1", beta) if in_r else None, loss=(K3_SWIFT, beta) if in_l else None),
            reward_credit="full",
            baseline=baseline,
            baseline_on="total",
            whiten=scale == "batch",
            whiten_std=True,
            grpo_eps=1e-4,
            pg_clip=clip_range(cfg, "epsilon", "epsilon_high"),
            pg_agg=agg,
            loss_agg=agg,
        )

    def notes(self, cfg: Mapping[str, object]) -> list[str]:
        if self.resolved(cfg)[1] == "batch":
            return ["scale_rewards=batch: division by the batch std, taken in its large-batch limit (a global scale)"]
        return []
