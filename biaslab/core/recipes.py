"""Training recipes as trainers run them: one batch of B responses -> one scalar loss whose gradient is the update.

A ``Recipe`` adds, around a KL estimator, what real trainers do with it:

* **KL in reward** (``reward_estimator``, coefficient beta_r): the per-token value k_t, computed from the
  *behaviour* log-probs as frameworks do (detached), enters the token rewards r_t = -beta_r * k_t; credit is the
  reward-to-go ``rtg`` (GAE with gamma = lambda = 1 and no critic) or the ``full`` return (outcome estimators).
  ``reward_kl_center="group_token_mean"`` first subtracts the masked mean of k over the group's tokens
  (Tinker cookbook's centring of the KL penalty); ``reward_lambda`` discounts the reward-to-go (its
  ``kl_discount_factor``; 0: each token only its own KL, a per-token partial gradient).
* **Advantage baseline** over the B responses of a group, on the outcome score S_i = R_i - beta_r * K_i
  (``baseline_on="total"``, verl/SkyRL style) or on the task reward only with the KL added afterwards
  (``baseline_on="task"``, OpenRLHF style):
  none: A_i = S_i;  batch_mean: S_i - mean_j S_j;  rloo: S_i - mean_{j != i} S_j;
  grpo: (S_i - mean_j S_j) / (std_j S_j + eps) (std with Bessel's correction, as torch.std).
  With B = 1 the mean is 0 and the std 1 (verl's convention). ``whiten`` divides by the population std of the
  per-token advantages and subtracts their population mean (OpenRLHF's advantage whitening over a large
  rollout batch; the exact engine supplies those two constants).
* **Policy-gradient loss** on the advantages with importance weights rho = pi / mu per token or per sequence:
  ``pg_ratio="none"`` is plain REINFORCE -A * logp (ignores mu); ``"token"``/``"sequence"`` use rho (per token,
  or exp of the summed log-ratio on every token), ``"sequence_mean"`` exp of the mean log-ratio on every token
  (TRL ``importance_sampling_level="sequence"``, GSPO), ``"sequence_once"`` exp of the summed log-ratio as one loss
  per response (TRL RLOOTrainer); a ``loss_weight="ratio"`` KL weight uses the same rho;
  rho differentiable (PPO: -A * rho, optionally clipped to [1 - eps_lo, 1 + eps_hi] with max(), and dual-clipped at
  c for A < 0) or detached (-A * sg(min(rho, clamp)) * logp, truncated importance sampling).
* **KL in loss** (``loss_estimator``, coefficient beta_l): the per-token value k(logp, logp_ref) from the
  estimator registry (through ``KLConfig.token_values``), times an optional weight: ``ratio`` = rho
  (differentiable; TRL ``use_bias_correction_kl``, slime ``--use-unbiased-kl``), ``score`` = exp(logp - sg(logp))
  (value 1, adds the score term; NeMo-RL), ``ratio_detached`` = sg(min(rho, clamp)), ``ratio_detached_grad`` =
  the same weight applied to the gradient only (value unchanged; OpenRLHF ``unbiased_gradient``).
* **Aggregation** of each per-token loss matrix by ``biaslab.core.aggregation.aggregate``.

* **Level** (``level``): ``token`` uses the per-token values k_t; ``sequence`` the value of the summed log-ratio,
  K = k(sum_t logp_t, sum_t logp_ref_t), which in the reward credits every token with K and in the loss sits on the
  response's last token. Estimators that read whole next-token distributions (``rb``) are token level and need the
  full log-probabilities (``logp_full``).

``Recipe`` is biaslab's one configuration type: ``biaslab.core.placements.make_config(estimator, placement, level,
credit)`` builds the basic ones (B = 1, no baseline, on-policy REINFORCE, token-sum, coefficient 1), for which the
update is the per-sample estimate g(y) of grad KL(pi || pi_ref) of BACKGROUND section 3.

``batch_loss`` evaluates a recipe on stacked batches (..., B, T), so the exact engine can pass every enumerated
group at once. The gradient is an estimate of beta * grad KL(pi_theta || pi_ref) (reverse, sequence level) times
the recipe's nominal scale (``nominal_scale``); ``biaslab.engines.exact.ExactEngine`` says whether it is unbiased.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .aggregation import aggregate, check_mode, nominal_token_weight
from .estimators import Estimator, get_estimator
from .types import Credit, Level, Placement, TokenBatch

BASELINES = ("none", "batch_mean", "rloo", "grpo")
CREDITS = ("rtg", "full")
PG_RATIOS = ("none", "token", "sequence", "sequence_mean", "sequence_once")
KL_CENTERS = ("none", "group_token_mean")
RATIO_GRADS = ("differentiable", "detached")
LOSS_WEIGHTS = ("none", "ratio", "score", "ratio_detached", "ratio_detached_grad")
LEVELS = ("token", "sequence")


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
    # token: sum_t k(delta_t); sequence: k(sum_t delta_t) (both estimators)
    level: str = "token"
    # subtract from every token's KL reward the masked mean of the per-token KL values over the group's tokens
    reward_kl_center: str = "none"

    def __post_init__(self) -> None:
        for name in ("reward_estimator", "loss_estimator"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, get_estimator(getattr(self, name)))
        _choice("reward_credit", self.reward_credit, CREDITS)
        _choice("reward_kl_at", self.reward_kl_at, ("behaviour", "current"))
        _choice("baseline", self.baseline, BASELINES)
        _choice("baseline_on", self.baseline_on, ("total", "task"))
        _choice("pg_ratio", self.pg_ratio, PG_RATIOS)
        _choice("reward_kl_center", self.reward_kl_center, KL_CENTERS)
        if self.reward_kl_center != "none" and (self.whiten or self.baseline_on != "task"):
            raise RecipeError(
                "reward_kl_center needs baseline_on='task' (the KL enters after the task baseline) and no whitening"
            )
        _choice("pg_ratio_grad", self.pg_ratio_grad, RATIO_GRADS)
        _choice("loss_weight", self.loss_weight, LOSS_WEIGHTS)
        _choice("level", getattr(self.level, "value", self.level), LEVELS)
        object.__setattr__(self, "level", Level(getattr(self.level, "value", self.level)))
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
            if est is not None and est.needs_full_logits and self.level == "sequence":
                raise RecipeError(
                    f"estimator {est.name!r} reads full next-token distributions and has no sequence level"
                )
        if self.level == "sequence" and self.has_loss_kl and self.loss_weight != "none":
            raise RecipeError("a sequence-level KL loss takes no per-token weight (loss_weight must be 'none')")

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
        """c such that an unbiased recipe's expected update is c * grad KL(pi || pi_ref).

        One KL term alone: its part. A reward + loss pair estimates grad KL once (score-function half plus
        pathwise half), so its scale is the common coefficient (the mean of the two parts when they differ).
        """
        c_r, c_l = self.nominal_parts(batch_size, length, whiten_std)
        if c_r and c_l:
            return c_r if math.isclose(c_r, c_l, rel_tol=1e-12) else 0.5 * (c_r + c_l)
        return c_r + c_l

    def describe(self) -> str:
        parts = []
        lvl = "" if self.level == "token" else ", sequence level"
        if self.has_reward_kl:
            parts.append(
                f"{self.reward_coef:g}*{self.reward_estimator.name} in reward ({self.reward_credit}{lvl}, "
                f"baseline {self.baseline} on {self.baseline_on}{', whitened' if self.whiten else ''})"
            )
        if self.has_loss_kl:
            w = "" if self.loss_weight == "none" else f" x {self.loss_weight}"
            parts.append(f"{self.loss_coef:g}*{self.loss_estimator.name}{w} in loss ({self.loss_agg}{lvl})")
        pg = f"pg {self.pg_ratio}/{self.pg_ratio_grad}"
        if self.pg_clip is not None:
            pg += f" clip {self.pg_clip}"
        parts.append(f"{pg}, {self.pg_agg}")
        extra = []
        if self.has_reward_kl and self.reward_kl_center != "none":
            extra.append(f"KL reward centred ({self.reward_kl_center})")
        if self.has_reward_kl and self.reward_lambda != 1.0:
            extra.append(f"KL credit discount {self.reward_lambda:g}")
        return "; ".join(parts + extra)

    # ------------------------------------------------------------------ the basic view (make_config)

    @property
    def needs_full_logits(self) -> bool:
        """Capability flag: some estimator reads whole next-token distributions (pass ``logp_full``)."""
        return any(e is not None and e.needs_full_logits for e in (self.reward_estimator, self.loss_estimator))

    @property
    def estimator(self) -> Estimator | None:
        """The KL estimator (the loss one when only that is present, else the reward one)."""
        if self.has_reward_kl:
            return self.reward_estimator
        return self.loss_estimator if self.has_loss_kl else None

    @property
    def placement(self):
        """``Placement`` reward / loss / both (None without a KL term)."""
        if self.has_reward_kl and self.has_loss_kl:
            return Placement.BOTH
        if self.has_reward_kl:
            return Placement.REWARD
        return Placement.LOSS if self.has_loss_kl else None

    @property
    def credit(self):
        """``Credit`` of the score-function term, None when the KL is only in the loss."""
        return Credit(self.reward_credit) if self.has_reward_kl else None

    @property
    def label(self) -> str:
        """'k3 in loss (token)' for basic configurations, ``describe()`` otherwise."""
        return self.name if self.name != "custom" else self.describe()

    @property
    def is_plain(self) -> bool:
        """The basic form of ``make_config``: no baseline, ratio, weight, centring, whitening; token-sum; full
        discount (its update on one response is the surrogate of BACKGROUND section 3)."""
        return (
            self.baseline == "none" and self.pg_ratio == "none" and self.pg_agg == "token-sum"
            and self.loss_agg == "token-sum" and self.loss_weight == "none" and not self.whiten
            and self.reward_kl_center == "none" and self.reward_lambda == 1.0 and self.reward_kl_at == "behaviour"
        )

    def kl_estimate(self, logp: Tensor, logp_ref: Tensor, mask: Tensor | None = None, full=None) -> Tensor:
        """(...,) the per-response KL estimate K(y) of ``estimator`` at this level (differentiable through logp).

        Inputs (..., T) masked log-probs (``full``: ((..., T, V), (..., T, V)) for full-logit estimators)."""
        mask = torch.ones_like(logp) if mask is None else mask
        if self.level == "sequence":
            return sequence_values(self.estimator, logp, logp_ref, mask)
        return (token_values(self.estimator, logp, logp_ref, mask, full) * mask).sum(-1)

    # the per-sample views used by the LLM path and the value statistics (B = 1 each)

    def sequence_value(self, batch: TokenBatch) -> Tensor:
        """(N,) the per-sample KL estimate K(y) at this level."""
        return self.kl_estimate(batch.logp, batch.logp_ref, None, (batch.logp_full, batch.logp_ref_full))

    def surrogate(self, batch: TokenBatch, mask: Tensor | None = None) -> Tensor:
        """(N,) per-sample loss: every sample its own group of one, on-policy; its gradient is g(y)."""
        mask = torch.ones_like(batch.logp) if mask is None else mask
        if self.is_plain:  # REINFORCE on one response, token-sum: S = beta_r sum_t sg(c_t) logp_t + beta_l K
            full = (batch.logp_full, batch.logp_ref_full) if self.needs_full_logits else None
            s = batch.logp.new_zeros(batch.logp.shape[:-1])
            if self.has_reward_kl:
                det = None if full is None else (full[0].detach(), full[1])
                c, _ = kl_reward_credit(self, batch.logp.detach(), batch.logp_ref, mask, det)  # (N, T)
                s = s + self.reward_coef * (c * batch.logp * mask).sum(-1)
            if self.has_loss_kl:
                k = kl_loss_values(self, batch.logp, batch.logp_ref, mask, full)  # (N, T)
                s = s + self.loss_coef * (k * mask).sum(-1)
            return s
        lp = batch.logp.unsqueeze(1)  # (N, 1, T)
        full = None
        if self.needs_full_logits:
            full = (batch.logp_full.unsqueeze(1), batch.logp_ref_full.unsqueeze(1))  # (N, 1, T, V) each
        return self.batch_loss(lp, lp.detach(), batch.logp_ref.unsqueeze(1), mask.unsqueeze(1), full=full)

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
        """The update rule's interface for the engines: ``batch_loss(self, ...)`` (see the function)."""
        return batch_loss(self, logp, logp_old, logp_ref, mask, task_reward, whiten_stats, full)


