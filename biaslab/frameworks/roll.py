"""ROLL (alibaba/ROLL, late 2026): KL in the loss is k3 hard-coded (value clamped to +-10) with ``use_kl_loss`` /
``kl_loss_coef``; ``add_token_level_kl`` puts ``kl_penalty`` (kl | abs | mse | full) times ``init_kl_coef``, from
the old log-probs, into the token-level rewards; ``loss_agg_mode`` aggregates both (default seq-mean-token-mean).

Sources (ROLL main, late 2026): roll/configs/base_config.py (PPOConfig defaults: init_kl_coef 0.2, kl_penalty kl,
add_token_level_kl false, use_kl_loss false, kl_loss_coef 0, loss_agg_mode seq-mean-token-mean, adv_estimator gae,
gamma 1, lambd 0.95, ppo_epochs 1, whiten_advantages false), roll/utils/functionals.py (compute_approx_kl,
add_token_level_kl, compute_token_reward, agg_loss, the advantage estimators).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..core.estimators import clamped
from ..core.recipes import Recipe
from .base import Key, Preset, clip_range, fixed_kl, kl_terms

KL_PENALTY = {"kl": "k1", "abs": "abs", "mse": "k2"}
K3_LOSS = clamped("k3", output_clamp=10.0, name="k3_roll")
AGG = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


class Roll(Preset):
    name = "roll"
    title = "ROLL"
    version = "main (late 2026)"
    functions = "roll.utils.functionals.compute_approx_kl (k3 loss), add_token_level_kl, agg_loss"
    sources = "ROLL main (late 2026): roll/configs/base_config.py, roll/utils/functionals.py"
    keys = (
        Key(
            "adv_estimator",
            "gae",
            "choice",
            ("gae", "reinforce", "grpo"),
            why="gigpo / step_reinforce / agentic_reinforce are not modelled",
        ),
        Key("use_kl_loss", False, "bool"),
        Key("kl_loss_coef", 0.0, "float"),
        Key("add_token_level_kl", False, "bool"),
        Key("init_kl_coef", 0.2, "float"),
        Key("kl_penalty", "kl", "choice", tuple(KL_PENALTY), why="'full' needs the full next-token distributions"),
        fixed_kl("target_kl", None),
        Key("loss_agg_mode", "seq-mean-token-mean", "choice", AGG),
        Key("whiten_advantages", False, "bool"),
        Key("gamma", 1.0, "float"),
        Key("lambd", 0.95, "float"),
        Key("pg_clip", 0.2, "float"),
        Key("ppo_epochs", 1, "int"),
        Key("num_return_sequences_in_group", 1, "int"),
        Key("importance_sampling", "token", "choice", ("token",), why="seq / manual_on_policy are not modelled"),
    )
    search_keys = ("use_kl_loss", "add_token_level_kl", "kl_penalty", "loss_agg_mode", "adv_estimator")
    group_key = "num_return_sequences_in_group"
    kl_switch = {"use_kl_loss": True, "kl_loss_coef": 0.001}
    lag_keys = ("ppo_epochs",)
    unit_keys = ("gamma", "lambd")
    critic_when = ("adv_estimator", "gae")

    def recipe(self, cfg: Mapping[str, object]) -> Recipe:
        adv = cfg["adv_estimator"]
        use_r = bool(cfg["add_token_level_kl"]) and float(cfg["init_kl_coef"]) != 0
        use_l = bool(cfg["use_kl_loss"]) and float(cfg["kl_loss_coef"]) != 0
        discount = float(cfg["gamma"]) * (float(cfg["lambd"]) if adv == "gae" else 1.0)
        reward = KL_PENALTY[cfg["kl_penalty"]]
        return Recipe(
            name="roll",
            **kl_terms(
                reward=(reward, cfg["init_kl_coef"]) if use_r else None,
                loss=(K3_LOSS, cfg["kl_loss_coef"]) if use_l else None,
            ),
            reward_credit="rtg",
            reward_lambda=discount,
            baseline="grpo" if adv == "grpo" else "none",
            baseline_on="task",
            whiten=bool(cfg["whiten_advantages"]),
            pg_clip=clip_range(cfg, "pg_clip"),
            pg_agg=cfg["loss_agg_mode"],
            loss_agg=cfg["loss_agg_mode"],
        )

    def notes(self, cfg: Mapping[str, object]) -> list[str]:
        out = []
        if cfg["use_kl_loss"]:
            out.append("the KL loss is k3 whatever kl_penalty says (hard-coded in ROLL), value clamped to +-10")
        if cfg["add_token_level_kl"]:
            out.append(
                "token-level KL reward from the old log-probs, credited by the (discounted) reward-to-go"
                + ("; critic taken as 0" if cfg["adv_estimator"] == "gae" else "")
            )
        if cfg["adv_estimator"] == "grpo":
            out.append("grpo: group mean/std normalisation of the task reward, the KL added per token afterwards")
        return out
