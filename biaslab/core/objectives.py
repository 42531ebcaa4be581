"""Named objectives: what a configuration's expected update is judged against, and the divergences it may follow.

Every objective is a function of the policy pi_theta to be *minimised* against a fixed second model q: the
reference pi_ref in RL, the teacher pi_teacher in on-policy distillation (OPD; the engines take the teacher in the
reference's place). Its gradient direction is what an update "follows". Two kinds:

Sequence level, over complete responses y (``SEQUENCE``):

    reverse_kl    KL(pi || q) = E_pi[log pi(y) / q(y)]                 RL's objective; OPD's reverse KL
    forward_kl    KL(q || pi) = E_q[log q(y) / pi(y)]                  = sum_t E_{h_t ~ q} KL(q(.|h_t) || pi(.|h_t))
                                                                        (the per-prefix forward KL on q's prefixes)
    neg_entropy   -H(pi) = E_pi[log pi(y)]                             what an entropy bonus descends

Per prefix, the prefix law held fixed (``PerPrefix``): sum_t E_{h_t ~ law}[D(pi(.|h_t), q(.|h_t))], whose gradient
treats the distribution of the visited prefixes h_t as a constant (the "partial" gradient of Tang & Munos 2025,
arXiv 2506.09477): the gradient is sum_t E_{h_t ~ law}[grad_theta D(pi(.|h_t), q(.|h_t))], with ``law`` the policy
(the student's own samples) or q (the teacher's / reference's samples):

    reverse_kl_token          D = KL(p || q)                 law pi
    forward_kl_token          D = KL(q || p)                 law pi
    reverse_kl_token_ref      D = KL(p || q)                 law q (distilling on teacher samples)
    neg_entropy_token         D = -H(p)                      law pi
    jsd_token:BETA            D = BETA KL(q || m) + (1 - BETA) KL(p || m),  m = (1 - BETA) p + BETA q
                              (TRL's generalized JSD: BETA = 0 is KL(q || p), BETA = 1 is KL(p || q))
    forward_kl_token_topk:K   D = sum_{v in top-K of q} q_v (log q_v - log p_v)   (not renormalised: verl)
    mixed_kl_token_topk:K:W   D = W KL(q~ || p~) + (1 - W) KL(p~ || q~), p~ and q~ renormalised on q's top K
                              (NeMo-RL's teacher-logit KD)

``objective(name)`` parses a name (with its parameters after ``:``); ``OBJECTIVES`` documents every one. The
per-prefix values ``divergence(p_log, q_log)`` take next-token log-distributions (..., V) and return (...,); the
engines differentiate them through ``p_log`` at each visited prefix (biaslab.engines). The full derivations are in
``docs/derivations.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Divergence = Callable[[Tensor, Tensor], Tensor]


class ObjectiveError(ValueError):
    """An objective name that is not known, or parameters outside their range."""


# ---------------------------------------------------------------- per-prefix divergences D(p, q), inputs (..., V)


def kl(a_log: Tensor, b_log: Tensor) -> Tensor:
    """KL(a || b) = sum_v a_v (log a_v - log b_v) of two log-distributions (..., V) -> (...); 0 log 0 = 0."""
    a = a_log.exp()
    live = a > 0  # entries off the support (log -inf) are replaced before the product, so no 0 * inf in backward
    zero = torch.zeros_like(a)
    return torch.where(live, a * (torch.where(live, a_log, zero) - torch.where(live, b_log, zero)), zero).sum(-1)


def reverse_kl(p_log: Tensor, q_log: Tensor) -> Tensor:
    """KL(p || q): the next-token reverse KL."""
    return kl(p_log, q_log)


def forward_kl(p_log: Tensor, q_log: Tensor) -> Tensor:
    """KL(q || p): the next-token forward KL."""
    return kl(q_log, p_log)


def neg_entropy(p_log: Tensor, q_log: Tensor) -> Tensor:
    """-H(p) = sum_v p_v log p_v (q unused): what an entropy bonus descends."""
    p = p_log.exp()
    return torch.where(p > 0, p * p_log, torch.zeros_like(p)).sum(-1)


def jsd(beta: float) -> Divergence:
    """Generalized Jensen-Shannon divergence of TRL's GKD / DistillationTrainer (arXiv 2306.13649):
    beta KL(q || m) + (1 - beta) KL(p || m) with m = (1 - beta) p + beta q; beta = 0: KL(q || p), 1: KL(p || q)."""
    if not 0 <= beta <= 1:
        raise ObjectiveError(f"jsd beta must lie in [0, 1], got {beta}")

    def d(p_log: Tensor, q_log: Tensor) -> Tensor:
        if beta == 0:
            return kl(q_log, p_log)
        if beta == 1:
            return kl(p_log, q_log)
        m_log = torch.logsumexp(torch.stack([p_log + math.log(1 - beta), q_log + math.log(beta)]), 0)
        return beta * kl(q_log, m_log) + (1 - beta) * kl(p_log, m_log)

    return d


def topk_mask(q_log: Tensor, k: int) -> Tensor:
    """(..., V) bool: the k largest entries of q along the last axis (ties broken by index, as torch.topk)."""
    k = min(k, q_log.shape[-1])
    idx = torch.topk(q_log, k, dim=-1).indices
    return torch.zeros_like(q_log, dtype=torch.bool).scatter_(-1, idx, True)


def forward_kl_topk(k: int) -> Divergence:
    """sum_{v in top-k of q} q_v (log q_v - log p_v): the forward KL truncated to the teacher's top k tokens, with
    q normalised over the whole vocabulary (verl ``forward_kl_topk``). It is negative when the student puts more
    mass on those tokens than the teacher; minimised at p = q / m_K on them, 0 elsewhere (m_K = their q-mass)."""

    def d(p_log: Tensor, q_log: Tensor) -> Tensor:
        keep = topk_mask(q_log, k)
        return torch.where(keep, q_log.exp() * (q_log - p_log), torch.zeros_like(q_log)).sum(-1)

    return d


def renormalised_topk(log: Tensor, keep: Tensor) -> Tensor:
    """log of the distribution renormalised on the kept entries (-inf elsewhere), (..., V)."""
    masked = torch.where(keep, log, torch.full_like(log, -math.inf))
    return masked - torch.logsumexp(masked, -1, keepdim=True)


def mixed_kl_topk(k: int, w: float) -> Divergence:
    """w KL(q~ || p~) + (1 - w) KL(p~ || q~) with both renormalised on q's top k (NeMo-RL ``DistillationLossFn``,
    ``kl_type: mixed``, ``mixed_kl_weight`` w on the forward part)."""
    if not 0 <= w <= 1:
        raise ObjectiveError(f"mixed KL weight must lie in [0, 1], got {w}")

    def d(p_log: Tensor, q_log: Tensor) -> Tensor:
        keep = topk_mask(q_log, k)
        p_t, q_t = renormalised_topk(p_log, keep), renormalised_topk(q_log, keep)
        return w * kl(q_t, p_t) + (1 - w) * kl(p_t, q_t)

    return d


# ---------------------------------------------------------------- the objectives


@dataclass(frozen=True)
class Objective:
    """A named objective. ``kind`` "sequence" (``reverse_kl``, ``forward_kl``, ``neg_entropy``) or "token"
    (per prefix: ``divergence`` under the prefix ``law`` "policy" or "reference")."""

    name: str
    description: str
    kind: str
    divergence: Divergence | None = None
    law: str = "policy"


SEQUENCE = {
    "reverse_kl": "grad KL(pi || pi_ref), sequence level (the objective)",
    "forward_kl": "grad KL(pi_ref || pi), sequence level",
    "neg_entropy": "grad -H(pi), sequence level (what an entropy bonus on whole responses descends)",
}

PER_PREFIX: dict[str, tuple[str, Divergence, str]] = {
    "reverse_kl_token": ("sum_t E_prefix grad KL(pi(.|prefix) || pi_ref(.|prefix)), prefix law held fixed",
                         reverse_kl, "policy"),
    "forward_kl_token": ("sum_t E_prefix grad KL(pi_ref(.|prefix) || pi(.|prefix)), prefix law held fixed",
                         forward_kl, "policy"),
    "reverse_kl_token_ref": ("sum_t E_{prefix ~ pi_ref} grad KL(pi(.|prefix) || pi_ref(.|prefix)) (reference's or "
                             "teacher's prefixes)", reverse_kl, "reference"),
    "neg_entropy_token": ("sum_t E_prefix grad -H(pi(.|prefix)), prefix law held fixed (a per-token entropy bonus)",
                          neg_entropy, "policy"),
}

#: parameterised per-prefix objectives: name -> (description, builder from the parameters, number of parameters)
PARAMETERISED: dict[str, tuple[str, Callable[..., Divergence], int]] = {
    "jsd_token": ("sum_t E_prefix grad JSD_beta(pi(.|prefix), pi_ref(.|prefix)), prefix law held fixed "
                  "(jsd_token:BETA)", lambda beta: jsd(float(beta)), 1),
    "forward_kl_token_topk": ("sum_t E_prefix grad of the forward KL truncated to pi_ref's top K tokens, prefix law "
                              "held fixed (forward_kl_token_topk:K)", lambda k: forward_kl_topk(int(k)), 1),
    "mixed_kl_token_topk": ("sum_t E_prefix grad of W KL(q~||p~) + (1-W) KL(p~||q~) on pi_ref's top K, renormalised "
                            "(mixed_kl_token_topk:K:W)", lambda k, w: mixed_kl_topk(int(k), float(w)), 2),
}

#: every objective name (parameterised ones with their placeholders) -> its one line
OBJECTIVES = {**SEQUENCE, **{k: v[0] for k, v in PER_PREFIX.items()}, **{k: v[0] for k, v in PARAMETERISED.items()}}


def objective(name: str) -> Objective:
    """The objective called ``name`` (parameters after ':', e.g. ``jsd_token:0.5``, ``forward_kl_token_topk:32``)."""
    base, *params = str(name).split(":")
    if base in SEQUENCE and not params:
        return Objective(base, SEQUENCE[base], "sequence")
    if base in PER_PREFIX and not params:
        desc, d, law = PER_PREFIX[base]
        return Objective(base, desc, "token", d, law)
    if base in PARAMETERISED:
        desc, build, n = PARAMETERISED[base]
        if len(params) != n:
            raise ObjectiveError(f"objective {base} takes {n} parameter(s) after ':' ({desc.split('(')[-1][:-1]})")
        try:
            d = build(*params)
        except ValueError as exc:
            raise ObjectiveError(f"objective {name!r}: {exc}") from None
        if base.endswith("topk") and int(params[0]) < 1:
            raise ObjectiveError(f"objective {name!r}: K must be a positive integer")
        return Objective(name, desc, "token", d, "policy")
    raise ObjectiveError(f"unknown objective {name!r}; choose one of: {', '.join(OBJECTIVES)}")


__all__ = ["OBJECTIVES", "Objective", "ObjectiveError", "forward_kl_topk", "jsd", "kl", "mixed_kl_topk",
           "neg_entropy", "objective", "topk_mask"]
