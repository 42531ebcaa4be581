"""Training recipes as trainers run them: one batch of B responses -> one scalar loss whose gradient is the update.

A ``Recipe`` adds, around a KL estimator, what real trainers do with it:

* **KL in reward** (``reward_estimator``, coefficient beta_r): the per-token value k_t, computed from the
  *behaviour* log-probs as frameworks do (detached), enters the token rewards r_t = -beta_r * k_t; credit is the
  reward-to-go ``rtg`` (GAE with gamma = lambda = 1 and no critic) or the ``full`` return (outcome estimators).
  The credit itself comes from ``biaslab.placements.KLConfig.returns`` (one place for that logic).
* **Advantage baseline** over the B responses of a group, on the outcome score S_i = R_i - beta_r * K_i
  (``baseline_on="total"``, verl/SkyRL style) or on the task reward only with the KL added afterwards
  (``baseline_on="task"``, OpenRLHF style):
  none: A_i = S_i;  batch_mean: S_i - mean_j S_j;  rloo: S_i - mean_{j != i} S_j;
  grpo: (S_i - mean_j S_j) / (std_j S_j + eps) (std with Bessel's correction, as torch.std).
  With B = 1 the mean is 0 and the std 1 (verl's convention). ``whiten`` divides by the population std of the
  per-token advantages and subtracts their population mean (OpenRLHF's advantage whitening over a large
  rollout batch; the exact engine supplies those two constants).
* **Policy-gradient loss** on the advantages with importance weights rho = pi / mu per token or per sequence:
  ``pg_ratio="none"`` is plain REINFORCE -A * logp (ignores mu); ``"token"``/``"sequence"`` use rho,
  differentiable (PPO: -A * rho, optionally clipped to [1 - eps_lo, 1 + eps_hi] with max(), and dual-clipped at
  c for A < 0) or detached (-A * sg(min(rho, clamp)) * logp, truncated importance sampling).
* **KL in loss** (``loss_estimator``, coefficient beta_l): the per-token value k(logp, logp_ref) from the
  estimator registry (through ``KLConfig.token_values``), times an optional weight: ``ratio`` = rho
  (differentiable; TRL ``use_bias_correction_kl``, slime ``--use-unbiased-kl``), ``score`` = exp(logp - sg(logp))
  (value 1, adds the score term; NeMo-RL), ``ratio_detached`` = sg(min(rho, clamp)), ``ratio_detached_grad`` =
  the same weight applied to the gradient only (value unchanged; OpenRLHF ``unbiased_gradient``).
* **Aggregation** of each per-token loss matrix by ``biaslab.aggregation.aggregate``.

``batch_loss`` evaluates a recipe on stacked batches (..., B, T), so the exact engine can pass every enumerated
group at once. The gradient is an estimate of beta * grad KL(pi_theta || pi_ref) (reverse, sequence level) times
the recipe's nominal scale (``nominal_scale``); ``biaslab.exact_recipes`` says whether it is unbiased.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .aggregation import check_mode, nominal_token_weight
from .estimators import Estimator, get_estimator
from .placements import KLConfig, TokenBatch

BASELINES = ("none", "batch_mean", "rloo", "grpo")
CREDITS = ("rtg", "full")
PG_RATIOS = ("none", "token", "sequence")
RATIO_GRADS = ("differentiable", "detached")
LOSS_WEIGHTS = ("none", "ratio", "score", "ratio_detached", "ratio_detached_grad")


class RecipeError(ValueError):
    """A recipe field has a value outside its accepted set."""


def _choice(field: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise RecipeError(f"unknown {field} {value!r}; choose one of: {', '.join(choices)}")


@dataclass(frozen=True)
class Recipe:
    """One trainer configuration, reduced to what decides the expected KL gradient (see module docstring)."""

    name: str = "custom"
    # KL in reward
    reward_estimator: str | Estimator | None = None
    reward_coef: float = 0.0
    reward_credit: str = "rtg"
    reward_kl_at: str = "behaviour"  # "behaviour" (frameworks: old log-probs) or "current"
    reward_lambda: float = 1.0  # GAE gamma * lambda with no critic: c_t = sum_{s>=t} lambda^(s-t) k_s (rtg only)
    # advantages
    baseline: str = "none"
    baseline_on: str = "total"
    grpo_eps: float = 1e-6
    whiten: bool = False
    whiten_std: bool = True
    # policy-gradient loss
    pg_ratio: str = "token"
    pg_ratio_grad: str = "differentiable"
    pg_clip: tuple[float, float] | None = None  # (eps_low, eps_high)
    pg_dual_clip: float | None = None
    pg_is_clamp: float | None = None  # max of a detached weight
    log_ratio_clamp: float | None = None  # verl clamps log rho to +-20 before exp
    pg_agg: str = "seq-mean-token-sum"
    # KL in loss
    loss_estimator: str | Estimator | None = None
    loss_coef: float = 0.0
    loss_weight: str = "none"
    loss_weight_clamp: float | None = None
    loss_agg: str = "seq-mean-token-sum"
    horizon: int | None = None

    def __post_init__(self) -> None:
        if self.reward_estimator is not None:
            object.__setattr__(self, "reward_estimator", get_estimator(self.reward_estimator))
        if self.loss_estimator is not None:
            object.__setattr__(self, "loss_estimator", get_estimator(self.loss_estimator))
        _choice("reward_credit", self.reward_credit, CREDITS)
        _choice("reward_kl_at", self.reward_kl_at, ("behaviour", "current"))
        _choice("baseline", self.baseline, BASELINES)
        _choice("baseline_on", self.baseline_on, ("total", "task"))
        _choice("pg_ratio", self.pg_ratio, PG_RATIOS)
        _choice("pg_ratio_grad", self.pg_ratio_grad, RATIO_GRADS)
        _choice("loss_weight", self.loss_weight, LOSS_WEIGHTS)
        check_mode(self.pg_agg)
        check_mode(self.loss_agg)
        for name in ("reward_coef", "loss_coef", "grpo_eps", "reward_lambda"):
            value = getattr(self, name)
            if not math.isfinite(value) or (not name.endswith("coef") and value < 0):
                raise RecipeError(f"{name} must be a finite number (>= 0 unless a coefficient), got {value}")
        if not 0 <= self.reward_lambda <= 1:
            raise RecipeError(f"reward_lambda must lie in [0, 1], got {self.reward_lambda}")
        if self.pg_clip is not None and not (0 <= self.pg_clip[0] < 1 and self.pg_clip[1] >= 0):
            raise RecipeError(f"pg_clip=(eps_low, eps_high) needs 0 <= eps_low < 1, eps_high >= 0; got {self.pg_clip}")
        if self.pg_dual_clip is not None and not self.pg_dual_clip > 1:
            raise RecipeError(f"pg_dual_clip must be > 1, got {self.pg_dual_clip}")
        for name in ("pg_is_clamp", "loss_weight_clamp", "log_ratio_clamp", "horizon"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise RecipeError(f"{name} must be positive (or None), got {value}")
        for est in (self.reward_estimator, self.loss_estimator):
            if est is not None and est.needs_full_logits:
                raise RecipeError(f"estimator {est.name!r} needs full logits; recipes take per-token estimators")

    @property
    def has_reward_kl(self) -> bool:
        return self.reward_estimator is not None and self.reward_coef != 0

    @property
    def has_loss_kl(self) -> bool:
        return self.loss_estimator is not None and self.loss_coef != 0

    def without_kl(self) -> Recipe:
        """The same recipe with both KL coefficients 0: its gradient is the task part of the update."""
        return replace(self, reward_coef=0.0, loss_coef=0.0)

    def nominal_parts(self, batch_size: int, length: int, whiten_std: float | None = None) -> tuple[float, float]:
        """(c_reward, c_loss): beta times the batch size times the weight the aggregation gives one token of a
        full-length batch (see ``aggregation``), for the reward and the loss part; the reward part is divided by
        the whitening std when the recipe whitens its advantages."""
        c_r = c_l = 0.0
        if self.has_reward_kl:
            c_r = self.reward_coef * batch_size * nominal_token_weight(self.pg_agg, batch_size, length, self.horizon)
            if self.whiten and self.whiten_std and whiten_std is not None:
                c_r /= whiten_std
        if self.has_loss_kl:
            c_l = self.loss_coef * batch_size * nominal_token_weight(self.loss_agg, batch_size, length, self.horizon)
        return c_r, c_l

    def nominal_scale(self, batch_size: int, length: int, whiten_std: float | None = None) -> float:
        """c such that an unbiased recipe's expected update is c * grad KL(pi || pi_ref) (sum of both parts)."""
        return sum(self.nominal_parts(batch_size, length, whiten_std))

    def describe(self) -> str:
        parts = []
        if self.has_reward_kl:
            parts.append(
                f"{self.reward_coef:g}*{self.reward_estimator.name} in reward ({self.reward_credit}, "
                f"baseline {self.baseline} on {self.baseline_on}{', whitened' if self.whiten else ''})"
            )
        if self.has_loss_kl:
            w = "" if self.loss_weight == "none" else f" x {self.loss_weight}"
            parts.append(f"{self.loss_coef:g}*{self.loss_estimator.name}{w} in loss ({self.loss_agg})")
        pg = f"pg {self.pg_ratio}/{self.pg_ratio_grad}"
        if self.pg_clip is not None:
            pg += f" clip {self.pg_clip}"
        parts.append(f"{pg}, {self.pg_agg}")
        return "; ".join(parts) if parts else "no KL"


