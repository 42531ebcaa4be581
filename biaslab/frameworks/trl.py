"""TRL: ``GRPOTrainer._compute_loss`` (TRL 1.16; k3 in the loss, unclamped, times the differentiable ratio
exp(logp - logp_old) when ``use_bias_correction_kl``; ``loss_type`` picks the aggregation) and the PPO trainer
of TRL's 0.x line (k1 or k3 from the rollout log-probs in the token rewards, GAE with ``gamma``/``lam``,
whitened advantages, clipped ratio, token-mean loss; TRL 1.16 no longer ships it), and ``RLOOTrainer`` (TRL 1.16).

Sources: trl/trainer/grpo_trainer.py and grpo_config.py (TRL 1.16: ``_compute_loss``: per_token_kl = exp(ref - lp)
- (ref - lp) - 1, times coef_1 = exp(log_importance_weights) when use_bias_correction_kl, with
log_importance_weights per token or, for importance_sampling_level="sequence", the masked mean of the log ratio
broadcast to every token; loss_type grpo = per-sequence token mean then mean, bnpo = batch token mean, dr_grpo =
sum / (B * max_completion_length), dapo = sum / num_items_in_batch (a global token mean); max_completion_length
default 512; one generation batch feeds num_iterations x steps_per_generation / gradient_accumulation_steps
optimizer steps), trl/trainer/rloo_trainer.py and rloo_config.py (TRL 1.16: rewards -= beta * sum_t (old - ref)
before the leave-one-out baseline; a sequence-level ratio, one loss per response, mean over responses; beta 0.05),
trl/trainer/ppo_trainer.py (TRL 0.x: num_ppo_epochs x num_mini_batches updates per rollout).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..core.recipes import Recipe
from .base import Key, Preset, PresetError, clip_range, kl_terms

LOSS_TYPES = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dapo": "token-mean", "dr_grpo": "constant"}


class TRLGRPO(Preset):
    name = "trl-grpo"
    title = "TRL GRPOTrainer"
    version = "1.16.0"
    functions = "trl.GRPOTrainer._compute_loss (inline KL; TRL has no standalone KL function)"
    sources = "TRL 1.16: trl/trainer/grpo_trainer.py (_compute_loss), trl/trainer/grpo_config.py"
    keys = (
        Key("beta", 0.0, "float"),
        Key("loss_type", "dapo", "choice", tuple(LOSS_TYPES), why="cispo and sapo are not modelled"),
        Key("use_bias_correction_kl", True, "bool"),
        Key("epsilon", 0.2, "float"),
        Key("epsilon_high", None, "float", nullable=True),
        Key("num_generations", 8, "int"),
        Key("scale_rewards", "group", "choice", ("group", "batch", "none")),
        Key("importance_sampling_level", "token", "choice", ("token", "sequence")),
        Key("max_completion_length", 512, "int"),
        Key("num_iterations", 1, "int"),
        Key("steps_per_generation", None, "int", nullable=True),
        Key("gradient_accumulation_steps", 1, "int"),
    )
    search_keys = ("use_bias_correction_kl", "loss_type", "scale_rewards", "importance_sampling_level")
    group_key = "num_generations"
    kl_switch = {"beta": 0.04}
    lag_keys = ("num_iterations",)
    rollout_keys = ("steps_per_generation",)  # null: gradient_accumulation_steps
    minibatch_key = "gradient_accumulation_steps"
    positive_keys = ("num_iterations", "gradient_accumulation_steps", "max_completion_length", "num_generations")

    def recipe(self, cfg: Mapping[str, object]) -> Recipe:
        beta = float(cfg["beta"])
        agg = LOSS_TYPES[cfg["loss_type"]]
        return Recipe(
            name="trl-grpo",
            baseline="grpo" if cfg["scale_rewards"] != "none" else "batch_mean",
            grpo_eps=1e-4,
            pg_ratio="sequence_mean" if cfg["importance_sampling_level"] == "sequence" else "token",
            pg_clip=clip_range(cfg, "epsilon", "epsilon_high"),
            pg_agg=agg,
            **kl_terms(loss=("k3", beta) if beta != 0 else None),
            loss_weight="ratio" if cfg["use_bias_correction_kl"] else "none",
            loss_agg=agg,
            horizon=int(cfg["max_completion_length"]) if agg == "constant" else None,
        )

    def lag_reason(self, cfg: Mapping[str, object]) -> str:
        return (
            f"num_iterations={cfg['num_iterations']} x steps_per_generation={cfg['steps_per_generation']} / "
            f"gradient_accumulation_steps={cfg['gradient_accumulation_steps']}"
        )

    def notes(self, cfg: Mapping[str, object]) -> list[str]:
        out = ["KL in the loss only (TRL's GRPOTrainer has no KL-in-reward option)"]
        if cfg["scale_rewards"] == "batch":
            out.append("scale_rewards=batch (std over the whole batch) is modelled by the group std")
        if cfg["loss_type"] == "dr_grpo":
            out.append("dr_grpo divides by B * max_completion_length (a constant: included in the nominal scale)")
        if cfg["importance_sampling_level"] == "sequence" and cfg["use_bias_correction_kl"]:
            out.append(
                "importance_sampling_level=sequence: the per-token KL is multiplied by the sequence-level ratio "
                "(TRL #6586)"
            )
        return out


class TRLPPO(Preset):
    name = "trl-ppo"
    title = "TRL PPOTrainer (0.x)"
    version = "0.x"
    functions = "trl PPOTrainer.train: logr = ref - logprobs, kl = -logr (k1) or expm1(logr) - logr (k3)"
    sources = "TRL 0.x: trl/trainer/ppo_trainer.py, ppo_config.py (absent from TRL 1.16)"
    keys = (
        Key("kl_coef", 0.05, "float"),
        Key("kl_estimator", "k1", "choice", ("k1", "k3")),
        Key("cliprange", 0.2, "float"),
        Key("gamma", 1.0, "float"),
        Key("lam", 0.95, "float", search=(1.0,)),
        Key("whiten_rewards", False, "bool", (False,), why="reward whitening is not modelled"),
        Key("num_ppo_epochs", 4, "int"),
        Key("num_mini_batches", 1, "int"),
    )
    search_keys = ("kl_estimator", "lam")
    lag_keys = ("num_ppo_epochs", "num_mini_batches")
    unit_keys = ("lam", "gamma")
    positive_keys = lag_keys

    def recipe(self, cfg: Mapping[str, object]) -> Recipe:
        coef = float(cfg["kl_coef"])
        return Recipe(
            name="trl-ppo",
            **kl_terms(reward=(cfg["kl_estimator"], coef) if coef != 0 else None),
            reward_credit="rtg",
            reward_lambda=float(cfg["gamma"]) * float(cfg["lam"]),
            whiten=True,
            whiten_std=True,
            pg_clip=clip_range(cfg, "cliprange"),
            pg_agg="token-mean",
        )

    def needs_critic(self, cfg: Mapping[str, object]) -> bool:
        return True

    def notes(self, cfg: Mapping[str, object]) -> list[str]:
        return [
            "GAE with the critic taken as 0: the advantage is the (gamma * lam)-discounted reward-to-go",
            "advantage whitening taken in its large-batch limit (a global positive scale)",
        ]


class TRLRLOO(Preset):
    name = "trl-rloo"
    title = "TRL RLOOTrainer"
    version = "1.16.0"
    functions = "trl.RLOOTrainer: rewards - beta * sum_t (old_logp - ref_logp), leave-one-out baseline"
    sources = "TRL 1.16: trl/trainer/rloo_trainer.py, trl/trainer/rloo_config.py"
    keys = (
        Key("beta", 0.05, "float"),
        Key("num_generations", 2, "int"),
        Key("normalize_advantages", False, "bool"),
        Key("epsilon", 0.2, "float"),
        Key("epsilon_high", None, "float", nullable=True),
        Key("num_iterations", 1, "int"),
        Key("steps_per_generation", None, "int", nullable=True),
        Key("gradient_accumulation_steps", 1, "int"),
    )
    search_keys = ("normalize_advantages",)
    group_key = "num_generations"
    lag_keys, rollout_keys, minibatch_key = TRLGRPO.lag_keys, TRLGRPO.rollout_keys, TRLGRPO.minibatch_key
    lag_reason = TRLGRPO.lag_reason
    positive_keys = ("gradient_accumulation_steps",)

    def validate(self, cfg: dict[str, object]) -> None:
        if cfg["num_generations"] < 2:
            raise PresetError("num_generations must be >= 2 for the leave-one-out baseline (as TRL)")

    def recipe(self, cfg: Mapping[str, object]) -> Recipe:
        beta = float(cfg["beta"])
        return Recipe(
            name="trl-rloo",
            **kl_terms(reward=("k1", beta) if beta != 0 else None),
            reward_credit="full",
            baseline="rloo",
            baseline_on="total",
            whiten=bool(cfg["normalize_advantages"]),
            pg_ratio="sequence_once",
            pg_clip=clip_range(cfg, "epsilon", "epsilon_high"),
            pg_agg="seq-mean-token-sum",
        )

    def notes(self, cfg: Mapping[str, object]) -> list[str]:
        out = ["k1 from the rollout log-probs, summed per response, subtracted from the reward (KL in reward)"]
        if cfg["normalize_advantages"]:
            out.append("normalize_advantages: whitening over the batch taken in its large-batch limit")
        return out
