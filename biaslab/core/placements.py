"""How a KL estimate enters the gradient: placement x level x credit, as per-sample surrogate losses.

For a per-sample estimate K_theta(y) the gradient of its expectation splits in two (the paper's Eq. 6):

    grad E_{y~pi}[K(y)] = E[ grad K(y) ]  (pathwise)  +  E[ K(y) * grad log pi(y) ]  (score function)

A configuration (``make_config``, which builds the one configuration type ``biaslab.core.recipes.Recipe``) picks
which half a trainer estimates. Its ``surrogate`` returns one scalar per sample whose
gradient with respect to theta *is* that sample's estimate g(y) of grad KL(pi_theta || pi_ref) (reverse,
sequence level; beta omitted). With token log-probs logp_t = log pi(y_t|y_<t) and per-token values k_t:

    level  token:     k_t = k(logp_t, logp_ref_t)          K = sum_t k_t
           sequence:  K = k(sum_t logp_t, sum_t logp_ref_t)
    credit full:      c_t = K                              (every token is credited the whole return)
           rtg:       c_t = sum_{s>=t} k_s                 (reward-to-go; sequence level: c_t = K, the
                                                             penalty arrives at the last token)
    placement reward: S = sum_t sg(c_t) * logp_t          (detached value in the reward: score function)
              loss:   S = K                                (backpropagated on fixed samples: pathwise)
              both:   S = sum_t sg(c_t) * logp_t + K       (the full derivative of E[K])

``sg`` is stop-gradient. The surrogate depends on theta only through the next-token log-probabilities, so a
sample's gradient is sum_{t,v} a_{tv} grad log pi(v|y_<t) with a = dS/dlogp_full: the engines use that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .estimators import Estimator, EstimatorError, get_estimator
from .types import Coefficients, Credit, Level, Placement, TokenBatch, at_tokens, parse_enum  # noqa: F401

if TYPE_CHECKING:
    from .recipes import Recipe as KLConfig


def input_grads(out: Tensor, inputs: list[Tensor]) -> list[Tensor]:
    """[d out.sum() / d x for x in inputs]: autograd, zeros where ``out`` does not depend on x."""
    grads = torch.autograd.grad(out.sum(), inputs, allow_unused=True) if out.requires_grad else [None] * len(inputs)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def surrogate_coefficients(
    config: KLConfig,
    tokens: Tensor,
    logp_full: Tensor,
    logp_ref_full: Tensor,
    logp: Tensor | None = None,
    logp_ref: Tensor | None = None,
    mask: Tensor | None = None,
) -> Coefficients:
    """dS/dlogp of every sample's update, each sample its own group of one (B = 1, on-policy).

    Differentiates ``config.surrogate`` with respect to the log-probabilities (not theta): one cheap backward pass
    on (N, T) tensors (and (N, T, V) for estimators that read full distributions). The engines then map the
    coefficients to theta (closed form, one backward pass, or per-sample gradients)."""
    given = TokenBatch(tokens, logp_full, logp_ref_full, logp, logp_ref)  # gathers the token log-probs not given
    tok = given.logp.detach().requires_grad_(True)  # (N, T)
    needs_full = config.needs_full_logits
    full = logp_full.detach().requires_grad_(needs_full)  # (N, T, V)
    s = config.surrogate(TokenBatch(tokens, full, logp_ref_full.detach(), tok, given.logp_ref.detach()), mask)  # (N,)
    if s.shape != tokens.shape[:1]:
        raise ValueError(f"surrogate of {config.label} has shape {tuple(s.shape)}, expected ({tokens.shape[0]},)")
    grads = input_grads(s, [tok, full] if needs_full else [tok])
    return Coefficients(grads[0].detach(), grads[1].detach() if needs_full else None)


def loss_coefficients(
    config,
    logp: Tensor,
    logp_old: Tensor,
    logp_ref: Tensor,
    mask: Tensor,
    task_reward: Tensor | None = None,
    full: tuple[Tensor, Tensor] | None = None,
    whiten_stats: tuple[float, float] | None = None,
) -> Coefficients:
    """dL/dlogp of ``config.batch_loss`` on stacked groups: ``tok`` (..., B, T) and, when ``full`` =
    (logp_full, logp_ref_full) (..., B, T, V) is given (estimators reading whole distributions), ``full``
    (..., B, T, V); a group's update is minus the gradient these coefficients define (``Coefficients``).

    Inputs are (..., B, T) log-probabilities (0 on padding) of the current policy (differentiated here), the
    behaviour policy and the reference; ``task_reward`` (..., B) or None; ``whiten_stats`` as ``batch_loss``.
    A loss of the wrong shape or with non-finite values is refused (ValueError)."""
    leaf = logp.detach().clone().requires_grad_(True)
    if full is not None:
        full = (full[0].detach().clone().requires_grad_(True), full[1])
    extra = {"full": full} if full else {}
    loss = config.batch_loss(leaf, logp_old, logp_ref, mask, task_reward, whiten_stats, **extra)  # (...,)
    if loss.shape != logp.shape[:-2]:
        raise ValueError(f"{config.label}: the loss has shape {tuple(loss.shape)}, expected {tuple(logp.shape[:-2])}")
    if not torch.isfinite(loss).all():
        raise ValueError(f"{config.label}: the loss is non-finite (NaN/inf) for some groups")
    grads = input_grads(loss, [leaf] if full is None else [leaf, full[0]])
    return Coefficients(grads[0], None if full is None else grads[1])


def make_config(
    estimator: str | Estimator,
    placement: str | Placement = "reward",
    level: str | Level = "token",
    credit: str | Credit | None = "rtg",
) -> KLConfig:
    """The basic configuration estimator x placement x level x credit, as the one configuration type ``Recipe``:
    one response (B = 1), on-policy REINFORCE (no baseline, no ratio), token-sum, coefficient 1 on each KL term.
    Its update is the per-sample estimate g(y) of grad KL(pi || pi_ref) of BACKGROUND section 3; credit only
    matters with a score-function term (reward or both) and is dropped for loss."""
    from .recipes import Recipe

    est = get_estimator(estimator)
    placement = parse_enum(Placement, placement)
    level = parse_enum(Level, level)
    credit = None if placement is Placement.LOSS else parse_enum(Credit, credit or Credit.RTG)
    if est.needs_full_logits and level is Level.SEQUENCE:
        raise EstimatorError(f"estimator {est.name!r} reads full next-token distributions and has no sequence level")
    in_reward = placement in (Placement.REWARD, Placement.BOTH)
    in_loss = placement in (Placement.LOSS, Placement.BOTH)
    label = f"{est.name} in {placement.value} ({level.value}" + (f", {credit.value})" if credit else ")")
    return Recipe(
        name=label,
        reward_estimator=est if in_reward else None,
        reward_coef=1.0 if in_reward else 0.0,
        reward_credit=credit.value if credit else "rtg",
        loss_estimator=est if in_loss else None,
        loss_coef=1.0 if in_loss else 0.0,
        pg_ratio="none",
        pg_agg="token-sum",
        loss_agg="token-sum",
        level=level.value,
    )


def all_configs(
    estimators: tuple[str, ...] | list[str] = ("k1", "k2", "k3", "abs"),
    placements: tuple[str, ...] = ("reward", "loss", "both"),
    levels: tuple[str, ...] = ("token", "sequence"),
    credits: tuple[str, ...] = ("full", "rtg"),
) -> list[KLConfig]:
    """Every estimator x placement x level x credit combination (credit collapses for loss)."""
    out: list[KLConfig] = []
    for name in estimators:
        est = get_estimator(name)
        for placement in placements:
            for level in levels:
                if est.needs_full_logits and level == "sequence":
                    continue
                for credit in credits if placement != "loss" else (None,):
                    cfg = make_config(est, placement, level, credit)
                    if cfg not in out:
                        out.append(cfg)
    return out


def __getattr__(name: str):
    if name == "KLConfig":  # the one configuration type lives in recipes.py; this name is kept for imports
        from .recipes import Recipe

        return Recipe
    raise AttributeError(name)


__all__ = [
    "Placement",
    "Level",
    "Credit",
    "TokenBatch",
    "KLConfig",
    "make_config",
    "all_configs",
    "Coefficients",
    "surrogate_coefficients",
    "loss_coefficients",
]
