"""The small types every layer shares: where an estimate enters (``Placement``), at which level (``Level``), how its
score-function term is credited (``Credit``), a batch of sequences with both models' log-probabilities
(``TokenBatch``), the coefficients dS/dlogp of a per-sample surrogate (``Coefficients``), and ``at_tokens``."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

from torch import Tensor


def at_tokens(x: Tensor, tokens: Tensor) -> Tensor:
    """(..., T) the entries of x (..., T, V) at the tokens (..., T), e.g. log pi(y_t | y_<t) from log pi(. | y_<t)."""
    return x.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


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


def parse_enum(cls: type[Enum], value: object) -> Enum:
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
        return at_tokens(self.logp_full, self.tokens)

    @property
    def logp_ref(self) -> Tensor:
        """(N, T) log pi_ref(y_t | y_<t) at the sampled tokens."""
        if self.sampled_logp_ref is not None:
            return self.sampled_logp_ref
        return at_tokens(self.logp_ref_full, self.tokens)


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