# ---------------------------------------------------------------- pieces


def token_values(
    est: Estimator, logp: Tensor, logp_ref: Tensor, mask: Tensor | None = None, full=None
) -> Tensor:
    """(..., T) per-token k(logp_t, logp_ref_t) (or, for full-logit estimators, of the (..., T, V) distributions in
    ``full``), 0 on padding; differentiable through logp (or the full log-probs)."""
    shape = logp.shape
    if est.needs_full_logits:
        if full is None or full[0] is None:
            raise RecipeError(f"estimator {est.name!r} needs the full next-token log-probabilities")
        lp_full, lr_full = full
        V = lp_full.shape[-1]
        k = est(lp_full.reshape(-1, shape[-1], V), lr_full.reshape(-1, shape[-1], V)).reshape(shape)
    else:
        k = est(logp.reshape(-1, shape[-1]), logp_ref.reshape(-1, shape[-1])).reshape(shape)
    k = k.to(logp.dtype)
    return k if mask is None else k * mask


def sequence_values(est: Estimator, logp: Tensor, logp_ref: Tensor, mask: Tensor) -> Tensor:
    """(...,) K = k(sum_t logp_t, sum_t logp_ref_t) over the response tokens (sequence level)."""
    lp, lr = (logp * mask).sum(-1), (logp_ref * mask).sum(-1)  # (...,)
    return est(lp.reshape(-1), lr.reshape(-1)).reshape(lp.shape).to(logp.dtype)


