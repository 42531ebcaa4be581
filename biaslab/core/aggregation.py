"""Loss aggregation: how a (B, T) matrix of per-token losses becomes the scalar a trainer backpropagates.

Defined once here; recipes and framework presets call ``aggregate``. With per-token losses l_it, mask m_it
(1 on the tokens of a response, up to and including its end-of-sequence token), lengths L_i = sum_t m_it and B
the number of non-empty responses in the batch:

    token-sum                  sum_i sum_t m_it l_it
    token-mean                 sum_i sum_t m_it l_it / sum_i L_i          (random normalizer: the batch's tokens)
    seq-mean-token-sum         (1/B) sum_i sum_t m_it l_it
    seq-mean-token-mean        (1/B) sum_i (1/L_i) sum_t m_it l_it       (GRPO's 1/|y|: a length bias)
    seq-mean-token-sum-norm    (1/B) sum_i sum_t m_it l_it / H            (H = horizon, default the padded T)
    constant                   sum_i sum_t m_it l_it / (B * H)           (Dr. GRPO's constant normalizer)

``seq-mean-token-sum-norm`` and ``constant`` coincide (a test checks it); both names exist because frameworks
use both. Only modes whose normalizer does not depend on the sampled lengths keep a per-sequence-summed
objective's gradient direction; the exact engine shows which bias the others add.
"""

from __future__ import annotations

import torch
from torch import Tensor

AGG_MODES = (
    "token-sum",
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
    "constant",
)


class AggregationError(ValueError):
    """Unknown aggregation mode or inconsistent inputs."""


def check_mode(mode: str) -> str:
    """Return ``mode`` if known, else raise with the accepted names."""
    if mode not in AGG_MODES:
        raise AggregationError(f"unknown loss aggregation {mode!r}; choose one of: {', '.join(AGG_MODES)}")
    return mode


def aggregate(loss: Tensor, mask: Tensor, mode: str, horizon: int | float | None = None) -> Tensor:
    """Aggregate per-token losses (..., B, T) with mask (..., B, T) into (...) scalars, one per batch.

    Leading dimensions are independent batches (the exact engine stacks every enumerated group there).
    ``horizon`` is H of ``seq-mean-token-sum-norm`` / ``constant`` (default: the padded length T).
    """
    check_mode(mode)
    if loss.shape != mask.shape or loss.dim() < 2:
        raise AggregationError(
            f"loss and mask must share a shape (..., B, T); got {tuple(loss.shape)} and {tuple(mask.shape)}"
        )
    mask = mask.to(loss.dtype)
    horizon = loss.shape[-1] if horizon is None else horizon
    if horizon <= 0:
        raise AggregationError(f"horizon must be positive, got {horizon}")
    per_seq_sum = (loss * mask).sum(-1)  # (..., B)
    lengths = mask.sum(-1)  # (..., B)
    n_seq = (lengths > 0).to(loss.dtype).sum(-1)  # (...,)
    if mode == "token-sum":
        return per_seq_sum.sum(-1)
    if mode == "token-mean":
        return per_seq_sum.sum(-1) / lengths.sum(-1).clamp(min=1)
    if mode == "seq-mean-token-sum":
        return per_seq_sum.sum(-1) / n_seq.clamp(min=1)
    if mode == "seq-mean-token-mean":
        return (per_seq_sum / lengths.clamp(min=1)).sum(-1) / n_seq.clamp(min=1)
    # seq-mean-token-sum-norm and constant
    return per_seq_sum.sum(-1) / (n_seq.clamp(min=1) * horizon)


def nominal_token_weight(mode: str, batch_size: int, length: int, horizon: int | float | None = None) -> float:
    """The weight ``aggregate`` gives one token when all ``batch_size`` responses have the full ``length``.

    For the length-independent modes this is the weight at every length; the exact engine multiplies it by the
    batch size to get the scale an unbiased recipe's expected gradient must have.
    """
    loss = torch.zeros(batch_size, length, dtype=torch.float64)
    loss[0, 0] = 1.0
    return float(aggregate(loss, torch.ones_like(loss), mode, horizon))


__all__ = ["AGG_MODES", "AggregationError", "aggregate", "check_mode", "nominal_token_weight"]
