"""Per-sample gradients g_n = sum_{t,v} coef[n,t,v] grad log pi(v | y_<t) for models without a closed form.

Uses torch.func (functional_call + vmap + grad) in chunks, so memory stays at chunk x P floats.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import functional_call, grad, vmap

from .toy import AutoregressiveModel


def _per_sample_fn(model: AutoregressiveModel, names: list[str], frozen: dict[str, Tensor]):
    def loss(params: tuple[Tensor, ...], tokens: Tensor, coef: Tensor) -> Tensor:
        state = {**frozen, **dict(zip(names, params))}
        logp_full = functional_call(model, state, (tokens.unsqueeze(0),), {}, strict=False)  # (1, T, V)
        return (coef.unsqueeze(0) * logp_full).sum()

    return vmap(grad(loss), in_dims=(None, 0, 0))


def per_sample_grads(model: AutoregressiveModel, tokens: Tensor, coef: Tensor, chunk: int = 2048):
    """Yield (start, (n, P) flat per-sample gradients) chunk by chunk, parameter order of ``model``."""
    named = {n: p for n, p in model.named_parameters()}
    names = [n for n, p in named.items() if p.requires_grad]
    frozen = {n: p.detach() for n, p in named.items() if not p.requires_grad}
    params = tuple(named[n].detach() for n in names)
    fn = _per_sample_fn(model, names, frozen)
    for start in range(0, tokens.shape[0], chunk):
        gs = fn(params, tokens[start : start + chunk], coef[start : start + chunk].detach())
        yield start, torch.cat([g.reshape(g.shape[0], -1) for g in gs], 1)  # (n, P)


def per_sample_sq_norms(model: AutoregressiveModel, tokens: Tensor, coef: Tensor, chunk: int = 2048) -> Tensor:
    """(N,) ||g_n||^2 via torch.func, chunked."""
    out = torch.empty(tokens.shape[0], dtype=coef.dtype)
    for start, g in per_sample_grads(model, tokens, coef, chunk):
        out[start : start + g.shape[0]] = (g**2).sum(1)
    return out


def per_sample_gram(model: AutoregressiveModel, tokens: Tensor, chunk: int = 512) -> Tensor:
    """(N, T*V, T*V) Gram matrices G_n[(t,v),(s,w)] = grad log pi(v|y_n,<t) . grad log pi(w|y_n,<s).

    Computed once per enumeration (per-sample Jacobians of the (T, V) next-token log-probabilities, chunked), so
    that any coefficients give ||g_n||^2 = c_n^T G_n c_n without another pass through the model."""
    from torch.func import jacrev

    named = {n: p for n, p in model.named_parameters()}
    names = [n for n, p in named.items() if p.requires_grad]
    frozen = {n: p.detach() for n, p in named.items() if not p.requires_grad}
    params = tuple(named[n].detach() for n in names)

    def logp_one(ps: tuple[Tensor, ...], y: Tensor) -> Tensor:
        state = {**frozen, **dict(zip(names, ps))}
        return functional_call(model, state, (y.unsqueeze(0),), {}, strict=False)[0].reshape(-1)  # (T*V,)

    jac_fn = vmap(jacrev(logp_one), in_dims=(None, 0))
    N, T = tokens.shape
    TV = T * model.vocab_size
    out = torch.empty(N, TV, TV, dtype=torch.float64)
    for start in range(0, N, chunk):
        jac = jac_fn(params, tokens[start : start + chunk])  # tuple of (n, TV, *shape)
        j = torch.cat([x.reshape(x.shape[0], TV, -1) for x in jac], -1)  # (n, TV, P)
        out[start : start + j.shape[0]] = j @ j.transpose(1, 2)
    return out
