"""Per-token pieces of the pass: masked log-probabilities (padding replaced by the reference, so every estimator is
0 there), the configurations' coefficients dL/dlogp, the cotangents of the reference and forward directions on
full logits, the value statistics of k1, k2, k3 and the sequence KLs of generated responses, all in float32 or
better."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ..core.estimators import get_estimator
from ..core.placements import Coefficients, surrogate_coefficients
from .models import LLMError
from .options import (
    POSITION_SLICE,
    VALUE_ESTIMATORS,
    LLMConfig,
    LLMOptions,
    Setup,
)
from .policy import reference_mode
from .sample import (
    Generation,
    generate,
    score_logits,
)


def masked_logp(logp_full: Tensor, logp_ref_full: Tensor, mask: Tensor) -> Tensor:
    """(B, L, V) policy log-probs on response positions and the reference's (fixed) on padding."""
    return torch.where(mask.bool().unsqueeze(-1), logp_full, logp_ref_full)

def masked_coefficients(cfg: LLMConfig, tokens: Tensor, logp_m: Tensor, logp_ref_full: Tensor, mask: Tensor):
    """dS/dlogp of ``cfg`` on masked (B, L, V) log-probs, padded positions zeroed (they do not depend on theta).

    Refuses an estimator that is not exactly 0 at delta = 0: padding would then change the sample's value.
    """
    _refuse_nonzero_padding(cfg, logp_ref_full, mask)
    coef = surrogate_coefficients(cfg.recipe, tokens, logp_m, logp_ref_full)
    full = None if coef.full is None else coef.full * mask.unsqueeze(-1)
    return Coefficients(coef.tok * mask, full)

def _refuse_nonzero_padding(cfg: LLMConfig, logp_ref: Tensor, mask: Tensor) -> None:
    """Padded positions carry logp == logp_ref; a token-level estimator must be exactly 0 there."""
    if cfg.level == "token" and not bool(mask.all()):
        with torch.no_grad():
            k = get_estimator(cfg.estimator)(logp_ref, logp_ref)  # (B, L) or (B, L) from (B, L, V)
        if bool((k[~mask.bool()] != 0).any()):
            raise LLMError(
                f"estimator {cfg.estimator!r} is not 0 when logp == logp_ref, so padded positions would "
                "change its value; use fixed-length responses (no EOS) for it"
            )

def token_coefficients(cfg: LLMConfig, tokens: Tensor, lp: Tensor, lr: Tensor, mask: Tensor) -> Tensor:
    """(B, L) dS/dlogp on the sampled tokens for an estimator that reads only them (no (B, L, V) tensor):
    ``lp`` the masked policy log-probs of the sampled tokens, ``lr`` the reference's."""
    _refuse_nonzero_padding(cfg, lr, mask)
    dummy, dummy_ref = lp.unsqueeze(-1), lr.unsqueeze(-1)  # (B, L, 1): never read by such estimators
    coef = surrogate_coefficients(cfg.recipe, tokens, dummy, dummy_ref, lp, lr)
    return coef.tok * mask

def _ref_logp_full(setup: Setup, gen: Generation, dtype: str) -> Tensor:
    """(B, L, V) log pi_ref(. | x, y_<t), float32 (or float64), no graph."""
    with torch.no_grad(), reference_mode(setup.reference_model):
        return score_logits(setup.reference_model, gen, dtype).log_softmax(-1)

def _slices(L: int):
    for a in range(0, L, POSITION_SLICE):
        yield slice(a, min(a + POSITION_SLICE, L))

def token_stats(logits: Tensor, logp_ref_full: Tensor, tokens: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
    """(lp, lr, kl) each (B, L): masked policy log-prob of the sampled token (the reference's on padding), the
    reference's, and the exact next-token KL(pi(.|y_<t) || pi_ref(.|y_<t)) (0 on padding); computed over slices of
    positions so no extra (B, L, V) tensor is kept."""
    B, L, _ = logits.shape
    lp = logits.new_zeros(B, L)
    kl = logits.new_zeros(B, L)
    with torch.no_grad():
        for s in _slices(L):
            logp = logits[:, s].detach().log_softmax(-1)  # (B, l, V)
            lp[:, s] = logp.gather(-1, tokens[:, s].unsqueeze(-1)).squeeze(-1)
            kl[:, s] = (logp.exp() * (logp - logp_ref_full[:, s])).sum(-1)
    lr = logp_ref_full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, L)
    m = mask.bool()
    return torch.where(m, lp, lr), lr, kl * mask

