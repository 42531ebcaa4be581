"""Loss functions built from verl 0.9.1's own functions, in biaslab's ``--loss`` contract (one group per call).

    biaslab audit --loss examples/frameworks/verl_real.py:grpo_k3_in_loss --beta 0.001 --agg token-mean

Each function reproduces one verl actor update on a group of B responses to one prompt: task scores at each
response's last token, ``apply_kl_penalty``'s token rewards (scores - beta * kl_penalty(old, ref)) when the KL is in
the reward, the GRPO / RLOO outcome advantages (verl/trainer/ppo/core_algos.py: compute_grpo_outcome_advantage,
compute_rloo_outcome_advantage), the PPO loss ``compute_policy_loss_vanilla`` aggregated by ``agg_loss``, plus
``kl_loss_coef * agg_loss(kl_penalty(logp, ref, kl_loss_type))`` when the KL is in the loss
(verl/workers/actor/dp_actor.py). Only the verl calls compute; the glue is the trainer's own wiring.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import Tensor
from verl.trainer.ppo import core_algos


def make_verl_loss(
    kl_loss_type: str | None = "low_var_kl",
    kl_loss_coef: float = 0.001,
    kl_penalty: str | None = None,
    kl_coef: float = 0.001,
    adv_estimator: str = "grpo",
    norm_adv_by_std_in_grpo: bool = True,
    loss_agg_mode: str = "token-mean",
    clip: tuple[float, float] = (0.2, 0.2),
    clip_ratio_c: float = 3.0,
) -> Callable:
    """A loss function ``f(batch) -> scalar``: KL in the loss with ``kl_loss_type`` (None: no KL loss) and/or in
    the reward with ``kl_penalty`` (None: none); advantages by ``adv_estimator`` (grpo | rloo)."""
    cfg = OmegaConf.create(
        {
            "clip_ratio": clip[0],
            "clip_ratio_low": clip[0],
            "clip_ratio_high": clip[1],
            "clip_ratio_c": clip_ratio_c,
            "global_batch_info": {},
        }
    )

    def loss(batch) -> Tensor:
        lp, old, ref, mask = batch.logp, batch.old_logp, batch.ref_logp, batch.mask  # (B, T) each
        B = lp.shape[0]
        last = (mask.sum(-1).long() - 1).clamp(min=0)  # (B,) the last response token
        scores = torch.zeros_like(lp).scatter(1, last[:, None], batch.rewards[:, None].to(lp.dtype))  # (B, T)
        rewards = scores
        if kl_penalty is not None:  # ray_trainer.apply_kl_penalty: token_level_scores - beta * kld
            rewards = scores - kl_coef * core_algos.kl_penalty(old, ref, kl_penalty) * mask
        index = np.array(["prompt"] * B, dtype=object)
        if adv_estimator == "grpo":
            adv, _ = core_algos.compute_grpo_outcome_advantage(
                rewards, mask, index, norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo
            )
        elif adv_estimator == "rloo":
            adv, _ = core_algos.compute_rloo_outcome_advantage(rewards, mask, index)
        else:
            raise ValueError(f"adv_estimator {adv_estimator!r} not wired in this example")
        pg_loss = core_algos.compute_policy_loss_vanilla(old, lp, adv, mask, loss_agg_mode=loss_agg_mode, config=cfg)[0]
        if kl_loss_type is None:
            return pg_loss
        kld = core_algos.kl_penalty(lp, ref, kl_loss_type)
        return pg_loss + kl_loss_coef * core_algos.agg_loss(kld, mask, loss_agg_mode)

    loss.__qualname__ = f"verl[{adv_estimator}, loss={kl_loss_type}, reward={kl_penalty}, {loss_agg_mode}]"
    return loss


#: verl's documented GRPO setting: low_var_kl (k3) in the loss, token-mean (the paper's "K3 in loss").
grpo_k3_in_loss = make_verl_loss()
#: the paper's recommendation: k1 in the reward, no KL loss (with RLOO advantages: unbiased).
rloo_k1_in_reward = make_verl_loss(kl_loss_type=None, kl_penalty="kl", adv_estimator="rloo")
