"""AReaL (inclusionAI/AReaL, late 2026): the actor subtracts ``kl_ctl`` times a KL estimator of the old vs
reference log-probs (k1 / k2 / k3, value clamped to +-10) from the token rewards; GAE (no critic in the GRPO-style
default: values 0) with ``discount`` and ``gae_lambda``; then per-token advantage normalisation by batch or group.

Sources (AReaL main, late 2026): areal/engine/ppo/actor.py (PPOActor.compute_advantages: reward = -kl_ctl *
KLEstimator(old_logp, ref_logp), task reward at the last token, GAE, adv_norm), areal/utils/functional.py
(KLEstimator), areal/api/cli_args.py (PPOActorConfig defaults: kl_ctl 0.1, kl_estimator k1, discount 1.0,
gae_lambda 1.0, ppo_n_minibatches 4, adv_norm batch mean/std).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..core.estimators import clamped
from ..core.recipes import Recipe
from .base import Key, Preset, clip_range, kl_terms

KL = {name: clamped(name, output_clamp=10.0, name=f"{name}_areal") for name in ("k1", "k2", "k3")}
P = "actor."


class AReaL(Preset):
    name = "areal"
    title = "AReaL"
    version = "main (late 2026)"
    functions = "areal.engine.ppo.actor.PPOActor.compute_advantages, areal.utils.functional.KLEstimator"
    sources = "AReaL main (late 2026): areal/engine/ppo/actor.py, areal/utils/functional.py, areal/api/cli_args.py"
    keys = (
        Key(P + "kl_ctl", 0.1, "float"),
        Key(P + "kl_estimator", "k1", "choice", tuple(KL)),
        Key(P + "discount", 1.0, "float"),
        Key(P + "gae_lambda", 1.0, "float"),
        Key(P + "adv_norm.mean_level", "batch", "choice", ("batch", "group", "none")),
        Key(P + "adv_norm.std_level", "batch", "choice", ("batch", "group", "none")),
        Key(P + "eps_clip", 0.2, "float"),
        Key(P + "ppo_n_minibatches", 4, "int"),
        Key("gconfig.n_samples", 4, "int"),
    )
    search_keys = (P + "kl_estimator", P + "adv_norm.std_level", P + "adv_norm.mean_level")
    group_key = "gconfig.n_samples"
    lag_keys = (P + "ppo_n_minibatches",)
    unit_keys = (P + "discount", P + "gae_lambda")

    def recipe(self, cfg: Mapping[str, object]) -> Recipe:
        coef = float(cfg[P + "kl_ctl"])
        mean_lvl, std_lvl = cfg[P + "adv_norm.mean_level"], cfg[P + "adv_norm.std_level"]
        return Recipe(
            name="areal",
            **kl_terms(reward=(KL[cfg[P + "kl_estimator"]], coef) if coef != 0 else None),
            reward_credit="rtg",
            reward_lambda=float(cfg[P + "discount"]) * float(cfg[P + "gae_lambda"]),
            baseline="none",
            whiten=mean_lvl != "none" or std_lvl != "none",
            whiten_std=std_lvl != "none",
            pg_clip=clip_range(cfg, P + "eps_clip"),
            pg_agg="token-mean",
        )

    def notes(self, cfg: Mapping[str, object]) -> list[str]:
        out = ["KL in the token rewards from the old log-probs, GAE with values 0: the discounted reward-to-go"]
        if cfg[P + "adv_norm.mean_level"] == "group" or cfg[P + "adv_norm.std_level"] == "group":
            out.append("group-level advantage normalisation is modelled by the batch-level one (large-batch limit)")
        return out
