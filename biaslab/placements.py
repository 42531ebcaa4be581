"""How a KL estimate enters the gradient: placement x level x credit, as per-sample surrogate losses.

For a per-sample estimate K_theta(y) the gradient of its expectation splits in two (the paper's Eq. 6):

    grad E_{y~pi}[K(y)] = E[ grad K(y) ]  (pathwise)  +  E[ K(y) * grad log pi(y) ]  (score function)

A ``KLConfig`` picks which half a trainer estimates. Its ``surrogate`` returns one scalar per sample whose
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

from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

import torch
from torch import Tensor

from .estimators import Estimator, EstimatorError, get_estimator


class Placement(str, Enum):
    """Where the estimate enters: detached in the reward, backpropagated in the loss, or both."""

    REWARD = "reward"
    LOSS = "loss"
    BOTH = "both"


class Level(str, Enum):
    """token: sum_t k(delta_t); sequence: k(sum_t delta_t)."""

    TOKEN = "token"
    SEQUENCE = "sequence"


class Credit(str, Enum):
    """Which part of the KL return multiplies grad log pi(y_t): all of it, or the reward-to-go."""

    FULL = "full"
    RTG = "rtg"


def _enum(cls: type[Enum], value: object) -> Enum:
    try:
        return cls(value.value if isinstance(value, Enum) else value)
    except ValueError:
        choices = ", ".join(m.value for m in cls)
        raise ValueError(f"unknown {cls.__name__.lower()} {value!r}; choose one of: {choices}") from None


@dataclass(frozen=True)
class TokenBatch:
    """Sampled (or enumerated) sequences with both models' next-token log-probabilities.

    tokens: (N, T) long; logp_full: (N, T, V) log pi(.|y_<t), differentiable; logp_ref_full: (N, T, V) fixed.
    """

    tokens: Tensor
    logp_full: Tensor
    logp_ref_full: Tensor
    sampled_logp: Tensor | None = None  # (N, T) optional: given, it replaces the gather from logp_full
    sampled_logp_ref: Tensor | None = None  # (N, T) optional

    @property
    def logp(self) -> Tensor:
        """(N, T) log pi(y_t | y_<t) at the sampled tokens."""
        if self.sampled_logp is not None:
            return self.sampled_logp
        return self.logp_full.gather(-1, self.tokens.unsqueeze(-1)).squeeze(-1)

    @property
    def logp_ref(self) -> Tensor:
        """(N, T) log pi_ref(y_t | y_<t) at the sampled tokens."""
        if self.sampled_logp_ref is not None:
            return self.sampled_logp_ref
        return self.logp_ref_full.gather(-1, self.tokens.unsqueeze(-1)).squeeze(-1)

    @property
    def delta(self) -> Tensor:
        """(N, T) token log-ratio delta_t = logp_t - logp_ref_t."""
        return self.logp - self.logp_ref


@dataclass(frozen=True)
class KLConfig:
    """One way to estimate grad KL(pi_theta || pi_ref): estimator x placement x level x credit.

    Credit only matters when a score-function term is present (reward or both); for loss it is ``None``.
    """

    estimator: Estimator
    placement: Placement = Placement.REWARD
    level: Level = Level.TOKEN
    credit: Credit | None = Credit.RTG

    def __post_init__(self) -> None:
        object.__setattr__(self, "estimator", get_estimator(self.estimator))
        object.__setattr__(self, "placement", _enum(Placement, self.placement))
        object.__setattr__(self, "level", _enum(Level, self.level))
        if self.placement is Placement.LOSS:
            object.__setattr__(self, "credit", None)
        else:
            object.__setattr__(self, "credit", _enum(Credit, self.credit or Credit.RTG))
        if self.estimator.needs_full_logits and self.level is Level.SEQUENCE:
            raise EstimatorError(
                f"estimator {self.estimator.name!r} reads full next-token distributions and has no sequence level"
            )

    @property
    def label(self) -> str:
        credit = f", {self.credit.value}" if self.credit is not None else ""
        return f"{self.estimator.name} in {self.placement.value} ({self.level.value}{credit})"

    # ------------------------------------------------------------------ values

    def token_values(self, batch: TokenBatch) -> Tensor:
        """(N, T) per-token estimates k_t (token level only), differentiable through logp."""
        if self.estimator.needs_full_logits:
            return self.estimator(batch.logp_full, batch.logp_ref_full)  # (N, T)
        return self.estimator(batch.logp, batch.logp_ref)  # (N, T)

    def sequence_value(self, batch: TokenBatch) -> Tensor:
        """(N,) the per-sample KL estimate K(y) at this level, differentiable through logp."""
        if self.level is Level.TOKEN:
            return self.token_values(batch).sum(-1)
        return self.estimator(batch.logp.sum(-1), batch.logp_ref.sum(-1))  # (N,)

    def returns(self, batch: TokenBatch) -> tuple[Tensor, Tensor]:
        """(c, K): the (N, T) credit c_t multiplying grad logp_t, and the (N,) estimate K."""
        if self.level is Level.TOKEN:
            k = self.token_values(batch)  # (N, T)
            big_k = k.sum(-1)  # (N,)
            if self.credit is Credit.RTG:
                c = k.flip(-1).cumsum(-1).flip(-1)  # (N, T) sum_{s>=t} k_s
            else:
                c = big_k.unsqueeze(-1).expand_as(k)  # (N, T)
        else:
            big_k = self.sequence_value(batch)  # (N,)
            c = big_k.unsqueeze(-1).expand(batch.tokens.shape)  # (N, T)
        return c, big_k

    # ------------------------------------------------------------------ the surrogate

    def surrogate(self, batch: TokenBatch) -> Tensor:
        """(N,) per-sample surrogate S(y): grad_theta S(y) is this configuration's gradient estimate g(y)."""
        c, big_k = self.returns(batch)
        score = (c.detach() * batch.logp).sum(-1)  # (N,)
        if self.placement is Placement.REWARD:
            return score
        if self.placement is Placement.LOSS:
            return big_k
        return score + big_k