def kl_reward_credit(
    recipe: Recipe, logp_at: Tensor, logp_ref: Tensor, mask: Tensor | None = None, full=None
) -> tuple[Tensor, Tensor]:
    """(c (..., T), K (...)): the credit multiplying each token's log-prob and the return, both detached.

    token level: c_t = sum_{s>=t} lambda^(s-t) k_s (``rtg``; GAE with a zero critic) or K = sum_t k_t (``full``);
    sequence level: c_t = K = k(sum_t logp_t, sum_t logp_ref_t) for every response token.
    """
    mask = torch.ones_like(logp_at) if mask is None else mask
    est = recipe.reward_estimator
    if recipe.level == "sequence":
        return kl_credit(recipe, sequence_values(est, logp_at, logp_ref, mask).detach(), mask)
    return kl_credit(recipe, token_values(est, logp_at, logp_ref, mask, full).detach(), mask)


def kl_credit(recipe: Recipe, values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``kl_reward_credit`` from the detached KL values: token values k (..., T), 0 on padding, or at sequence
    level the values K (...)."""
    if recipe.level == "sequence":
        return values.unsqueeze(-1) * mask, values
    k = values
    if recipe.reward_kl_center == "group_token_mean":  # k over (..., B, T): subtract the group's token mean
        mean = k.sum((-1, -2), keepdim=True) / mask.sum((-1, -2), keepdim=True).clamp(min=1)
        k = (k - mean) * mask
    big_k = k.sum(-1)
    if recipe.reward_credit == "full":
        return big_k.unsqueeze(-1) * mask, big_k
    if recipe.reward_lambda == 1.0:
        return k.flip(-1).cumsum(-1).flip(-1), big_k  # sum_{s>=t} k_s
    c = torch.zeros_like(k)
    acc = torch.zeros_like(k[..., 0])
    for t in range(k.shape[-1] - 1, -1, -1):
        acc = k[..., t] + recipe.reward_lambda * acc
        c[..., t] = acc
    return c, big_k


def kl_loss_values(recipe: Recipe, logp: Tensor, logp_ref: Tensor, mask: Tensor | None = None, full=None) -> Tensor:
    """(..., T) per-token KL loss values of the loss estimator, differentiable: k_t at token level; at sequence
    level K = k(sum_t logp_t, sum_t logp_ref_t) on the response's last token and 0 elsewhere."""
    mask = torch.ones_like(logp) if mask is None else mask
    if recipe.level == "sequence":
        big_k = sequence_values(recipe.loss_estimator, logp, logp_ref, mask)  # (...,)
        last = mask * (mask.flip(-1).cumsum(-1).flip(-1) == 1).to(mask.dtype)  # (..., T) 1 on the last token
        return big_k.unsqueeze(-1) * last
    return token_values(recipe.loss_estimator, logp, logp_ref, mask, full)


def _group_baseline(scores: Tensor, recipe: Recipe) -> Tensor:
    """(..., B) advantages of outcome scores (..., B) under the recipe's baseline."""
    B = scores.shape[-1]
    if recipe.baseline == "none":
        return scores
    if B == 1:  # verl's convention for a group of one: mean 0, std 1
        return scores / (1 + recipe.grpo_eps) if recipe.baseline == "grpo" else scores
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
    full: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """(..., B, T) detached per-token advantages (before whitening). Inputs (..., B, T) masked log-probs;
    ``task_reward`` (..., B) or None (0); ``full`` the current full log-probs for full-logit estimators."""
    mask = mask.to(logp_old.dtype)
    R = logp_old.new_zeros(logp_old.shape[:-1]) if task_reward is None else task_reward  # (..., B)
    if recipe.has_reward_kl:
        at = logp_old if recipe.reward_kl_at == "behaviour" else logp_cur.detach()
        full_det = None if full is None else (full[0].detach(), full[1])
        c, big_k = kl_reward_credit(recipe, at.detach(), logp_ref, mask, full_det)  # (..., B, T), (..., B)
        c, big_k = recipe.reward_coef * c, recipe.reward_coef * big_k
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


def importance_ratio(recipe: Recipe, logp: Tensor, logp_old: Tensor, mask: Tensor) -> Tensor:
    """(..., B, T) rho = pi / mu as the recipe's ``pg_ratio`` defines it (differentiable; 1 in value on-policy)."""
    log_ratio = (logp - logp_old) * mask  # (..., B, T)
    if recipe.pg_ratio in ("sequence", "sequence_once"):
        log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(logp)
    elif recipe.pg_ratio == "sequence_mean":
        log_ratio = (log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)).expand_as(logp)
    if recipe.log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-recipe.log_ratio_clamp, recipe.log_ratio_clamp)
    return log_ratio.exp()


