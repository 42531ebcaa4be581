"""verl 0.9: ``core_algos.kl_penalty`` (in reward via ``apply_kl_penalty``, in loss via the actor's ``use_kl_loss``),
``compute_policy_loss_vanilla`` (PPO clip, dual clip, log-ratio clamped to +-20) and ``agg_loss``.

kl_penalty values: kl/k1 = delta; abs; mse/k2 = delta^2/2; low_var_kl/k3 = k3 with delta clamped to +-20 and the
value to +-10; a "+" suffix keeps the value and backpropagates k2 (straight-through; k2+/mse+ are plain k2).
In-reward KL is computed from the rollout (old) log-probs, detached, as token rewards r_t = score - beta k_t.

Sources (verl 0.9.1, as installed): verl/trainer/ppo/core_algos.py (kl_penalty, agg_loss,
compute_policy_loss_vanilla, compute_gae_advantage_return, compute_grpo_outcome_advantage,
compute_rloo_outcome_advantage, compute_reinforce_plus_plus_outcome_advantage (discounted returns with
algorithm.gamma, then masked_whiten), compute_reinforce_plus_plus_baseline_outcome_advantage (summed score minus
the group mean, broadcast, masked_whiten)), verl/trainer/ppo/ray_trainer.py (apply_kl_penalty, the PPO epochs /
mini-batches per rollout), verl/trainer/config/_generated_ppo_trainer.yaml (defaults).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..core.recipes import Recipe
from .base import Key, Preset, fixed_kl, kl_terms

KL_TYPES: dict[str, str] = {
    "kl": "k1",
    "k1": "k1",
    "abs": "abs",
    "mse": "k2",
    "k2": "k2",
    "low_var_kl": "k3_clamped",
    "k3": "k3_clamped",
    "kl+": "k1_st_k2",
    "k1+": "k1_st_k2",
    "abs+": "abs_st_k2",
    "mse+": "k2",
    "k2+": "k2",
    "low_var_kl+": "k3_st_k2",
    "k3+": "k3_st_k2",
}
ADV = ("gae", "grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")
AGG = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
A = "actor_rollout_ref.actor."


class Verl(Preset):
    name = "verl"
    title = "verl"
    version = "0.9.1"
    functions = "verl.trainer.ppo.core_algos.kl_penalty, agg_loss, compute_policy_loss_vanilla, apply_kl_penalty"
    sources = "verl 0.9.1: verl/trainer/ppo/core_algos.py, ray_trainer.py, config/_generated_ppo_trainer.yaml"
    keys = (
        Key(
            "algorithm.adv_estimator",
            "gae",
            "choice",
            ADV,
            why="other estimators (remax, opo, gdpo, grpo_passk, ...) are not modelled",
        ),
        Key("algorithm.norm_adv_by_std_in_grpo", True, "bool"),
        Key("algorithm.use_kl_in_reward", False, "bool"),
        Key("algorithm.kl_penalty", "kl", "choice", tuple(KL_TYPES)),
        Key("algorithm.kl_ctrl.kl_coef", 0.001, "float"),
        fixed_kl("algorithm.kl_ctrl.type"),
        Key("algorithm.gamma", 1.0, "float"),
        Key("algorithm.lam", 1.0, "float"),
        Key(A + "use_kl_loss", False, "bool"),
        Key(A + "kl_loss_type", "low_var_kl", "choice", tuple(KL_TYPES)),
        Key(A + "kl_loss_coef", 0.001, "float"),
        Key(A + "loss_agg_mode", "token-mean", "choice", AGG),
        Key(A + "loss_scale_factor", None, "int", nullable=True),
        Key(A + "clip_ratio", 0.2, "float"),
        Key(A + "clip_ratio_low", 0.2, "float", nullable=True),
        Key(A + "clip_ratio_high", 0.2, "float", nullable=True),
        Key(A + "clip_ratio_c", 3.0, "float"),
        Key(
            A + "policy_loss.loss_mode",
            "vanilla",
            "choice",
            ("vanilla",),
            why="only compute_policy_loss_vanilla is modelled",
        ),
        Key(A + "ppo_epochs", 1, "int"),
        Key(A + "ppo_mini_batch_size", 256, "int"),
        Key("data.train_batch_size", 1024, "int"),
        Key("data.max_response_length", 512, "int"),
        Key("actor_rollout_ref.rollout.n", 1, "int"),
    )
    search_keys = (
        "algorithm.use_kl_in_reward",
        A + "use_kl_loss",
        "algorithm.kl_penalty",
        A + "kl_loss_type",
        A + "loss_agg_mode",
        "algorithm.adv_estimator",
        "algorithm.norm_adv_by_std_in_grpo",
    )
    group_key = "actor_rollout_ref.rollout.n"
    kl_switch = {A + "use_kl_loss": True}
    # ppo_epochs x (train_batch_size / ppo_mini_batch_size) optimizer steps per rollout batch (both sizes count
    # prompts in verl 0.9; ray_trainer.py splits the batch into mini-batches for each epoch)
    lag_keys = (A + "ppo_epochs",)
    rollout_keys = ("data.train_batch_size",)
    minibatch_key = A + "ppo_mini_batch_size"
    unit_keys = ("algorithm.gamma", "algorithm.lam")
    positive_keys = (group_key, A + "ppo_epochs", A + "ppo_mini_batch_size", "data.train_batch_size")
    dual_clip_keys = (A + "clip_ratio_c",)
    critic_when = ("algorithm.adv_estimator", "gae")

    def recipe(self, cfg: Mapping[str, object]) -> Recipe:
        adv = cfg["algorithm.adv_estimator"]
        baseline = {
            "gae": "none",
            "rloo": "rloo",
            "reinforce_plus_plus": "none",
            "reinforce_plus_plus_baseline": "batch_mean",
        }.get(adv, "grpo" if cfg["algorithm.norm_adv_by_std_in_grpo"] else "batch_mean")
        # token-level credit: gae (critic 0: discount gamma * lam) and reinforce_plus_plus (discount gamma)
        per_token = adv in ("gae", "reinforce_plus_plus")
        discount = float(cfg["algorithm.gamma"]) * (float(cfg["algorithm.lam"]) if adv == "gae" else 1.0)
        clip = cfg[A + "clip_ratio"]
        lo = cfg[A + "clip_ratio_low"] if cfg[A + "clip_ratio_low"] is not None else clip
        hi = cfg[A + "clip_ratio_high"] if cfg[A + "clip_ratio_high"] is not None else clip
        reward = KL_TYPES[cfg["algorithm.kl_penalty"]]
        loss = KL_TYPES[cfg[A + "kl_loss_type"]]
        return Recipe(
            name="verl",
            **kl_terms(
                reward=(reward, cfg["algorithm.kl_ctrl.kl_coef"]) if cfg["algorithm.use_kl_in_reward"] else None,
                loss=(loss, cfg[A + "kl_loss_coef"]) if cfg[A + "use_kl_loss"] else None,
            ),
            reward_credit="rtg" if per_token else "full",
            reward_lambda=discount if per_token else 1.0,
            baseline=baseline,
            baseline_on="total",
            grpo_eps=1e-6,
            whiten=adv in ("gae", "reinforce_plus_plus", "reinforce_plus_plus_baseline"),
            pg_clip=(lo, hi),
            pg_dual_clip=float(cfg[A + "clip_ratio_c"]),
            log_ratio_clamp=20.0,
            pg_agg=cfg[A + "loss_agg_mode"],
            loss_agg=cfg[A + "loss_agg_mode"],
            horizon=cfg[A + "loss_scale_factor"],
        )

    def lag_reason(self, cfg: Mapping[str, object]) -> str:
        return (
            f"{A}ppo_epochs={cfg[A + 'ppo_epochs']} x data.train_batch_size={cfg['data.train_batch_size']} / "
            f"{A}ppo_mini_batch_size={cfg[A + 'ppo_mini_batch_size']}"
        )

    def companions(self, changes: Mapping[str, object], cfg: Mapping[str, object]) -> dict[str, object]:
        """seq-mean-token-sum-norm divides by loss_scale_factor, else by the micro-batch's padded length (which
        depends on the sampled lengths): a suggestion of that mode sets it to data.max_response_length."""
        if changes.get(A + "loss_agg_mode") == "seq-mean-token-sum-norm" and cfg.get(A + "loss_scale_factor") is None:
            return {A + "loss_scale_factor": int(cfg["data.max_response_length"])}
        return {}

    def notes(self, cfg: Mapping[str, object]) -> list[str]:
        out = []
        adv = cfg["algorithm.adv_estimator"]
        if adv == "gae":
            out.append(
                "gae with the critic taken as 0: the advantage is the (gamma * lam)-discounted reward-to-go, whitened "
                "over the batch (taken in its large-batch limit: a global positive scale)"
            )
        if adv in ("reinforce_plus_plus", "reinforce_plus_plus_baseline"):
            out.append(f"{adv}: advantages whitened over the batch (taken in its large-batch limit)")
        if cfg[A + "loss_agg_mode"] == "seq-mean-token-sum-norm" and cfg[A + "loss_scale_factor"] is None:
            out.append(
                "seq-mean-token-sum-norm with loss_scale_factor null divides by the micro-batch's padded length, which "
                "depends on the sampled lengths; the toy pads to T (set loss_scale_factor to a constant)"
            )
        return out
