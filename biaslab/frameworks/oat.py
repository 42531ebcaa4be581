"""Oat (sail-sg/oat, late 2026) PPO/GRPO learner: ``kl_penalty_coef`` (default 0) puts k1 of the old vs reference
log-probs into the token rewards; ``beta`` (default 0.1) adds k3, its log-ratio clamped to +-40,
to the loss, averaged per response then over the batch.

Sources (oat main, late 2026): oat/algorithms/ppo.py (PPOLearner: rewards -= kl_penalty_coef * kl per token;
the k3 KL loss with beta; critic_type grpo: group mean/std of the task reward), oat/args.py (defaults).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..core.estimators import clamped
from ..core.recipes import Recipe
from .base import Key, Preset, clip_range, kl_terms

K3_OAT = clamped("k3", input_clamp=40.0, name="k3_oat")


class Oat(Preset):
    name = "oat"
    title = "Oat"
    version = "main (late 2026)"
    functions = "oat.algorithms.ppo.PPOLearner (KL reward and k3 KL loss)"
    sources = "oat main (late 2026): oat/algorithms/ppo.py, oat/args.py"
    keys = (
        Key("beta", 0.1, "float"),
        Key("kl_penalty_coef", 0.0, "float"),
        Key("critic_type", "grpo", "choice", ("grpo", "drgrpo"), why="ppo (a trained critic) is not modelled"),
        Key("num_samples", 8, "int"),
        Key("num_ppo_epochs", 1, "int"),
        Key("cliprange", 0.2, "float"),
    )
    search_keys = ("critic_type",)
    group_key = "num_samples"
    lag_keys = ("num_ppo_epochs",)

    def recipe(self, cfg: Mapping[str, object]) -> Recipe:
        beta, kp = float(cfg["beta"]), float(cfg["kl_penalty_coef"])
        return Recipe(
            name="oat",
            **kl_terms(reward=("k1", kp) if kp != 0 else None, loss=(K3_OAT, beta) if beta != 0 else None),
            reward_credit="rtg",
            baseline="grpo" if cfg["critic_type"] == "grpo" else "batch_mean",
            baseline_on="task",
            pg_clip=clip_range(cfg, "cliprange"),
            pg_agg="seq-mean-token-mean" if cfg["critic_type"] == "grpo" else "constant",
            loss_agg="seq-mean-token-mean",
        )