# ---------------------------------------------------------------- pieces


def _token_batch(logp: Tensor, logp_ref: Tensor) -> TokenBatch:
    """A TokenBatch over (M, T) gathered log-probs (no full distributions: per-token estimators only)."""
    tokens = torch.zeros(logp.shape, dtype=torch.long)
    return TokenBatch(tokens, None, None, sampled_logp=logp, sampled_logp_ref=logp_ref)  # type: ignore[arg-type]


def kl_reward_credit(recipe: Recipe, logp_at: Tensor, logp_ref: Tensor) -> tuple[Tensor, Tensor]:
    """(c (..., T), K (...)): the credit multiplying each token's log-prob and the return, from placements."""
    shape = logp_at.shape
    cfg = KLConfig(recipe.reward_estimator, "reward", "token", recipe.reward_credit)
    batch = _token_batch(logp_at.reshape(-1, shape[-1]), logp_ref.reshape(-1, shape[-1]))
    c, big_k = cfg.returns(batch)
    if recipe.reward_lambda != 1.0 and recipe.reward_credit == "rtg":
        k = cfg.token_values(batch)  # (M, T): discounted reward-to-go, GAE with a zero critic
        c = torch.zeros_like(k)
        acc = torch.zeros_like(k[:, 0])
        for t in range(k.shape[-1] - 1, -1, -1):
            acc = k[:, t] + recipe.reward_lambda * acc
            c[:, t] = acc
    return c.reshape(shape), big_k.reshape(shape[:-1])


