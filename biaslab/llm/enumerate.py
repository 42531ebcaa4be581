"""Exact expectations on a tiny model: enumerate every response of length L over a small vocabulary.

For one prompt x and responses y in {0..V-1}^L (no EOS), the LLM path's per-sample gradients weighted by
pi(y|x) give E_{y~pi}[g(y)] exactly (no Monte Carlo noise), and weighted by pi_ref(y|x) the forward direction
grad KL(pi_ref || pi) = -sum_y pi_ref(y) grad log pi(y). This is the toy engine's idea applied to a real Hugging
Face model, so the Monte Carlo statistics of ``run.py`` can be checked against truths (tests, benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..exact import enumerate_sequences
from .models import LLMError
from .policy import reference_mode
from .run import REFERENCE_KEY, Setup, forward_grads, sample_grads
from .sample import Generation, score_logits


@dataclass
class ExactLLM:
    """E_{y~pi}[g] per key of ``sample_grads`` ("reference" is grad KL(pi || pi_ref)), the forward direction
    grad KL(pi_ref || pi), the sequence KL(pi || pi_ref), and the response probabilities."""

    expected: dict[str, Tensor]
    forward_kl: Tensor
    kl: float
    pi: Tensor
    pi_ref: Tensor

    @property
    def reverse_kl(self) -> Tensor:
        return self.expected[REFERENCE_KEY]


def exact_expectations(setup: Setup, length: int, dtype: str = "float32", max_responses: int = 20_000) -> ExactLLM:
    """Enumerate the V**L responses to the first prompt of ``setup`` and take exact expectations."""
    vocab = setup.loaded.vocab_size
    if vocab**length > max_responses:
        raise LLMError(f"enumerating {vocab}**{length} responses exceeds {max_responses}; use a smaller model")
    tokens = enumerate_sequences(vocab, length)  # (N, L)
    device = next(setup.loaded.model.parameters()).device
    tokens = tokens.to(device)
    n = tokens.shape[0]
    prompt = torch.tensor([setup.prompts[0]] * n, device=device)
    gen = Generation(prompt, torch.ones_like(prompt), tokens, torch.ones(tokens.shape, device=device))
    model = setup.loaded.model
    with torch.no_grad():
        lp = torch.log_softmax(score_logits(model, gen, dtype), -1)
        with reference_mode(model):
            lr = torch.log_softmax(score_logits(model, gen, dtype), -1)
    idx = tokens.unsqueeze(-1)
    lp = lp.gather(-1, idx).squeeze(-1).sum(1).to(torch.float64)  # (N,) log pi(y)
    lr = lr.gather(-1, idx).squeeze(-1).sum(1).to(torch.float64)  # (N,) log pi_ref(y)
    pi, pi_ref = lp.exp(), lr.exp()
    grads, _ = sample_grads(setup, gen, dtype)
    expected = {k: pi @ g for k, g in grads.items()}
    forward = pi_ref @ forward_grads(setup, gen, dtype)
    return ExactLLM(expected, forward, float(pi @ (lp - lr)), pi, pi_ref)


__all__ = ["ExactLLM", "exact_expectations"]
