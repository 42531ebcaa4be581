"""Variable-length responses: an end-of-sequence token, and enumeration of every complete response.

A toy model over {0..V-1} with ``eos`` one of its tokens generates until it emits ``eos`` or reaches T tokens.
A complete response y of length L has probability pi(y) = prod_{t<L} pi(y_t | y_<t); the end-of-sequence token
is part of the response (it is sampled, so its log-probability is trained, as in every framework's response
mask). Responses are stored padded to T: ``tokens`` (N, T) with 0 after the end, ``mask`` (N, T) with 1 on the
L tokens of the response. Padded positions never enter a log-probability: callers multiply by ``mask``.

Without an end-of-sequence token (``eos=None``) this is the fixed-length enumeration of all V**T sequences.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from .toy import DTYPE, AutoregressiveModel, ModelError


def count_complete(vocab_size: int, length: int, eos: int | None) -> int:
    """Number of complete responses: sum_{L<T} (V-1)**(L-1) + (V-1)**(T-1) * V with an EOS; V**T without."""
    if eos is None:
        return vocab_size**length
    v = vocab_size - 1
    return sum(v ** (L - 1) for L in range(1, length)) + v ** (length - 1) * vocab_size


def enumerate_complete(vocab_size: int, length: int, eos: int | None) -> tuple[Tensor, Tensor]:
    """(tokens (N, T) long, mask (N, T) float64): every complete response, shortest first, each length in
    lexicographic order."""
    if eos is not None and not 0 <= eos < vocab_size:
        raise ModelError(f"eos must be a token id in [0, {vocab_size}); got {eos}")
    if eos is None:
        seqs = list(itertools.product(range(vocab_size), repeat=length))
        tokens = torch.tensor(seqs, dtype=torch.long).reshape(-1, length)
        return tokens, torch.ones(tokens.shape, dtype=DTYPE)
    content = [v for v in range(vocab_size) if v != eos]
    rows, masks = [], []
    for L in range(1, length + 1):
        lasts = [eos] if L < length else list(range(vocab_size))
        for body in itertools.product(content, repeat=L - 1):
            for last in lasts:
                rows.append(list(body) + [last] + [0] * (length - L))
                masks.append([1.0] * L + [0.0] * (length - L))
    return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=DTYPE)


def masked_token_logp(model: AutoregressiveModel, tokens: Tensor, mask: Tensor) -> Tensor:
    """(N, T) log pi(y_t | y_<t) on response tokens, exactly 0 on padding (differentiable)."""
    logp_full = model.log_probs(tokens)  # (N, T, V)
    return logp_full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * mask  # (N, T)


@torch.no_grad()
def sample_complete(
    model: AutoregressiveModel, n: int, eos: int | None, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """(tokens (n, T), mask (n, T)): responses drawn from ``model`` until ``eos`` or T tokens, padded with 0."""
    tokens = model.sample(n, generator=generator)  # (n, T): a fixed-length draw; cut it at the first eos
    if eos is None:
        return tokens, torch.ones(tokens.shape, dtype=DTYPE)
    is_eos = (tokens == eos).to(torch.long)  # (n, T)
    ended_before = torch.cumsum(is_eos, 1) - is_eos  # (n, T) number of eos strictly before t
    mask = (ended_before == 0).to(DTYPE)  # (n, T)
    return tokens * mask.to(torch.long), mask


__all__ = ["count_complete", "enumerate_complete", "masked_token_logp", "sample_complete"]
