"""TRL: ``GRPOTrainer._compute_loss`` (TRL 1.16; k3 in the loss, unclamped, times the differentiable ratio
exp(logp - logp_old) when ``use_bias_correction_kl``; ``loss_type`` picks the aggregation) and the PPO trainer
of TRL's 0.x line (k1 or k3 from the rollout log-probs in the token rewards, GAE with ``gamma``/``lam``,
whitened advantages, clipped ratio, token-mean loss; TRL 1.16 no longer ships it).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..recipes import Recipe
from .base import Key, Preset, PresetError

LOSS_TYPES = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dapo": "token-mean", "dr_grpo": "constant"}


class TRLGRPO(Preset):
    name = "trl-grpo"
    title = "TRL GRPOTrainer"
    version = "1.16.0"
    functions = "trl.GRPOTrainer._compute_loss (inline KL; TRL has no standalone KL function)"
    keys = (
        Key("beta", 0.0, "float"),
        Key("loss_type", "dapo", "choice", tuple(LOSS_TYPES)),
        Key("use_bias_correction_kl", True, "bool"),
        Key("epsilon", 0.2, "float"),
        Key("epsilon_high", None, "float", nullable=True),
        Key("num_generations", 8, "int"),
        Key("scale_rewards", "group", "choice", ("group", "batch", "none")),
        Key("importance_sampling_level", "token", "choice", ("token",)),
        Key("max_completion_length", 256, "int"),
    )
    search_keys = ("use_bias_correction_kl", "loss_type", "scale_rewards")

    def recipe(self, cfg: Mapping[str, object]) -> Recipe:
        beta = float(cfg["beta"])
        eps = float(cfg["epsilon"])
        hi = eps if cfg["epsilon_high"] is None else float(cfg["epsilon_high"])
        agg = LOSS_TYPES[cfg["loss_type"]]
        return Recipe(
            name="trl-grpo",
            baseline="grpo" if cfg["scale_rewards"] != "none" else "batch_mean",
            grpo_eps=1e-4,
            pg_ratio="token",
            pg_clip=(eps, hi),
            pg_agg=agg,
            loss_estimator="k3" if beta != 0 else None,
            loss_coef=beta,
            loss_weight="ratio" if cfg["use_bias_correction_kl"] else "none",
            loss_agg=agg,
            horizon=None,
        )

    def enable_kl(self, cfg: dict[str, object]) -> tuple[dict[str, object], dict[str, object]]:
        changed = {"beta": 0.04}
        return {**cfg, **changed}, changed

    def group_size(self, cfg: Mapping[str, object]) -> int:
        return int(cfg["num_generations"])

    def notes(self, cfg: Mapping[str, object]) -> list[str]:
        out = ["KL in the loss only (TRL's GRPOTrainer has no KL-in-reward option)"]
        if cfg["scale_rewards"] == "batch":
            out.append("scale_rewards=batch (std over the whole batch) is modelled by the group std")
        if cfg["loss_type"] == "dr_grpo":
            out.append("dr_grpo divides by B * max_completion_length; the toy uses its own T as that constant")
        return out


class TRLPPO(Preset):
    name = "trl-ppo"
    title = "TRL PPOTrainer (0.x)"
    version = "0.x"
    functions = "trl PPOTrainer.train: logr = ref - logprobs, kl = -logr (k1) or expm1(logr) - logr (k3)"
    keys = (
        Key("kl_coef", 0.05, "float"),
        Key("kl_estimator", "k1", "choice", ("k1", "k3")),
        Key("cliprange", 0.2, "float"),
        Key("gamma", 1.0, "float", (1.0,)),
        Key("lam", 0.95, "float"),
        Key("whiten_rewards", False, "bool"),
        Key("num_ppo_epochs", 4, "int"),
    )
    search_keys = ("kl_estimator", "lam")

    def validate(self, cfg: dict[str, object]) -> None:
        if cfg["whiten_rewards"]:
            raise PresetError("whiten_rewards=true is not modelled; accepted values: false")
        if not 0.0 <= cfg["lam"] <= 1.0:
            raise PresetError(f"lam must lie in [0, 1], got {cfg['lam']}")

    def search_values(self, name: str, cfg: Mapping[str, object]) -> list[object]:
        if name == "lam":
            return [v for v in (1.0,) if v != cfg[name]]
        return super().search_values(name, cfg)

    def recipe(self, cfg: Mapping[str, object]) -> Recipe:
        eps = float(cfg["cliprange"])
        coef = float(cfg["kl_coef"])
        return Recipe(
            name="trl-ppo",
            reward_estimator=cfg["kl_estimator"] if coef != 0 else None,
            reward_coef=coef,
            reward_credit="rtg",
            reward_lambda=float(cfg["gamma"]) * float(cfg["lam"]),
            whiten=True,
            whiten_std=True,
            pg_ratio="token",
            pg_clip=(eps, eps),
            pg_agg="token-mean",
        )

    def enable_kl(self, cfg: dict[str, object]) -> tuple[dict[str, object], dict[str, object]]:
        return dict(cfg), {}

    def notes(self, cfg: Mapping[str, object]) -> list[str]:
        return [
            "GAE with the critic taken as 0: the advantage is the (gamma * lam)-discounted reward-to-go",
            "advantage whitening taken in its large-batch limit (a global positive scale)",
        ]
