"""NeMo-RL: ``algorithms/utils.calculate_kl(logprobs, logprobs_reference, kl_type, input/output clamps,
importance weights)`` inside ``ClippedPGLossFn``. The KL is scaled by an importance weight: by default
exp(logp - sg(logp)) (value 1, its gradient adds the score term), or exp(logp - logp_gen) (differentiable, the
generation policy's log-probs fixed) with ``use_on_policy_kl_approximation``; aggregated as a global token mean
(``token_level_loss``) or a per-sequence mean. ``use_kl_in_reward`` (Reinforce++) puts it in the token rewards instead.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..estimators import clamped
from ..recipes import Recipe
from .base import Key, Preset, estimator_of

KL_TYPES = {"k1": "k1", "k2": "k2", "k3": "k3"}
L = "loss_fn."


class NemoRL(Preset):
    name = "nemo-rl"
    title = "NeMo-RL"
    version = "main (late 2026)"
    functions = "nemo_rl.algorithms.utils.calculate_kl, ClippedPGLossFn"
    keys = (
        Key(L + "reference_policy_kl_penalty", 0.01, "float"),
        Key(L + "reference_policy_kl_type", "k3", "choice", tuple(KL_TYPES)),
        Key(L + "kl_input_clamp_value", 20.0, "float", nullable=True),
        Key(L + "kl_output_clamp_value", 10.0, "float", nullable=True),
        Key(L + "use_on_policy_kl_approximation", False, "bool"),
        Key(L + "use_importance_sampling_correction", False, "bool"),
        Key(L + "token_level_loss", True, "bool"),
        Key(L + "ratio_clip_min", 0.2, "float"),
        Key(L + "ratio_clip_max", 0.2, "float"),
        Key(L + "ratio_clip_c", None, "float", nullable=True),
        Key(L + "use_kl_in_reward", False, "bool"),
        Key("grpo.num_generations_per_prompt", 16, "int"),
        Key("grpo.use_leave_one_out_baseline", True, "bool"),
        Key("grpo.normalize_rewards", True, "bool"),
    )
    search_keys = (
        L + "reference_policy_kl_type",
        L + "use_on_policy_kl_approximation",
        L + "use_kl_in_reward",
        L + "token_level_loss",
        "grpo.use_leave_one_out_baseline",
        "grpo.normalize_rewards",
    )

    def estimator(self, cfg: Mapping[str, object]):
        base = estimator_of(KL_TYPES, L + "reference_policy_kl_type", cfg[L + "reference_policy_kl_type"])
        lo, hi = cfg[L + "kl_input_clamp_value"], cfg[L + "kl_output_clamp_value"]
        if lo is None and hi is None:
            return base
        return clamped(base, input_clamp=lo, output_clamp=hi, name=f"{base}_nemo")

    def recipe(self, cfg: Mapping[str, object]) -> Recipe:
        coef = float(cfg[L + "reference_policy_kl_penalty"])
        in_reward = cfg[L + "use_kl_in_reward"]
        agg = "token-mean" if cfg[L + "token_level_loss"] else "seq-mean-token-mean"
        if cfg["grpo.use_leave_one_out_baseline"]:
            baseline = "rloo"
        else:
            baseline = "grpo" if cfg["grpo.normalize_rewards"] else "batch_mean"
        est = self.estimator(cfg)
        on = coef != 0
        return Recipe(
            name="nemo-rl",
            reward_estimator=est if on and in_reward else None,
            reward_coef=coef if on and in_reward else 0.0,
            reward_credit="rtg",
            baseline=baseline,
            baseline_on="task",
            pg_ratio="token",
            pg_clip=(float(cfg[L + "ratio_clip_min"]), float(cfg[L + "ratio_clip_max"])),
            pg_dual_clip=cfg[L + "ratio_clip_c"],
            pg_agg=agg,
            loss_estimator=est if on and not in_reward else None,
            loss_coef=coef if on and not in_reward else 0.0,
            loss_weight="ratio" if cfg[L + "use_on_policy_kl_approximation"] else "score",
            loss_agg=agg,
        )

    def enable_kl(self, cfg: dict[str, object]) -> tuple[dict[str, object], dict[str, object]]:
        return dict(cfg), {}

    def group_size(self, cfg: Mapping[str, object]) -> int:
        return int(cfg["grpo.num_generations_per_prompt"])

    def notes(self, cfg: Mapping[str, object]) -> list[str]:
        out = []
        if cfg["grpo.use_leave_one_out_baseline"] and cfg["grpo.normalize_rewards"]:
            out.append("leave-one-out baseline with std normalization is modelled as the leave-one-out baseline")
        return out