def _token_cotangent(logits: Tensor, tokens: Tensor, tok: Tensor, out: Tensor) -> Tensor:
    """out (B, L, V) <- tok_t (1[v = y_t] - p_tv), the logit cotangent of sum_t tok_t log pi(y_t|y_<t)."""
    for s in _slices(logits.shape[1]):
        torch.mul(logits[:, s].detach().softmax(-1), -tok[:, s].unsqueeze(-1), out=out[:, s])
    return out.scatter_add_(-1, tokens.unsqueeze(-1), tok.unsqueeze(-1))

def _reference_cotangent(logits: Tensor, logp_ref_full: Tensor, tokens: Tensor, kl: Tensor, mask: Tensor,
                         out: Tensor) -> Tensor:
    """Cotangent of rb in reward + loss (reward-to-go): score part c_t (1[v = y_t] - p_v) with c_t = sum_{s>=t} KL_s,
    plus the pathwise gradient of KL_t = sum_v p_v (log p_v - log q_v): p_v (log p_v - log q_v - KL_t)."""
    rtg = kl.flip(-1).cumsum(-1).flip(-1) * mask  # (B, L)
    _token_cotangent(logits, tokens, rtg, out)
    for s in _slices(logits.shape[1]):
        logp = logits[:, s].detach().log_softmax(-1)  # (B, l, V)
        out[:, s] += logp.exp() * (logp - logp_ref_full[:, s] - kl[:, s].unsqueeze(-1)) * mask[:, s].unsqueeze(-1)
    return out

def _forward_token_cotangent(logits: Tensor, logp_ref_full: Tensor, mask: Tensor, out: Tensor) -> Tensor:
    """Cotangent of -sum_t sum_v q_v log p_v (the token-level forward KL, prefix law fixed): p_v - q_v, masked."""
    for s in _slices(logits.shape[1]):
        torch.sub(logits[:, s].detach().softmax(-1), logp_ref_full[:, s].exp(), out=out[:, s])
        out[:, s] *= mask[:, s].unsqueeze(-1)
    return out

def value_rows(lp: Tensor, lr: Tensor, kl: Tensor, mask: Tensor) -> Tensor:
    """(B, 8) per sample: sum_t KL_t (the exact per-token KLs summed), sum_t k_t for k1, k2, k3, sum_t (k_t - KL_t)^2
    for k1, k2, k3, and the number of response tokens."""
    with torch.no_grad():
        ks = [get_estimator(name)(lp, lr) * mask for name in VALUE_ESTIMATORS]  # 3 x (B, L)
        cols = [kl.sum(1)] + [k.sum(1) for k in ks] + [(((k - kl) * mask) ** 2).sum(1) for k in ks] + [mask.sum(1)]
    return torch.stack(cols, 1).to(torch.float64)  # (B, 8)

def sequence_kls(setup: Setup, gen: Generation, dtype: str) -> Tensor:
    """(B,) float64 sum_t KL(pi(.|y_<t) || pi_ref(.|y_<t)) over each response (exact per-token KLs)."""
    with torch.no_grad():
        logp_ref_full = _ref_logp_full(setup, gen, dtype)
        logits = score_logits(setup.loaded.model, gen, dtype)
        mask = gen.mask.to(logits.dtype)
        return token_stats(logits, logp_ref_full.to(logits.dtype), gen.completion, mask)[2].sum(1).double()

def _generate(setup: Setup, opts: LLMOptions, start: int, stop: int, stream: int, reference: bool = False
              ) -> Generation:
    idx = list(range(start, stop))
    prompts = [setup.prompts[(i // setup.group) % len(setup.prompts)] for i in idx]  # a group shares its prompt
    model = setup.reference_model if reference else setup.loaded.model
    with reference_mode(model) if reference else contextlib.nullcontext():
        return generate(model, prompts, opts.max_new_tokens, sample_seeds=[(opts.seed, stream, i) for i in idx],
                        eos=setup.eos, pad=setup.loaded.pad_token_id, dtype=opts.dtype)
