"""Closed-form end points of KL-regularised training on enumerable toys (V**T sequences, base-V order).

Training maximises J = E_pi[R] - beta * D, with R(y) a sequence reward and D the divergence that a KL
configuration's *expected* gradient really follows. Four different D give four different end points, each with a
closed form computed here by formula or backward induction, independently of any training flow:

* ``reverse_kl_optimum`` (D = KL(pi || pi_ref), the reverse KL; k1 in reward, k3 in reward + loss):
  pi*(y) = pi_ref(y) exp(R(y)/beta) / Z.
* ``forward_kl_optimum`` (D = KL(pi_ref || pi), the sequence-level forward KL; k3 in a sequence-level loss):
  stationarity of R(y) + beta pi_ref(y)/pi(y) = lam on the simplex gives pi(y) = beta pi_ref(y) / (lam - R(y)),
  lam > max R the root of sum_y beta pi_ref(y) / (lam - R(y)) = 1.
* ``forward_kl_token_fixed_point`` (token-level forward KL with the prefix law held fixed; k3 in a per-token loss):
  per prefix h, p(v) (Q(h,v) - V(h)) = beta (p(v) - q(v)) with q = pi_ref(.|h), Q(h,v) the expected downstream
  reward under pi and V(h) = sum_v p(v) Q(h,v); hence pi(v|h) = beta q(v|h) / (mu_h - Q(h,v)), mu_h = V(h) + beta the
  root of sum_v beta q(v|h) / (mu_h - Q(h,v)) = 1. Q depends only on deeper levels: backward induction from t = T-1.
* ``reverse_kl_token_fixed_point`` (token-level reverse KL with the prefix law held fixed, the "partial" gradient;
  k2 in a per-token loss): p(v) (Q - V) = beta p(v) (log p(v)/q(v) - KL(p || q)), hence
  pi(v|h) = q(v|h) exp(Q(h,v)/beta) / Z_h with Q the *expected* (not soft) downstream reward, by backward induction.

Conditional tables are lists ``cond[t]`` of shape (V**t, V): row = the prefix's base-V number (first token most
significant), the layout of ``biaslab.engines.toy.TabularAR`` and of ``--logits`` files.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DTYPE = torch.float64
TARGETS = (
    "reverse_kl_optimum",
    "forward_kl_optimum",
    "forward_kl_token_fixed_point",
    "reverse_kl_token_fixed_point",
)


def sequence_probs(cond: list[Tensor]) -> Tensor:
    """(..., V**T) pi(y) = prod_t pi(y_t|y_<t) from conditional tables cond[t] (..., V**t, V), base-V order."""
    p = cond[0].flatten(-2)  # (..., V)
    for c in cond[1:]:
        p = (p.unsqueeze(-1) * c).flatten(-2)  # (..., V**(t+1))
    return p


def sequence_log_probs(cond_log: list[Tensor]) -> Tensor:
    """(..., V**T) log pi(y) from conditional log-probability tables (..., V**t, V)."""
    lp = cond_log[0].flatten(-2)  # (..., V)
    for c in cond_log[1:]:
        lp = (lp.unsqueeze(-1) + c).flatten(-2)  # (..., V**(t+1))
    return lp


def _solve_normaliser(q: Tensor, Q: Tensor, beta: float, iters: int = 200) -> Tensor:
    """(M,) the root mu > max_v Q of sum_v beta q_v / (mu - Q_v) = 1 for each row of q, Q (M, V).

    The left side decreases from +inf (at mu = max Q, where q > 0) to <= 1 at mu = max Q + beta: bisection on that
    bracket, then Newton steps from the left (the function is convex and decreasing, so Newton stays left of the root).
    """
    top = Q.max(-1).values  # (M,)
    lo, hi = top.clone(), top + beta  # (M,)

    def g(mu: Tensor) -> Tensor:
        return (beta * q / (mu.unsqueeze(-1) - Q)).sum(-1) - 1.0  # (M,)

    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if bool(((mid <= lo) | (mid >= hi)).all()):
            break
        pos = g(mid) > 0
        lo = torch.where(pos, mid, lo)
        hi = torch.where(pos, hi, mid)
    mu = torch.where(torch.isfinite(g(lo)), lo, hi)
    for _ in range(5):
        val = g(mu)
        slope = -(beta * q / (mu.unsqueeze(-1) - Q) ** 2).sum(-1)  # (M,)
        mu = mu + torch.where(val > 0, -val / slope, torch.zeros_like(val))
    return mu


def reverse_kl_optimum(q_seq: Tensor, reward: Tensor, beta: float) -> Tensor:
    """(V**T,) argmax E_pi[R] - beta KL(pi || pi_ref) (reverse KL): pi_ref(y) exp(R(y)/beta) / Z."""
    return torch.softmax(q_seq.log() + reward / beta, 0)


def forward_kl_optimum(q_seq: Tensor, reward: Tensor, beta: float) -> Tensor:
    """(V**T,) argmax E_pi[R] - beta KL(pi_ref || pi) (forward KL, sequence level): beta q(y) / (lam - R(y))."""
    lam = _solve_normaliser(q_seq.unsqueeze(0), reward.unsqueeze(0), beta)  # (1,)
    p = beta * q_seq / (lam - reward)
    return p / p.sum()


def _token_fixed_point(q_cond: list[Tensor], reward: Tensor, beta: float, forward: bool) -> list[Tensor]:
    """[(V**t, V)] per-prefix fixed points by backward induction from the last level (Q(h,v) = R(hv) there; above,
    Q(h,v) = V(hv) = sum_w pi(w|hv) Q(hv,w)): forward KL if ``forward``, else reverse KL."""
    T, V = len(q_cond), q_cond[0].shape[-1]
    out: list[Tensor] = [torch.empty(0)] * T
    Q = reward.reshape(V ** (T - 1), V)  # (V**(T-1), V)
    for t in range(T - 1, -1, -1):
        if forward:
            mu = _solve_normaliser(q_cond[t], Q, beta)  # (V**t,)
            p = beta * q_cond[t] / (mu.unsqueeze(-1) - Q)  # (V**t, V)
            p = p / p.sum(-1, keepdim=True)
        else:
            p = torch.softmax(q_cond[t].log() + Q / beta, -1)  # (V**t, V)
        out[t] = p
        value = (p * Q).sum(-1)  # (V**t,) V(h)
        if t:
            Q = value.reshape(V ** (t - 1), V)
    return out


def forward_kl_token_fixed_point(q_cond: list[Tensor], reward: Tensor, beta: float) -> list[Tensor]:
    """[(V**t, V)] the per-prefix forward-KL fixed point pi(v|h) = beta q(v|h) / (mu_h - Q(h,v))."""
    return _token_fixed_point(q_cond, reward, beta, forward=True)


def reverse_kl_token_fixed_point(q_cond: list[Tensor], reward: Tensor, beta: float) -> list[Tensor]:
    """[(V**t, V)] the per-prefix reverse-KL fixed point pi(v|h) ∝ q(v|h) exp(Q(h,v)/beta), Q the expected
    downstream reward under pi."""
    return _token_fixed_point(q_cond, reward, beta, forward=False)


def targets(q_cond: list[Tensor], reward: Tensor, beta: float) -> dict[str, Tensor]:
    """Every closed-form end point as a (V**T,) sequence distribution, keyed by the names in ``TARGETS``."""
    if beta <= 0 or not math.isfinite(beta):
        raise ValueError(f"beta must be a positive finite number, got {beta}")
    q_cond = [c.to(DTYPE) for c in q_cond]
    reward = reward.to(DTYPE)
    q_seq = sequence_probs(q_cond)
    return {
        "reverse_kl_optimum": reverse_kl_optimum(q_seq, reward, beta),
        "forward_kl_optimum": forward_kl_optimum(q_seq, reward, beta),
        "forward_kl_token_fixed_point": sequence_probs(forward_kl_token_fixed_point(q_cond, reward, beta)),
        "reverse_kl_token_fixed_point": sequence_probs(reverse_kl_token_fixed_point(q_cond, reward, beta)),
    }


def entropy(p: Tensor) -> Tensor:
    """Shannon entropy (nats) of distributions on the last axis; 0 log 0 = 0."""
    return -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1)


def kl(p: Tensor, q: Tensor) -> Tensor:
    """KL(p || q) on the last axis (p = 0 terms are 0; q is assumed positive)."""
    return torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p)).sum(-1)


__all__ = [
    "TARGETS",
    "sequence_probs",
    "sequence_log_probs",
    "reverse_kl_optimum",
    "forward_kl_optimum",
    "forward_kl_token_fixed_point",
    "reverse_kl_token_fixed_point",
    "targets",
    "entropy",
    "kl",
]
