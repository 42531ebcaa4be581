"""verl 0.9: ``core_algos.kl_penalty`` (in reward via ``apply_kl_penalty``, in loss via the actor's ``use_kl_loss``),
``compute_policy_loss_vanilla`` (PPO clip, dual clip, log-ratio clamped to +-20) and ``agg_loss``.

kl_penalty values: kl/k1 = delta; abs; mse/k2 = delta^2/2; low_var_kl/k3 = k3 with delta clamped to +-20 and the
value to +-10; a "+" suffix keeps the value and backpropagates k2 (straight-through; k2+/mse+ are plain k2).
In-reward KL is computed from the rollout (old) log-probs, detached, as token rewards r_t = score - beta k_t.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..recipes import Recipe
from .base import Key, Preset, PresetError, estimator_of

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
AGG = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
A = "actor_rollout_ref.actor."


class Verl(Preset):
    name = "verl"
    title = "verl"
    version = "0.9.1"
    functions = "verl.trainer.ppo.core_algos.kl_penalty, agg_loss, compute_policy_loss_vanilla, apply_kl_penalty"
    keys = (
        Key("algorithm.adv_estimator", "gae", "choice", ("gae", "grpo", "rloo"), help="gae: critic taken as 0"),
        Key("algorithm.norm_adv_by_std_in_grpo", True, "bool"),
        Key("algorithm.use_kl_in_reward", False, "bool"),
        Key("algorithm.kl_penalty", "kl", "choice", tuple(KL_TYPES)),
        Key("algorithm.kl_ctrl.kl_coef", 0.001, "float"),
        Key("algorithm.kl_ctrl.type", "fixed", "choice", ("fixed", "adaptive")),
        Key("algorithm.gamma", 1.0, "float", (1.0,)),
        Key("algorithm.lam", 1.0, "float", (1.0,)),
        Key(A + "use_kl_loss", False, "bool"),
        Key(A + "kl_loss_type", "low_var_kl", "choice", tuple(KL_TYPES)),
        Key(A + "kl_loss_coef", 0.001, "float"),
        Key(A + "loss_agg_mode", "token-mean", "choice", AGG),
        Key(A + "loss_scale_factor", None, "int", nullable=True),
        Key(A + "clip_ratio", 0.2, "float"),
        Key(A + "clip_ratio_low", 0.2, "float", nullable=True),
        Key(A + "clip_ratio_high", 0.2, "float", nullable=True),
        Key(A + "clip_ratio_c", 3.0, "float"),
        Key(A + "policy_loss.loss_mode", "vanilla", "choice", ("vanilla",)),
        Key(A + "ppo_epochs", 1, "int"),
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

    def validate(self, cfg: dict[str, object]) -> None:
        if cfg[A + "clip_ratio_c"] <= 1.0:
            raise PresetError(f"{A}clip_ratio_c must be > 1 (verl asserts it), got {cfg[A + 'clip_ratio_c']}")
        if cfg["actor_rollout_ref.rollout.n"] < 1:
            raise PresetError("actor_rollout_ref.rollout.n must be >= 1")

    def recipe(self, cfg: Mapping[str, object]) -> Recipe:
        adv = cfg["algorithm.adv_estimator"]
        baseline = {"gae": "none", "rloo": "rloo"}.get(
            adv, "grpo" if cfg["algorithm.norm_adv_by_std_in_grpo"] else "batch_mean"
        )
        clip = cfg[A + "clip_ratio"]
        lo = cfg[A + "clip_ratio_low"] if cfg[A + "clip_ratio_low"] is not None else clip
        hi = cfg[A + "clip_ratio_high"] if cfg[A + "clip_ratio_high"] is not None else clip
        use_r, use_l = cfg["algorithm.use_kl_in_reward"], cfg[A + "use_kl_loss"]
        return Recipe(
            name="verl",
            reward_estimator=estimator_of(KL_TYPES, "algorithm.kl_penalty", cfg["algorithm.kl_penalty"])
            if use_r
            else None,
            reward_coef=float(cfg["algorithm.kl_ctrl.kl_coef"]) if use_r else 0.0,
            reward_credit="rtg" if adv == "gae" else "full",
            baseline=baseline,
            baseline_on="total",
            grpo_eps=1e-6,
            whiten=adv == "gae",
            pg_ratio="token",
            pg_clip=(lo, hi),
            pg_dual_clip=float(cfg[A + "clip_ratio_c"]),
            log_ratio_clamp=20.0,
            pg_agg=cfg[A + "loss_agg_mode"],
            loss_estimator=estimator_of(KL_TYPES, A + "kl_loss_type", cfg[A + "kl_loss_type"]) if use_l else None,
            loss_coef=float(cfg[A + "kl_loss_coef"]) if use_l else 0.0,
            loss_agg=cfg[A + "loss_agg_mode"],
            horizon=cfg[A + "loss_scale_factor"],
        )

    def enable_kl(self, cfg: dict[str, object]) -> tuple[dict[str, object], dict[str, object]]:
        changed = {A + "use_kl_loss": True}
        return {**cfg, **changed}, changed

    def group_size(self, cfg: Mapping[str, object]) -> int:
        return int(cfg["actor_rollout_ref.rollout.n"])

    def notes(self, cfg: Mapping[str, object]) -> list[str]:
        out = []
        if cfg["algorithm.adv_estimator"] == "gae":
            out.append(
                "gae with gamma = lam = 1 and the critic taken as 0: the advantage is the reward-to-go, whitened "
                "over the batch (taken in its large-batch limit: a global positive scale)"
            )
        if cfg["algorithm.kl_ctrl.type"] == "adaptive":
            out.append("adaptive KL control changes beta between steps; one step is audited at its current beta")
        return out
