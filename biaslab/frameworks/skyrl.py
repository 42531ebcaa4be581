"""SkyRL 0.3: ``ppo_utils.compute_approx_kl`` (k1, abs, k2, k3 with verl's clamps) in the loss, aggregated as a
per-sequence token mean then a batch mean, or in the reward (mutually exclusive), with GRPO/RLOO/GAE advantages
and ``loss_reduction`` for the policy loss.

Sources (SkyRL 0.3.0): skyrl/backends/skyrl_train/utils/ppo_utils.py (compute_approx_kl, the advantage
estimators), skyrl_train config ppo_base_config.yaml (defaults; trainer.train_batch_size /
trainer.policy_mini_batch_size x trainer.update_epochs_per_batch optimizer steps per rollout).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..core.recipes import Recipe
from .base import Key, Preset, PresetError, kl_terms

KL_TYPES = {"k1": "k1", "abs": "abs", "k2": "k2", "k3": "k3_clamped"}
REDUCTIONS = {
    "token_mean": "token-mean",
    "sequence_mean": "seq-mean-token-mean",
    "seq_mean_token_sum_norm": "seq-mean-token-sum-norm",
}
P = "trainer.algorithm."


class SkyRL(Preset):
    name = "skyrl"
    title = "SkyRL"
    version = "0.3.0"
    functions = "skyrl.backends.skyrl_train.utils.ppo_utils.compute_approx_kl"
    sources = "SkyRL 0.3.0: skyrl/backends/skyrl_train/utils/ppo_utils.py, config ppo_base_config.yaml"
    keys = (
        Key(P + "advantage_estimator", "grpo", "choice", ("grpo", "gae", "rloo")),
        Key(P + "use_kl_loss", True, "bool"),
        Key(P + "use_kl_in_reward", False, "bool"),
        Key(P + "kl_estimator_type", "k3", "choice", tuple(KL_TYPES)),
        Key(P + "kl_loss_coef", 0.001, "float"),
        Key(P + "loss_reduction", "token_mean", "choice", tuple(REDUCTIONS)),
        Key(P + "grpo_norm_by_std", True, "bool"),
        Key(P + "eps_clip_low", 0.2, "float"),
        Key(P + "eps_clip_high", 0.2, "float"),
        Key(P + "gamma", 1.0, "float"),
        Key(P + "lambd", 1.0, "float"),
        Key("generator.n_samples_per_prompt", 5, "int"),
        Key("trainer.train_batch_size", 1024, "int"),
        Key("trainer.policy_mini_batch_size", 256, "int"),
        Key("trainer.update_epochs_per_batch", 1, "int"),
    )
    search_keys = (
        P + "use_kl_loss",
        P + "use_kl_in_reward",
        P + "kl_estimator_type",
        P + "loss_reduction",
        P + "advantage_estimator",
        P + "grpo_norm_by_std",
    )
    group_key = "generator.n_samples_per_prompt"
    lag_keys = ("trainer.update_epochs_per_batch",)
    rollout_keys = ("trainer.train_batch_size",)
    minibatch_key = "trainer.policy_mini_batch_size"
    positive_keys = (minibatch_key,)
    unit_keys = (P + "gamma", P + "lambd")
    critic_when = (P + "advantage_estimator", "gae")

    def validate(self, cfg: dict[str, object]) -> None:
        if cfg[P + "use_kl_loss"] and cfg[P + "use_kl_in_reward"]:
            raise PresetError(f"{P}use_kl_loss and {P}use_kl_in_reward are mutually exclusive in SkyRL")

    def recipe(self, cfg: Mapping[str, object]) -> Recipe:
        est = KL_TYPES[cfg[P + "kl_estimator_type"]]
        adv = cfg[P + "advantage_estimator"]
        baseline = {"gae": "none", "rloo": "rloo"}.get(adv, "grpo" if cfg[P + "grpo_norm_by_std"] else "batch_mean")
        term = (est, cfg[P + "kl_loss_coef"])
        use_r, use_l = cfg[P + "use_kl_in_reward"], cfg[P + "use_kl_loss"]
        return Recipe(
            name="skyrl",
            **kl_terms(reward=term if use_r else None, loss=term if use_l else None),
            reward_credit="rtg" if adv == "gae" else "full",
            reward_lambda=float(cfg[P + "gamma"]) * float(cfg[P + "lambd"]) if adv == "gae" else 1.0,
            baseline=baseline,
            baseline_on="total",
            pg_clip=(float(cfg[P + "eps_clip_low"]), float(cfg[P + "eps_clip_high"])),
            pg_agg=REDUCTIONS[cfg[P + "loss_reduction"]],
            loss_agg="seq-mean-token-mean",
        )

    def notes(self, cfg: Mapping[str, object]) -> list[str]:
        return ["the KL loss is a per-sequence token mean averaged over sequences, whatever loss_reduction says"]
