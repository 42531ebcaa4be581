"""NeMo-RL: ``algorithms/utils.calculate_kl(logprobs, logprobs_reference, kl_type, input/output clamps,
importance weights)`` inside ``ClippedPGLossFn``. The KL is scaled by an importance weight: by default
exp(logp - sg(logp)) (value 1, its gradient adds the score term), or exp(logp - logp_gen) (differentiable, the
generation policy's log-probs fixed) with ``use_on_policy_kl_approximation``; aggregated as a global token mean
(``token_level_loss``) or a per-sequence mean. ``use_kl_in_reward`` (Reinforce++) puts it in the token rewards instead.

Sources (NeMo-RL main, late 2026): nemo_rl/algorithms/utils.py (calculate_kl), nemo_rl/algorithms/loss/
loss_functions.py (ClippedPGLossFn; with use_kl_in_reward the loss's KL coefficient is zeroed),
nemo_rl/algorithms/advantage_estimator.py (GRPOAdvantageEstimator never reads log-probs, so with
grpo.adv_estimator.name=grpo and use_kl_in_reward the KL disappears; ReinforcePlusPlusAdvantageEstimator:
A_t = (R - per-prompt mean, if minus_baseline) - beta * k_t on each token, then whitened over the batch's tokens),
examples/configs/grpo_math_1B.yaml (defaults; grpo.num_prompts_per_step x num_generations_per_prompt /
policy.train_global_batch_size optimizer steps per rollout).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..core.estimators import clamped
from ..core.recipes import Recipe
from .base import Key, Preset, kl_terms

KL_TYPES = {"k1": "k1", "k2": "k2", "k3": "k3"}
L = "loss_fn."
G = "grpo.adv_estimator."


class NemoRL(Preset):
    name = "nemo-rl"
    title = "NeMo-RL"
    version = "main (late 2026)"
    functions = "nemo_rl.algorithms.utils.calculate_kl, ClippedPGLossFn, ReinforcePlusPlusAdvantageEstimator"
    sources = "NeMo-RL main (late 2026): nemo_rl/algorithms/utils.py, loss/loss_functions.py, advantage_estimator.py"
    aliases = {
        "grpo.use_leave_one_out_baseline": G + "use_leave_one_out_baseline",
        "grpo.normalize_rewards": G + "normalize_rewards",
    }
    keys = (
        Key(L + "reference_policy_kl_penalty", 0.01, "float"),
        Key(L + "reference_policy_kl_type", "k3", "choice", tuple(KL_TYPES)),
        Key(L + "kl_input_clamp_value", 20.0, "float", nullable=True),
        Key(L + "kl_output_clamp_value", 10.0, "float", nullable=True),
        Key(L + "use_on_policy_kl_approximation", False, "bool"),
        Key(
            L + "use_importance_sampling_correction",
            False,
            "bool",
            (False,),
            why="it corrects the mismatch between the generation engine's and the trainer's log-probs of the same "
            "policy, which the exact toy does not have",
        ),
        Key(L + "token_level_loss", True, "bool"),
        Key(L + "ratio_clip_min", 0.2, "float"),
        Key(L + "ratio_clip_max", 0.2, "float"),
        Key(L + "ratio_clip_c", None, "float", nullable=True),
        Key(L + "use_kl_in_reward", False, "bool"),
        Key("grpo.num_generations_per_prompt", 16, "int"),
        Key(G + "name", "grpo", "choice", ("grpo", "reinforce_plus_plus"), why="gdpo and opd are not modelled"),
        Key(G + "use_leave_one_out_baseline", True, "bool"),
        Key(G + "normalize_rewards", True, "bool"),
        Key(G + "minus_baseline", True, "bool"),
        Key("grpo.num_prompts_per_step", 32, "int"),
        Key("policy.train_global_batch_size", 512, "int"),
    )
    search_keys = (
        L + "reference_policy_kl_type",
        L + "use_on_policy_kl_approximation",
        L + "use_kl_in_reward",
        L + "token_level_loss",
        G + "name",
        G + "use_leave_one_out_baseline",
        G + "normalize_rewards",
    )
    group_key = "grpo.num_generations_per_prompt"
    rollout_keys = ("grpo.num_prompts_per_step", group_key)
    minibatch_key = "policy.train_global_batch_size"
    positive_keys = ("grpo.num_prompts_per_step", "policy.train_global_batch_size", "grpo.num_generations_per_prompt")
    dual_clip_keys = (L + "ratio_clip_c",)

    def estimator(self, cfg: Mapping[str, object]):
        base = KL_TYPES[cfg[L + "reference_policy_kl_type"]]
        lo, hi = cfg[L + "kl_input_clamp_value"], cfg[L + "kl_output_clamp_value"]
        if lo is None and hi is None:
            return base
        return clamped(base, input_clamp=lo, output_clamp=hi, name=f"{base}_nemo_{lo}_{hi}")

    def recipe(self, cfg: Mapping[str, object]) -> Recipe:
        coef = float(cfg[L + "reference_policy_kl_penalty"])
        in_reward = cfg[L + "use_kl_in_reward"]
        rpp = cfg[G + "name"] == "reinforce_plus_plus"
        agg = "token-mean" if cfg[L + "token_level_loss"] else "seq-mean-token-mean"
        if rpp:
            baseline = "batch_mean" if cfg[G + "minus_baseline"] else "none"
        elif cfg[G + "use_leave_one_out_baseline"]:
            baseline = "rloo"
        else:
            baseline = "grpo" if cfg[G + "normalize_rewards"] else "batch_mean"
        term = (self.estimator(cfg), coef)
        # use_kl_in_reward zeroes the loss's KL coefficient (loss_functions.py); only the Reinforce++ estimator
        # reads log-probs and subtracts beta * k_t per token (its own token only), then whitens
        return Recipe(
            name="nemo-rl",
            **kl_terms(
                reward=term if coef != 0 and in_reward and rpp else None,
                loss=term if coef != 0 and not in_reward else None,
            ),
            reward_credit="rtg",
            reward_lambda=0.0,
            baseline=baseline,
            baseline_on="task",
            whiten=rpp,
            pg_clip=(float(cfg[L + "ratio_clip_min"]), float(cfg[L + "ratio_clip_max"])),
            pg_dual_clip=cfg[L + "ratio_clip_c"],
            pg_agg=agg,
            loss_weight="ratio" if cfg[L + "use_on_policy_kl_approximation"] else "score",
            loss_agg=agg,
        )

    def no_kl_reason(self, cfg: Mapping[str, object]) -> str:
        if cfg[L + "use_kl_in_reward"] and cfg[G + "name"] == "grpo" and float(cfg[L + "reference_policy_kl_penalty"]):
            return (
                "use_kl_in_reward with grpo.adv_estimator.name=grpo: the loss's KL coefficient is zeroed and the GRPO "
                "advantage estimator never reads log-probs, so the KL disappears (set grpo.adv_estimator.name="
                "reinforce_plus_plus, or use_kl_in_reward=false)"
            )
        return ""

    def notes(self, cfg: Mapping[str, object]) -> list[str]:
        out = []
        if cfg[G + "name"] == "grpo" and cfg[G + "use_leave_one_out_baseline"] and cfg[G + "normalize_rewards"]:
            out.append("leave-one-out baseline with std normalization is modelled as the leave-one-out baseline")
        if cfg[G + "name"] == "reinforce_plus_plus" and cfg[L + "use_kl_in_reward"]:
            out.append(
                "reinforce_plus_plus with use_kl_in_reward: A_t = (R - mean) - beta k_t per token (no "
                "reward-to-go), whitened over the batch (large-batch limit)"
            )
        return out
