"""Update rules the exact engine can evaluate: the ``Recipe`` interface as a method, and the recipe extensions
the newer framework presets need (until the core ``Recipe`` carries them).

The exact engine (``biaslab.exact.ExactEngine``) evaluates an *update rule*: anything with

    rule.batch_loss(logp, logp_old, logp_ref, mask, task_reward=None, whiten_stats=None) -> (E,)   # inputs (E, B, T)
    rule.whiten (bool), rule.without_kl(), rule.nominal_scale(batch_size, length, whiten_std=None),
    rule.describe(), rule.has_reward_kl, rule.has_loss_kl

The core engine calls that method, so user losses (``biaslab.userloss.UserLoss``) and ``ExtRecipe`` run through
the same exact expectation, verdict and named directions as the core recipes (``RuleEngine`` is that engine).

``ExtRecipe`` adds to ``Recipe``:

* ``reward_kl_center`` ("none" | "group_token_mean"): subtract from every token's KL reward the masked mean of
  the per-token KL values over all tokens of the group (Tinker cookbook ``rl/metrics.incorporate_kl_penalty``:
  ``kl_coef * mask * (avg_logp_diff - logp_diff)``; there the mean runs over the whole batch, in the toy over the
  group). Discounting (``reward_lambda``, Tinker's ``kl_discount_factor``) happens after the centring.
* ``is_level`` ("token" | "sequence_mean" | "sequence_sum"): the importance ratio of the policy-gradient term
  (and of a ``loss_weight="ratio"`` KL weight). ``sequence_mean``: rho_i = exp(masked mean_t log(pi/mu)),
  broadcast to every token and aggregated with ``pg_agg`` (TRL ``importance_sampling_level="sequence"``,
  GSPO); ``sequence_sum``: rho_i = exp(sum_t log(pi/mu)), one loss -A_i * clip(rho_i) per response, averaged
  over responses (TRL RLOOTrainer); the KL weight then uses that rho_i on every token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..aggregation import aggregate
from ..estimators import get_estimator
from ..exact import ExactEngine
from ..recipes import Recipe, RecipeError, advantages, batch_loss, kl_loss_values, kl_token_loss, pg_token_loss

CENTERS = ("none", "group_token_mean")
IS_LEVELS = ("token", "sequence_mean", "sequence_sum")


#: The exact engine calls ``rule.batch_loss`` itself (``biaslab.exact.ExactEngine._loss_coefficients``).
RuleEngine = ExactEngine


@dataclass(frozen=True)
class ExtRecipe(Recipe):
    """``Recipe`` plus ``reward_kl_center`` (see module docstring); proposed for the core ``Recipe``."""

    reward_kl_center: str = "none"
    is_level: str = "token"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.is_level not in IS_LEVELS:
            raise RecipeError(f"unknown is_level {self.is_level!r}; choose one of: {', '.join(IS_LEVELS)}")
        if self.reward_kl_center not in CENTERS:
            raise RecipeError(
                f"unknown reward_kl_center {self.reward_kl_center!r}; choose one of: {', '.join(CENTERS)}"
            )
        if self.reward_kl_center != "none" and self.whiten:
            raise RecipeError("reward_kl_center with whitened advantages is not modelled")

    def describe(self) -> str:
        base = super().describe()
        extra = []
        if self.has_reward_kl and self.reward_kl_center != "none":
            extra.append(f"KL reward centred ({self.reward_kl_center})")
        if self.has_reward_kl and self.reward_lambda != 1.0:
            extra.append(f"KL credit discount {self.reward_lambda:g}")
        if self.is_level != "token":
            extra.append(f"importance ratio {self.is_level}")
        return base + ("; " + ", ".join(extra) if extra else "")

    def _centred_credit(self, logp_at: Tensor, logp_ref: Tensor, mask: Tensor) -> Tensor:
        """(E, B, T) beta * discounted reward-to-go of the centred per-token KL values."""
        k = get_estimator(self.reward_estimator).fn(logp_at, logp_ref) * mask  # (E, B, T)
        if self.reward_kl_center == "group_token_mean":
            mean = k.sum((-1, -2), keepdim=True) / mask.sum((-1, -2), keepdim=True).clamp(min=1)  # (E, 1, 1)
            k = (k - mean) * mask
        if self.reward_credit == "full":
            return self.reward_coef * k.sum(-1, keepdim=True).expand_as(k) * mask
        c = torch.zeros_like(k)
        acc = torch.zeros_like(k[..., 0])
        for t in range(k.shape[-1] - 1, -1, -1):
            acc = k[..., t] + self.reward_lambda * acc
            c[..., t] = acc
        return self.reward_coef * c * mask

    def _seq_ratio(self, logp: Tensor, logp_old: Tensor, mask: Tensor) -> Tensor:
        """(E, B, 1) sequence-level importance ratio (differentiable)."""
        log_ratio = ((logp - logp_old) * mask).sum(-1, keepdim=True)  # (E, B, 1)
        if self.is_level == "sequence_mean":
            log_ratio = log_ratio / mask.sum(-1, keepdim=True).clamp(min=1)
        if self.log_ratio_clamp is not None:
            log_ratio = log_ratio.clamp(-self.log_ratio_clamp, self.log_ratio_clamp)
        return log_ratio.exp()

    def _pg_seq(self, adv: Tensor, ratio: Tensor, mask: Tensor) -> Tensor:
        """(E, B, T) per-token policy-gradient loss with a sequence-level ratio (E, B, 1)."""
        loss = -adv * ratio
        if self.pg_clip is not None:
            lo, hi = self.pg_clip
            loss = torch.maximum(loss, -adv * ratio.clamp(1 - lo, 1 + hi))
        if self.is_level == "sequence_sum":  # one loss per response: its first token's, placed once
            once = torch.zeros_like(loss)
            once[..., 0] = loss[..., 0]
            return once
        return loss

    def batch_loss(
        self,
        logp: Tensor,
        logp_old: Tensor,
        logp_ref: Tensor,
        mask: Tensor,
        task_reward: Tensor | None = None,
        whiten_stats: tuple[float, float] | None = None,
        full: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """(E,) as ``biaslab.recipes.batch_loss``, with the centred KL reward (added after the task baseline) and
        sequence-level importance ratios."""
        centred = self.reward_kl_center != "none" and self.has_reward_kl
        if not centred and self.is_level == "token":
            return batch_loss(self, logp, logp_old, logp_ref, mask, task_reward, whiten_stats, full)
        logp_old = logp_old.detach()
        mask = mask.to(logp.dtype)
        if centred:
            if self.baseline_on != "task":
                raise RecipeError("reward_kl_center needs baseline_on='task' (the KL enters after the task baseline)")
            task_only = Recipe(baseline=self.baseline, baseline_on="task", grpo_eps=self.grpo_eps)
            adv = advantages(task_only, logp_old, logp, logp_ref, mask, task_reward)  # (E, B, T)
            at = logp_old if self.reward_kl_at == "behaviour" else logp.detach()
            adv = (adv - self._centred_credit(at, logp_ref, mask)).detach() * mask
        else:
            adv = advantages(self, logp_old, logp, logp_ref, mask, task_reward)  # (E, B, T)
        if self.whiten and (self.has_reward_kl or task_reward is not None):
            if whiten_stats is None:
                raise RecipeError("a whitened recipe needs whiten_stats=(mean, std) of the population advantages")
            mean, std = whiten_stats
            adv = (adv - mean) * mask / (std if self.whiten_std else 1.0)
        if self.is_level == "token":
            pg = pg_token_loss(self, adv, logp, logp_old, mask)
            ratio = None
        else:
            ratio = self._seq_ratio(logp, logp_old, mask)  # (E, B, 1)
            pg = self._pg_seq(adv, ratio, mask)
        total = aggregate(pg, mask, self.pg_agg, self.horizon)
        if self.has_loss_kl:
            if ratio is not None and self.loss_weight == "ratio":
                kl = kl_loss_values(self, logp, logp_ref) * ratio
            else:
                kl = kl_token_loss(self, logp, logp_old, logp_ref, mask)
            total = total + self.loss_coef * aggregate(kl, mask, self.loss_agg, self.horizon)
        return total


__all__ = ["CENTERS", "IS_LEVELS", "ExtRecipe", "RuleEngine"]
