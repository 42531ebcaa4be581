"""The precision a user's code computes in: the dtype an estimator returns on float64 inputs (float32 when a float64
output holds only float32-representable values, i.e. the function casts inside), and a configuration's lowest one.
The verdict's relative tolerance follows it (``biaslab.core.verdict``).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


@functools.lru_cache(maxsize=256)
def estimator_dtype(est) -> torch.dtype:
    """The precision an estimator computes in: its output dtype on float64 inputs, or float32 when a float64
    output holds only float32-representable values (a function that casts internally)."""
    if est is None:
        return torch.float64
    g = torch.Generator().manual_seed(12345)
    if est.needs_full_logits:  # two (3, 4, 5) next-token log-distributions, else two (3, 4) log-probabilities
        x, y = (torch.log_softmax(torch.randn(3, 4, 5, generator=g, dtype=torch.float64), -1) for _ in range(2))
    else:
        x, y = (-0.1 - 2 * torch.rand(3, 4, generator=g, dtype=torch.float64) for _ in range(2))
    try:
        with torch.no_grad():
            out = est.fn(x, y)
    except Exception:  # the engine's own call reports the error with its context
        return torch.float64
    if not isinstance(out, Tensor) or not out.is_floating_point():
        return torch.float64
    if out.dtype == torch.float64 and out.numel() and bool((out.float().double() == out).all()):
        return torch.float32
    return out.dtype


def config_dtype(config) -> torch.dtype:
    """The lowest precision among a configuration's estimators (or its declared ``compute_dtype``)."""
    declared = getattr(config, "compute_dtype", None)
    if declared is not None:
        return declared
    dts = [estimator_dtype(getattr(config, name, None)) for name in ("reward_estimator", "loss_estimator")]
    return max(dts, key=lambda d: torch.finfo(d).eps)

