"""OpenRLHF 0.11: ``models/utils.compute_approx_kl`` (k1/k2/k3, value clamped to +-10, k3's delta clamped from
below at -10; ``unbiased_gradient``: value kept, gradient w * grad k2 with w = min(pi/pi_old, 10) detached),
``compute_reward`` (KL in the token rewards, task reward at the last token), the experience maker's baselines
(applied to the task reward before the KL is added) and advantage whitening, and ``models/loss.aggregate_loss``.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..estimators import straight_through
from ..recipes import Recipe
from .base import Key, Preset, PresetError, estimator_of

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
    keys = (
        Key("algo.advantage.estimator", "gae", "choice", ESTIMATORS, help="gae: critic taken as 0"),
        Key("algo.advantage.no_std_norm", False, "bool"),
        Key("algo.advantage.gamma", 1.0, "float", (1.0,)),
        Key("algo.advantage.lambd", 1.0, "float", (1.0,)),
        Key("algo.kl.estimator", "k1", "choice", tuple(KL_VALUES)),
        Key("algo.kl.init_coef", 0.01, "float"),
        Key("algo.kl.use_loss", False, "bool"),
        Key("algo.kl.unbiased_gradient", False, "bool"),
        Key("algo.kl.target", None, "float", nullable=True),
        Key("actor.eps_clip", 0.2, "float"),
        Key("actor.dual_clip", None, "float", nullable=True),
        Key("actor.loss_agg_mode", "token-mean", "choice", ("token-mean", "seq-mean-token-mean")),
        Key("actor.policy_loss_type", "ppo", "choice", ("ppo",)),
        Key("rollout.n_samples_per_prompt", 1, "int"),
    )
    search_keys = (
        "algo.kl.estimator",
        "algo.kl.use_loss",
        "algo.kl.unbiased_gradient",
        "algo.advantage.estimator",
        "actor.loss_agg_mode",
    )

    def validate(self, cfg: dict[str, object]) -> None:
        if cfg["actor.dual_clip"] is not None and cfg["actor.dual_clip"] <= 1.0:
            raise PresetError(f"actor.dual_clip must be > 1 (OpenRLHF asserts it), got {cfg['actor.dual_clip']}")
        adv = cfg["algo.advantage.estimator"]
        if adv in ("rloo", "reinforce_baseline", "group_norm", "dr_grpo") and cfg["rollout.n_samples_per_prompt"] < 2:
            raise PresetError(f"algo.advantage.estimator={adv} requires rollout.n_samples_per_prompt > 1 (as OpenRLHF)")

    def recipe(self, cfg: Mapping[str, object]) -> Recipe:
        est = estimator_of(KL_VALUES, "algo.kl.estimator", cfg["algo.kl.estimator"])
        adv = cfg["algo.advantage.estimator"]
        use_loss, coef = cfg["algo.kl.use_loss"], max(float(cfg["algo.kl.init_coef"]), 0.0)
        unbiased = use_loss and cfg["algo.kl.unbiased_gradient"]
        loss_est = straight_through(est, "k2", name=f"{est}_st_k2") if unbiased else est
        eps = float(cfg["actor.eps_clip"])
        return Recipe(
            name="openrlhf",
            reward_estimator=None if use_loss else est,
            reward_coef=0.0 if use_loss else coef,
            reward_credit="rtg",
            baseline=BASELINE[adv],
            baseline_on="task",
            grpo_eps=1e-9,
            whiten=adv in ("gae", "reinforce", "reinforce_baseline"),
            whiten_std=not cfg["algo.advantage.no_std_norm"],
            pg_ratio="token",
            pg_clip=(eps, eps),
            pg_dual_clip=cfg["actor.dual_clip"],
            log_ratio_clamp=20.0,
            pg_agg=cfg["actor.loss_agg_mode"],
            loss_estimator=loss_est if use_loss else None,
            loss_coef=coef if use_loss else 0.0,
            loss_weight="ratio_detached_grad" if unbiased else "none",
            loss_weight_clamp=KL_IS_WEIGHT_CLIP if unbiased else None,
            loss_agg=cfg["actor.loss_agg_mode"],
        )

    def enable_kl(self, cfg: dict[str, object]) -> tuple[dict[str, object], dict[str, object]]:
        return dict(cfg), {}

    def group_size(self, cfg: Mapping[str, object]) -> int:
        return int(cfg["rollout.n_samples_per_prompt"])

    def notes(self, cfg: Mapping[str, object]) -> list[str]:
        out = []
        if cfg["algo.advantage.estimator"] == "gae":
            out.append("gae with gamma = lambd = 1 and the critic taken as 0: the advantage is the reward-to-go")
        if cfg["algo.advantage.estimator"] in ("gae", "reinforce", "reinforce_baseline"):
            out.append(
                "advantage whitening over the rollout batch is taken in its large-batch limit (population mean "
                "and std): a global positive scale, included in the nominal scale"
            )
        return out
