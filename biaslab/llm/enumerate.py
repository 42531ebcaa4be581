"""Exact expectations on a tiny model: enumerate every response of length L over a small vocabulary.

For one prompt x and responses y in {0..V-1}^L (no EOS), the LLM path's per-sample gradients weighted by
pi(y|x) give E_{y~pi}[g(y)] exactly (no Monte Carlo noise), and weighted by pi_ref(y|x) the forward direction
grad KL(pi_ref || pi) = -sum_y pi_ref(y) grad log pi(y). This is the toy engine's idea applied to a real Hugging
Face model, so the Monte Carlo statistics of ``run.py`` can be checked against truths (tests, calibration).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..engines.exact import enumerate_sequences
from .calibration import Enumerated
from .models import LLMError
from .run import REFERENCE_KEY, Setup, _ref_logp_full, forward_grads, sample_grads
from .sample import Generation, score_logits


@dataclass
class ExactLLM:
    """E_{y~pi}[g] per key of ``sample_grads`` ("reference" is grad KL(pi || pi_ref)), the forward direction
    grad KL(pi_ref || pi), the sequence KL(pi || pi_ref), and every response's rows and probabilities."""

    expected: dict[str, Tensor]
    forward_kl: Tensor
    kl: float
    pi: Tensor
    pi_ref: Tensor
    rows: Enumerated

    @property
    def reverse_kl(self) -> Tensor:
        return self.expected[REFERENCE_KEY]


def exact_expectations(setup: Setup, length: int, dtype: str = "float32", max_responses: int = 20_000,
                       batch: int = 512) -> ExactLLM:
    """Enumerate the V**L responses to the first prompt of ``setup`` and take exact expectations."""
    vocab = setup.loaded.vocab_size
    if vocab**length > max_responses:
        raise LLMError(f"enumerating {vocab}**{length} responses exceeds {max_responses}; use a smaller model")
    device = next(setup.loaded.model.parameters()).device
    tokens_all = enumerate_sequences(vocab, length).to(device)  # (N, L)
    model = setup.loaded.model
    lps, lrs, fwd = [], [], []
    rows: dict[str, list[Tensor]] = {}
    for a in range(0, tokens_all.shape[0], batch):
        tokens = tokens_all[a : a + batch]
        n = tokens.shape[0]
        prompt = torch.tensor([setup.prompts[0]] * n, device=device)
        gen = Generation(prompt, torch.ones_like(prompt), tokens, torch.ones(tokens.shape, device=device))
        with torch.no_grad():
            lp = torch.log_softmax(score_logits(model, gen, dtype), -1)
        lr = _ref_logp_full(setup, gen, dtype)  # pi_ref: the LoRA switched off, or the --reference model
        idx = tokens.unsqueeze(-1)
        lps.append(lp.gather(-1, idx).squeeze(-1).sum(1).to(torch.float64))  # (n,) log pi(y)
        lrs.append(lr.gather(-1, idx).squeeze(-1).sum(1).to(torch.float64))  # (n,) log pi_ref(y)
        grads, _ = sample_grads(setup, gen, dtype)
        for k, g in grads.items():
            rows.setdefault(k, []).append(g)
        fwd.append(forward_grads(setup, gen, dtype))
    lp, lr = torch.cat(lps), torch.cat(lrs)
    pi, pi_ref = lp.exp(), lr.exp()
    full = {k: torch.cat(v) for k, v in rows.items()}
    forward_rows = torch.cat(fwd)
    expected = {k: pi @ g for k, g in full.items()}
    return ExactLLM(expected, pi_ref @ forward_rows, float(pi @ (lp - lr)), pi, pi_ref,
                    Enumerated(full, forward_rows, pi, pi_ref))


__all__ = ["ExactLLM", "exact_expectations"]