def kl_loss_values(recipe: Recipe, logp: Tensor, logp_ref: Tensor) -> Tensor:
    """(..., T) per-token k(logp, logp_ref) of the loss estimator, differentiable through logp."""
    shape = logp.shape
    cfg = KLConfig(recipe.loss_estimator, "loss", "token")
    return cfg.token_values(_token_batch(logp.reshape(-1, shape[-1]), logp_ref.reshape(-1, shape[-1]))).reshape(shape)


def _group_baseline(scores: Tensor, recipe: Recipe) -> Tensor:
    """(..., B) advantages of outcome scores (..., B) under the recipe's baseline."""
    B = scores.shape[-1]
    if recipe.baseline == "none" or B == 1:
        return scores  # verl: a group of one has mean 0 and std 1
    mean = scores.mean(-1, keepdim=True)
    if recipe.baseline == "batch_mean":
        return scores - mean
    if recipe.baseline == "rloo":
        return scores - (scores.sum(-1, keepdim=True) - scores) / (B - 1)
    std = scores.std(-1, keepdim=True)  # Bessel-corrected, as torch.std in verl/OpenRLHF
    return (scores - mean) / (std + recipe.grpo_eps)


def advantages(
    recipe: Recipe,
    logp_old: Tensor,
    logp_cur: Tensor,
    logp_ref: Tensor,
    mask: Tensor,
    task_reward: Tensor | None = None,
) -> Tensor:
    """(..., B, T) detached per-token advantages (before whitening). Inputs (..., B, T) masked log-probs;
    ``task_reward`` (..., B) or None (0)."""
    mask = mask.to(logp_old.dtype)
    R = torch.zeros(logp_old.shape[:-1], dtype=logp_old.dtype) if task_reward is None else task_reward  # (..., B)
    if recipe.has_reward_kl:
        at = logp_old if recipe.reward_kl_at == "behaviour" else logp_cur.detach()
        c, big_k = kl_reward_credit(recipe, at.detach(), logp_ref)  # (..., B, T), (..., B)
        c, big_k = recipe.reward_coef * c.detach(), recipe.reward_coef * big_k.detach()
    else:
        c = torch.zeros_like(logp_old)
        big_k = torch.zeros_like(R)
    if recipe.baseline_on == "total":
        if recipe.baseline == "none":
            adv = R.unsqueeze(-1) - c  # (..., B, T) keeps the credit (rtg or full)
        else:
            adv = _group_baseline(R - big_k, recipe).unsqueeze(-1).expand_as(c)  # outcome: full credit
    else:
        adv = _group_baseline(R, recipe).unsqueeze(-1) - c  # baseline on the task reward only, KL added after
    return (adv * mask).detach()