class Coefficients(NamedTuple):
    """dS/dlogp: ``tok`` (N, T) on the sampled tokens; ``full`` (N, T, V) on whole distributions, or None.

    A sample's gradient estimate is g(y) = sum_t tok_t grad log pi(y_t|y_<t) + sum_{t,v} full_tv grad log pi(v|y_<t).
    """

    tok: Tensor
    full: Tensor | None

    def dense(self, tokens: Tensor, vocab_size: int) -> Tensor:
        """(N, T, V) one tensor of full coefficients: ``tok`` scattered onto the sampled tokens, plus ``full``."""
        if self.full is None:
            out = self.tok.new_zeros(*tokens.shape, vocab_size)
        else:
            out = self.full.clone()
        return out.scatter_add_(-1, tokens.unsqueeze(-1), self.tok.unsqueeze(-1))


def surrogate_coefficients(
    config: KLConfig,
    tokens: Tensor,
    logp_full: Tensor,
    logp_ref_full: Tensor,
    logp: Tensor | None = None,
    logp_ref: Tensor | None = None,
) -> Coefficients:
    """Differentiate the surrogate with respect to the log-probabilities (not theta): one cheap backward pass on
    (N, T) tensors (and (N, T, V) for estimators that read full distributions). Both engines then map the
    coefficients to theta in their own way (closed form, one backward pass, or torch.func per sample)."""
    if logp is None:
        logp = logp_full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if logp_ref is None:
        logp_ref = logp_ref_full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    tok = logp.detach().requires_grad_(True)  # (N, T)
    needs_full = config.estimator.needs_full_logits
    full = logp_full.detach().requires_grad_(needs_full)  # (N, T, V)
    s = config.surrogate(TokenBatch(tokens, full, logp_ref_full.detach(), tok, logp_ref.detach()))  # (N,)
    if s.shape != tokens.shape[:1]:
        raise ValueError(f"surrogate of {config.label} has shape {tuple(s.shape)}, expected ({tokens.shape[0]},)")
    inputs = [tok, full] if needs_full else [tok]
    grads = torch.autograd.grad(s.sum(), inputs, allow_unused=True) if s.requires_grad else [None] * len(inputs)
    a = torch.zeros_like(tok) if grads[0] is None else grads[0]
    c = None
    if needs_full:
        c = torch.zeros_like(full) if grads[1] is None else grads[1]
    return Coefficients(a.detach(), None if c is None else c.detach())


def make_config(
    estimator: str | Estimator,
    placement: str | Placement = "reward",
    level: str | Level = "token",
    credit: str | Credit | None = "rtg",
) -> KLConfig:
    """Build a ``KLConfig`` from names, with clear errors for unknown ones."""
    return KLConfig(get_estimator(estimator), placement, level, credit)


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
                    cfg = KLConfig(est, placement, level, credit)
                    if cfg not in out:
                        out.append(cfg)
    return out


def as_batch(tokens: Tensor, logp_full: Tensor, logp_ref_full: Tensor) -> TokenBatch:
    """Validated ``TokenBatch``: shapes agree, tokens in range."""
    if tokens.dim() != 2 or logp_full.dim() != 3 or logp_full.shape != logp_ref_full.shape:
        raise ValueError(
            f"expected tokens (N, T) and log-probs (N, T, V) of equal shape; got {tuple(tokens.shape)}, "
            f"{tuple(logp_full.shape)}, {tuple(logp_ref_full.shape)}"
        )
    if tokens.shape != logp_full.shape[:2]:
        raise ValueError(f"tokens {tuple(tokens.shape)} do not match log-probs {tuple(logp_full.shape)}")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= logp_full.shape[-1]):
        raise ValueError(f"tokens must lie in [0, {logp_full.shape[-1]})")
    return TokenBatch(tokens, logp_full, logp_ref_full)


__all__ = [
    "Placement",
    "Level",
    "Credit",
    "TokenBatch",
    "KLConfig",
    "make_config",
    "all_configs",
    "as_batch",
    "Coefficients",
    "surrogate_coefficients",
]
