"""EasyR1 (hiyouga/EasyR1, late 2026), a verl fork: one ``algorithm.kl_penalty`` / ``algorithm.kl_coef`` for the
KL in the reward (``use_kl_loss: false``) or in the loss (``use_kl_loss: true``), verl's estimators and clamps;
``disable_kl`` switches it off; the actor's ``loss_avg_mode`` (token | seq) aggregates.

Sources (EasyR1 main, late 2026): verl/trainer/core_algos.py (kl_penalty, compute_kl, the advantage estimators),
verl/workers/actor/dp_actor.py (KL loss, average_loss), verl/trainer/config.py and examples/config.yaml (defaults:
adv_estimator grpo, use_kl_loss true, kl_penalty low_var_kl, kl_coef 1e-2, rollout.n 5, data.rollout_batch_size 512,
worker.actor.global_batch_size 128).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..core.recipes import Recipe
from .base import Key, Preset, clip_range, fixed_kl, kl_terms
from .verl import KL_TYPES

KL = {k: v for k, v in KL_TYPES.items() if not k.endswith("+")}
AVG = {"token": "token-mean", "seq": "seq-mean-token-mean"}


class EasyR1(Preset):
    name = "easyr1"
    title = "EasyR1"
    version = "main (late 2026)"
    functions = "verl.trainer.core_algos.kl_penalty (EasyR1's verl fork)"
    sources = (
        "EasyR1 main (late 2026): verl/trainer/core_algos.py, verl/workers/actor/dp_actor.py, examples/config.yaml"
    )
    keys = (
        Key(
            "algorithm.adv_estimator",
            "grpo",
            "choice",
            ("grpo", "rloo", "reinforce_plus_plus"),
            why="gae / remax are not modelled",
        ),
        Key("algorithm.disable_kl", False, "bool"),
        Key("algorithm.use_kl_loss", True, "bool"),
        Key("algorithm.kl_penalty", "low_var_kl", "choice", tuple(KL)),
        Key("algorithm.kl_coef", 1e-2, "float"),
        fixed_kl("algorithm.kl_type"),
        Key("worker.actor.loss_avg_mode", "token", "choice", tuple(AVG)),
        Key("worker.actor.clip_ratio_low", 0.2, "float"),
        Key("worker.actor.clip_ratio_high", 0.3, "float"),
        Key("worker.actor.ppo_epochs", 1, "int"),
        Key("worker.actor.global_batch_size", 128, "int"),
        Key("data.rollout_batch_size", 512, "int"),
        Key("worker.rollout.n", 5, "int"),
    )
    search_keys = (
        "algorithm.use_kl_loss",
        "algorithm.kl_penalty",
        "algorithm.adv_estimator",
        "worker.actor.loss_avg_mode",
    )
    group_key = "worker.rollout.n"
    lag_keys = ("worker.actor.ppo_epochs",)
    rollout_keys = ("data.rollout_batch_size",)
    minibatch_key = "worker.actor.global_batch_size"
    positive_keys = ("worker.actor.global_batch_size", "data.rollout_batch_size")

    def recipe(self, cfg: Mapping[str, object]) -> Recipe:
        adv = cfg["algorithm.adv_estimator"]
        on = not cfg["algorithm.disable_kl"] and float(cfg["algorithm.kl_coef"]) != 0
        term = (KL[cfg["algorithm.kl_penalty"]], cfg["algorithm.kl_coef"])
        agg = AVG[cfg["worker.actor.loss_avg_mode"]]
        return Recipe(
            name="easyr1",
            **kl_terms(
                reward=term if on and not cfg["algorithm.use_kl_loss"] else None,
                loss=term if on and cfg["algorithm.use_kl_loss"] else None,
            ),
            reward_credit="rtg" if adv == "reinforce_plus_plus" else "full",
            baseline={"grpo": "grpo", "rloo": "rloo"}.get(adv, "none"),
            baseline_on="total",
            whiten=adv == "reinforce_plus_plus",
            pg_clip=clip_range(cfg, "worker.actor.clip_ratio_low", "worker.actor.clip_ratio_high"),
            log_ratio_clamp=20.0,
            pg_agg=agg,
            loss_agg=agg,
        )

    def enable_kl(self, cfg: dict[str, object]) -> tuple[dict[str, object], dict[str, object]]:
        changed = {"algorithm.disable_kl": False} if cfg["algorithm.disable_kl"] else {}
        return {**cfg, **changed}, changed