def pg_token_loss(recipe: Recipe, adv: Tensor, logp: Tensor, logp_old: Tensor, mask: Tensor) -> Tensor:
    """(..., B, T) per-token policy-gradient loss on fixed advantages (see module docstring)."""
    if recipe.pg_ratio == "none":
        return -adv * logp
    log_ratio = (logp - logp_old) * mask  # (..., B, T)
    if recipe.pg_ratio == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(logp)
    if recipe.log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-recipe.log_ratio_clamp, recipe.log_ratio_clamp)
    ratio = log_ratio.exp()
    if recipe.pg_ratio_grad == "detached":
        w = ratio.detach()
        if recipe.pg_is_clamp is not None:
            w = w.clamp(max=recipe.pg_is_clamp)
        return -adv * w * logp
    loss = -adv * ratio
    if recipe.pg_clip is not None:
        lo, hi = recipe.pg_clip
        loss = torch.maximum(loss, -adv * ratio.clamp(1 - lo, 1 + hi))
        if recipe.pg_dual_clip is not None:
            loss = torch.where(adv < 0, torch.minimum(loss, -adv * recipe.pg_dual_clip), loss)
    return loss


def kl_token_loss(recipe: Recipe, logp: Tensor, logp_old: Tensor, logp_ref: Tensor, mask: Tensor) -> Tensor:
    """(..., B, T) per-token KL loss k_t times the recipe's weight."""
    k = kl_loss_values(recipe, logp, logp_ref)  # (..., B, T)
    if recipe.loss_weight == "none":
        return k
    if recipe.loss_weight == "score":
        return k * (logp - logp.detach()).exp()
    rho = ((logp - logp_old) * mask).exp()
    if recipe.loss_weight == "ratio":
        return k * rho
    w = rho.detach()
    if recipe.loss_weight_clamp is not None:
        w = w.clamp(max=recipe.loss_weight_clamp)
    if recipe.loss_weight == "ratio_detached":
        return k * w
    return k.detach() + w * (k - k.detach())  # ratio_detached_grad: value k, gradient w * grad k


def batch_loss(
    recipe: Recipe,
    logp: Tensor,
    logp_old: Tensor,
    logp_ref: Tensor,
    mask: Tensor,
    task_reward: Tensor | None = None,
    whiten_stats: tuple[float, float] | None = None,
) -> Tensor:
    """(...) the recipe's scalar loss for each stacked batch; inputs (..., B, T), log-probs already 0 on padding.

    ``logp`` is differentiable (the current policy), ``logp_old`` the behaviour policy's (detached; equal to
    ``logp`` in value on-policy), ``logp_ref`` the reference's. ``whiten_stats`` = (mean, std) of the population
    advantages, required when ``recipe.whiten``.
    """
    from .aggregation import aggregate

    if not (logp.shape == logp_old.shape == logp_ref.shape == mask.shape):
        raise RecipeError(
            f"log-probs and mask must share a shape (..., B, T); got {tuple(logp.shape)}, {tuple(logp_old.shape)}, "
            f"{tuple(logp_ref.shape)}, {tuple(mask.shape)}"
        )
    logp_old = logp_old.detach()
    total = torch.zeros(logp.shape[:-2], dtype=logp.dtype)
    adv = advantages(recipe, logp_old, logp, logp_ref, mask, task_reward)
    if recipe.whiten and (recipe.has_reward_kl or task_reward is not None):
        if whiten_stats is None:
            raise RecipeError("a whitened recipe needs whiten_stats=(mean, std) of the population advantages")
        mean, std = whiten_stats
        adv = (adv - mean) * mask
        if recipe.whiten_std:
            adv = adv / std
    if bool((adv != 0).any()):
        total = total + aggregate(pg_token_loss(recipe, adv, logp, logp_old, mask), mask, recipe.pg_agg, recipe.horizon)
    if recipe.has_loss_kl:
        kl = kl_token_loss(recipe, logp, logp_old, logp_ref, mask)
        total = total + recipe.loss_coef * aggregate(kl, mask, recipe.loss_agg, recipe.horizon)
    return total


__all__ = [
    "BASELINES",
    "LOSS_WEIGHTS",
    "PG_RATIOS",
    "Recipe",
    "RecipeError",
    "advantages",
    "batch_loss",
    "kl_loss_values",
    "kl_reward_credit",
    "kl_token_loss",
    "pg_token_loss",
]
