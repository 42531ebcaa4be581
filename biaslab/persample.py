"""Per-sample gradients g_n = sum_{t,v} coef[n,t,v] grad log pi(v | y_<t) for models without a closed form.

Uses torch.func (functional_call + vmap + grad) in chunks, so memory stays at chunk x P floats.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import functional_call, grad, vmap

from .toy import AutoregressiveModel


def _functional(model: AutoregressiveModel):
    """(params, logp_one(params, y (T,)) -> (T, V) next-token log-probabilities): the model as a function of its
    trainable parameters, for torch.func."""
    named = {n: p for n, p in model.named_parameters()}
    names = [n for n, p in named.items() if p.requires_grad]
    frozen = {n: p.detach() for n, p in named.items() if not p.requires_grad}

    def logp_one(ps: tuple[Tensor, ...], y: Tensor) -> Tensor:
        state = {**frozen, **dict(zip(names, ps))}
        return functional_call(model, state, (y.unsqueeze(0),), {}, strict=False)[0]  # (T, V)

    return tuple(named[n].detach() for n in names), logp_one


def per_sample_grads(model: AutoregressiveModel, tokens: Tensor, coef: Tensor, chunk: int = 2048):
    """Yield (start, (n, P) flat per-sample gradients g_n) chunk by chunk, parameter order of ``model``."""
    params, logp_one = _functional(model)
    fn = vmap(grad(lambda ps, y, c: (c * logp_one(ps, y)).sum()), in_dims=(None, 0, 0))
    for start in range(0, tokens.shape[0], chunk):
        gs = fn(params, tokens[start : start + chunk], coef[start : start + chunk].detach())
        yield start, torch.cat([g.reshape(g.shape[0], -1) for g in gs], 1)  # (n, P)


def per_sample_dots(model: AutoregressiveModel, tokens: Tensor, cx: Tensor, cy: Tensor, chunk: int = 2048) -> Tensor:
    """(N,) g_n(cx) . g_n(cy) of two coefficient sets (N, T, V) via torch.func, chunked (one pass when cy is cx)."""
    out = torch.empty(tokens.shape[0], dtype=cx.dtype)
    grads_y = None if cy is cx else per_sample_grads(model, tokens, cy, chunk)
    for start, gx in per_sample_grads(model, tokens, cx, chunk):
        gy = gx if grads_y is None else next(grads_y)[1]
        out[start : start + gx.shape[0]] = (gx * gy).sum(1)
    return out


def per_sample_token_jacobians(model: AutoregressiveModel, tokens: Tensor, mask: Tensor, chunk: int = 2048):
    """Yield (start, (n, T, P) d log pi(y_t | y_<t) / d theta times ``mask`` (N, T)) chunk by chunk: the per-token
    Jacobian (T rows per response, one reverse pass each), parameter order of ``model``."""
    from torch.func import jacrev

    params, logp_one = _functional(model)

    def tok(ps: tuple[Tensor, ...], y: Tensor) -> Tensor:
        return logp_one(ps, y).gather(-1, y.unsqueeze(-1)).squeeze(-1)  # (T,)

    fn = vmap(jacrev(tok), in_dims=(None, 0))
    for start in range(0, tokens.shape[0], chunk):
        jac = fn(params, tokens[start : start + chunk])  # tuple of (n, T, *shape)
        j = torch.cat([x.reshape(x.shape[0], x.shape[1], -1) for x in jac], -1)  # (n, T, P)
        yield start, j * mask[start : start + chunk, :, None]


def per_sample_gram(model: AutoregressiveModel, tokens: Tensor, chunk: int = 512) -> Tensor:
    """(N, T*V, T*V) Gram matrices G_n[(t,v),(s,w)] = grad log pi(v|y_n,<t) . grad log pi(w|y_n,<s).

    Computed once per enumeration (per-sample Jacobians of the (T, V) next-token log-probabilities, chunked), so
    that any coefficients give ||g_n||^2 = c_n^T G_n c_n without another pass through the model."""
    from torch.func import jacrev

    params, logp_one = _functional(model)
    jac_fn = vmap(jacrev(lambda ps, y: logp_one(ps, y).reshape(-1)), in_dims=(None, 0))  # (T*V,) outputs
    N, T = tokens.shape
    TV = T * model.vocab_size
    out = torch.empty(N, TV, TV, dtype=torch.float64)
    for start in range(0, N, chunk):
        jac = jac_fn(params, tokens[start : start + chunk])  # tuple of (n, TV, *shape)
        j = torch.cat([x.reshape(x.shape[0], TV, -1) for x in jac], -1)  # (n, TV, P)
        out[start : start + j.shape[0]] = j @ j.transpose(1, 2)
    return out
