"""OpenRLHF 0.11: ``models/utils.compute_approx_kl`` (k1/k2/k3, value clamped to +-10, k3's delta clamped from
below at -10; ``unbiased_gradient``: value kept, gradient w * grad k2 with w = min(pi/pi_old, 10) detached),
``compute_reward`` (KL in the token rewards, task reward at the last token), the experience maker's baselines
(applied to the task reward before the KL is added) and advantage whitening, and ``models/loss.aggregate_loss``.

Sources (OpenRLHF 0.11.2, as installed): openrlhf/models/utils.py (compute_approx_kl, compute_reward),
openrlhf/models/loss.py (PolicyLoss, aggregate_loss), openrlhf/trainer/ray/ppo_actor.py (the KL loss is
``aggregate_loss(kl, action_mask, **loss_batch_info)`` without ``token_level_loss``: always a global token mean,
whatever actor.loss_agg_mode says; PolicyLoss gets ``token_level_loss = loss_agg_mode == "token-mean"``),
openrlhf/trainer/ppo_trainer.py (steps = rollout.batch_size * n_samples_per_prompt / train.batch_size *
max_epochs), openrlhf/cli/train_ppo_ray.py (defaults).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..core.estimators import straight_through
from ..core.recipes import Recipe
from .base import Key, Preset, PresetError, clip_range, fixed_kl, kl_terms

KL_VALUES = {"k1": "k1_clamped", "k2": "k2_clamped", "k3": "k3_lowclamp"}
ESTIMATORS = ("gae", "reinforce", "rloo", "reinforce_baseline", "group_norm", "dr_grpo", "flash_reinforce")
BASELINE = {
    "gae": "none",
    "reinforce": "none",
    "rloo": "rloo",
    "reinforce_baseline": "batch_mean",
    "dr_grpo": "batch_mean",
    "flash_reinforce": "batch_mean",
    "group_norm": "grpo",
}
KL_IS_WEIGHT_CLIP = 10.0


class OpenRLHF(Preset):
    name = "openrlhf"
    title = "OpenRLHF"
    version = "0.11.2"
    functions = "openrlhf.models.utils.compute_approx_kl, compute_reward; openrlhf.models.loss.aggregate_loss"
    sources = (
        "OpenRLHF 0.11.2: openrlhf/models/utils.py, models/loss.py, trainer/ray/ppo_actor.py, cli/train_ppo_ray.py"
    )
    keys = (
        Key("algo.advantage.estimator", "gae", "choice", ESTIMATORS),
        Key("algo.advantage.no_std_norm", False, "bool"),
        Key("algo.advantage.gamma", 1.0, "float"),
        Key("algo.advantage.lambd", 1.0, "float"),
        Key("algo.kl.estimator", "k1", "choice", tuple(KL_VALUES)),
        Key("algo.kl.init_coef", 0.01, "float"),
        Key("algo.kl.use_loss", False, "bool"),
        Key("algo.kl.unbiased_gradient", False, "bool"),
        fixed_kl("algo.kl.target", None),
        Key("actor.eps_clip", 0.2, "float"),
        Key("actor.dual_clip", None, "float", nullable=True),
        Key("actor.loss_agg_mode", "token-mean", "choice", ("token-mean", "seq-mean-token-mean")),
        Key("actor.policy_loss_type", "ppo", "choice", ("ppo",), why="gspo (sequence-level ratio) is not modelled"),
        Key("rollout.n_samples_per_prompt", 1, "int"),
        Key("rollout.batch_size", 1024, "int"),
        Key("train.batch_size", 128, "int"),
        Key("train.max_epochs", 1, "int"),
    )
    search_keys = (
        "algo.kl.estimator",
        "algo.kl.use_loss",
        "algo.kl.unbiased_gradient",
        "algo.advantage.estimator",
        "actor.loss_agg_mode",
    )
    group_key = "rollout.n_samples_per_prompt"
    # steps = rollout.batch_size * n_samples_per_prompt / train.batch_size * max_epochs (ppo_trainer.py)
    lag_keys = ("train.max_epochs",)
    rollout_keys = ("rollout.batch_size", group_key)
    minibatch_key = "train.batch_size"
    unit_keys = ("algo.advantage.gamma", "algo.advantage.lambd")
    positive_keys = ("rollout.batch_size", "train.batch_size", "train.max_epochs")
    dual_clip_keys = ("actor.dual_clip",)
    critic_when = ("algo.advantage.estimator", "gae")

    def validate(self, cfg: dict[str, object]) -> None:
        adv = cfg["algo.advantage.estimator"]
        if adv in ("rloo", "reinforce_baseline", "group_norm", "dr_grpo") and cfg["rollout.n_samples_per_prompt"] < 2:
            raise PresetError(f"algo.advantage.estimator={adv} requires rollout.n_samples_per_prompt > 1 (as OpenRLHF)")

    def recipe(self, cfg: Mapping[str, object]) -> Recipe:
        est = KL_VALUES[cfg["algo.kl.estimator"]]
        adv = cfg["algo.advantage.estimator"]
        use_loss, coef = cfg["algo.kl.use_loss"], max(float(cfg["algo.kl.init_coef"]), 0.0)
        unbiased = use_loss and cfg["algo.kl.unbiased_gradient"]
        loss_est = straight_through(est, "k2", name=f"{est}_st_k2") if unbiased else est
        return Recipe(
            name="openrlhf",
            **kl_terms(reward=None if use_loss else (est, coef), loss=(loss_est, coef) if use_loss else None),
            reward_credit="rtg",
            # compute_reward puts the KL on every token; GAE (critic 0) / REINFORCE returns discount by
            # gamma * lambd (gae) or gamma (the others), see experience_maker.get_cumulative_returns
            reward_lambda=self.discount(cfg),
            baseline=BASELINE[adv],
            baseline_on="task",
            grpo_eps=1e-9,
            whiten=adv in ("gae", "reinforce", "reinforce_baseline"),
            whiten_std=not cfg["algo.advantage.no_std_norm"],
            pg_clip=clip_range(cfg, "actor.eps_clip"),
            pg_dual_clip=cfg["actor.dual_clip"],
            log_ratio_clamp=20.0,
            pg_agg=cfg["actor.loss_agg_mode"],
            loss_weight="ratio_detached_grad" if unbiased else "none",
            loss_weight_clamp=KL_IS_WEIGHT_CLIP if unbiased else None,
            loss_agg="token-mean",  # ppo_actor.py: aggregate_loss(kl, mask, **loss_batch_info), token_level_loss unset
        )

    @staticmethod
    def discount(cfg: Mapping[str, object]) -> float:
        """GAE (critic 0): gamma * lambd; reinforce: gamma; the other estimators force gamma = 1
        (experience_maker.py: "gamma is set to 1.0 for ...")."""
        adv = cfg["algo.advantage.estimator"]
        if adv == "gae":
            return float(cfg["algo.advantage.gamma"]) * float(cfg["algo.advantage.lambd"])
        return float(cfg["algo.advantage.gamma"]) if adv == "reinforce" else 1.0

    def notes(self, cfg: Mapping[str, object]) -> list[str]:
        out = []
        if cfg["algo.advantage.estimator"] == "gae":
            out.append("gae with the critic taken as 0: the advantage is the (gamma * lambd)-discounted reward-to-go")
        if cfg["algo.kl.use_loss"]:
            out.append("the KL loss is a global token mean whatever actor.loss_agg_mode says (ppo_actor.py)")
        if cfg["algo.advantage.estimator"] in ("gae", "reinforce", "reinforce_baseline"):
            out.append(
                "advantage whitening over the rollout batch is taken in its large-batch limit (population mean "
                "and std): a global positive scale, included in the nominal scale"
            )
        return out