def pg_token_loss(recipe: Recipe, adv: Tensor, logp: Tensor, logp_old: Tensor, mask: Tensor) -> Tensor:
    """(..., B, T) per-token policy-gradient loss on fixed advantages (see module docstring)."""
    if recipe.pg_ratio == "none":
        return -adv * logp
    ratio = importance_ratio(recipe, logp, logp_old, mask)
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
    if recipe.pg_ratio == "sequence_once":  # one loss per response: its first token's, placed once
        loss = torch.cat([loss[..., :1], torch.zeros_like(loss[..., 1:])], -1)
    return loss


def kl_token_loss(
    recipe: Recipe, logp: Tensor, logp_old: Tensor, logp_ref: Tensor, mask: Tensor, full=None
) -> Tensor:
    """(..., B, T) per-token KL loss k_t times the recipe's weight."""
    k = kl_loss_values(recipe, logp, logp_ref, mask, full)  # (..., B, T)
    if recipe.loss_weight == "none":
        return k
    if recipe.loss_weight == "score":
        return k * (logp - logp.detach()).exp()
    rho = ((logp - logp_old) * mask).exp() if recipe.pg_ratio in ("none", "token") else importance_ratio(
        recipe, logp, logp_old, mask
    )
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
    full: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """(...) the recipe's scalar loss for each stacked batch; inputs (..., B, T), log-probs already 0 on padding.

    ``logp`` is differentiable (the current policy), ``logp_old`` the behaviour policy's (detached; equal to
    ``logp`` in value on-policy), ``logp_ref`` the reference's. ``whiten_stats`` = (mean, std) of the population
    advantages, required when ``recipe.whiten``. ``full`` = (logp_full, logp_ref_full), (..., B, T, V) each, for
    estimators that read whole next-token distributions (the first differentiable).
    """
    if not (logp.shape == logp_old.shape == logp_ref.shape == mask.shape):
        raise RecipeError(
            f"log-probs and mask must share a shape (..., B, T); got {tuple(logp.shape)}, {tuple(logp_old.shape)}, "
            f"{tuple(logp_ref.shape)}, {tuple(mask.shape)}"
        )
    logp_old = logp_old.detach()
    total = logp.new_zeros(logp.shape[:-2])
    adv = advantages(recipe, logp_old, logp, logp_ref, mask, task_reward, full)
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
        kl = kl_token_loss(recipe, logp, logp_old, logp_ref, mask, full)
        total = total + recipe.loss_coef * aggregate(kl, mask, recipe.loss_agg, recipe.horizon)
    return total


__all__ = [
    "BASELINES",
    "LEVELS",
    "LOSS_WEIGHTS",
    "PG_RATIOS",
    "Recipe",
    "RecipeError",
    "advantages",
    "batch_loss",
    "kl_loss_values",
    "kl_credit",
    "kl_reward_credit",
    "kl_token_loss",
    "importance_ratio",
    "pg_token_loss",
    "sequence_values",
    "token_values",
]
