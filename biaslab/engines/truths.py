"""Named directions and KLs of the exact engine: grad KL(pi || pi_ref) and the other divergences a configuration
may follow (``biaslab.core.verdict.DIRECTIONS``), the task-reward gradient, and the true gradient of an estimator's
expected value.

Approximates nothing: each gradient is a probability-weighted sum of grad log pi over the enumeration (grad pi(y) =
pi(y) grad log pi(y)); derivatives of estimator *values* are autograd where it agrees with a fourth-order finite
difference (``value_derivative``). Requires the ``Enumeration`` and ``Fields`` mixins on the same engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.objectives import objective as named_objective
from ..core.placements import Coefficients, input_grads, make_config
from ..core.recipes import Recipe, token_values
from ..core.verdict import true_gradient_is_zero
from .precision import config_dtype
from .toy import DTYPE, ModelError


@dataclass
class Truths:
    """Exact KL values and named gradient directions over complete responses (flat, the policy's parameter order)."""

    kl_reverse: float
    kl_forward: float
    directions: dict[str, Tensor]  # reverse_kl, forward_kl, forward_kl_token, reverse_kl_token, zero
    score_rms: float  # sqrt(E_pi ||grad log pi(y)||^2): the scale against which "grad KL = 0" is judged

    @property
    def grad_reverse(self) -> Tensor:
        return self.directions["reverse_kl"]

    @property
    def grad_forward(self) -> Tensor:
        return self.directions["forward_kl"]

    @property
    def undefined(self) -> bool:
        """The true gradient is zero to round-off (policy == reference): verdicts are ``undefined``."""
        return true_gradient_is_zero(float(self.grad_reverse.norm()), self.score_rms)

    def __getitem__(self, name: str) -> Tensor:
        return self.directions[name]


def _fd(fn, x: Tensor, h: float, columns: bool) -> Tensor:
    """Fourth-order central difference of fn (x (N, C) -> (N,) or (N, C)): per column of x, or, with
    ``columns=False``, all elements at once (valid for element-wise fn)."""
    if not columns:
        return (-fn(x + 2 * h) + 8 * fn(x + h) - 8 * fn(x - h) + fn(x - 2 * h)) / (12 * h)
    out = torch.zeros_like(x)
    for t in range(x.shape[1]):
        e = torch.zeros_like(x)
        e[:, t] = h
        out[:, t] = (-fn(x + 2 * e) + 8 * fn(x + e) - 8 * fn(x - e) + fn(x - 2 * e)) / (12 * h)
    return out


def value_derivative(fn, x: Tensor, h: float, elementwise: bool = False, levels: int = 4, rtol: float = 1e-6):
    """The derivative of the *value* of fn at x, whatever autograd tricks fn uses inside.

    fn maps x (N, C) to (N,) (derivative (N, C)), or element-wise to (N, C) with ``elementwise``. Autograd where it
    agrees with a finite difference (honest gradients: exact); otherwise (straight-through / detach tricks, or a
    kink straddled by the step) the finite difference, its step shrunk by 16 up to ``levels`` times until two
    successive steps agree."""
    leaf = x.clone().requires_grad_(True)
    with torch.enable_grad():
        (auto,) = input_grads(fn(leaf), [leaf])

    def close(a: Tensor, b: Tensor) -> Tensor:
        return (a - b).abs() <= rtol * (a.abs() + b.abs()) + 1e-300

    def value(z: Tensor) -> Tensor:
        with torch.no_grad():
            return fn(z)

    fd = _fd(value, x, h, not elementwise)
    use_auto = close(auto, fd)
    out, settled = fd.clone(), torch.zeros_like(use_auto)
    for i in range(1, levels):
        if bool((use_auto | settled).all()):
            break
        finer = _fd(value, x, h / 16**i, not elementwise)
        use_auto |= close(auto, finer)
        pick = close(fd, finer) & ~settled
        out[pick] = fd[pick]
        settled |= pick
        fd = finer
    out[~settled] = fd[~settled]
    return torch.where(use_auto, auto, out)



class TruthsMixin:
    """The truths of an ``ExactEngine`` (mixin): KLs, named directions, task gradient, grad E[K]."""

    def truths(self) -> Truths:
        """Exact KLs and the named gradient directions over complete responses (weights pi, whatever mu is).

        Each gradient is a weighted sum of grad log pi, using grad pi(y) = pi(y) grad log pi(y) (exact):

            grad KL(pi||pi_ref)  = sum_y pi(y) (log pi(y)/pi_ref(y) + 1) grad log pi(y)
            grad KL(pi_ref||pi)  = -sum_y pi_ref(y) grad log pi(y)
            forward_kl_token     = -sum_y pi(y) sum_t sum_v pi_ref(v|y_<t) grad log pi(v|y_<t)
            reverse_kl_token     = sum_y pi(y) sum_t sum_v pi(v|y_<t) (log pi(v|y_<t)/pi_ref(v|y_<t) + 1)
                                   * grad log pi(v|y_<t)

        (``truths_autograd`` differentiates the defining sums directly; the tests check both agree.)
        """
        if self._truths is not None:
            return self._truths
        if self.chunk_size is not None:
            directions, kl_rev, kl_fwd, score_sq, mass = None, 0.0, 0.0, 0.0, 0.0
            for sub in self._chunks():  # running sums: one chunk's P-vectors alive at a time
                part = sub.truths()
                if directions is None:
                    directions = dict(part.directions)
                else:
                    for k, d in part.directions.items():
                        directions[k] += d
                kl_rev, kl_fwd = kl_rev + part.kl_reverse, kl_fwd + part.kl_forward
                score_sq += part.score_rms**2
                mass += float(sub.weights.sum())
            if abs(mass - 1) > 1e-9:
                raise ModelError(f"enumerated response probabilities sum to {mass!r}, not 1")
            self._truths = Truths(kl_rev, kl_fwd, directions, math.sqrt(score_sq))
            return self._truths
        w, m = self.weights, self.mask  # (N,), (N, T)
        lp, lr = self.logp_seq.detach(), self.logp_ref_seq  # (N,)
        directions = {
            "reverse_kl": self.weighted_grad((w * (lp - lr + 1))[:, None] * m, None),
            "forward_kl": self.weighted_grad(-lr.exp()[:, None] * m, None),
        }
        token_kls = {  # (full log-probs of pi, of pi_ref) -> coefficient of grad log pi(v|prefix)
            "forward_kl_token": lambda lp, lr: -lr.exp(),
            "reverse_kl_token": lambda lp, lr: lp.exp() * (lp - lr + 1),
        }
        if self.policy.closed_form_grads and self.eos is None and self._full_enumeration:
            # at each distinct prefix (level t: V**t rows, every V**(T-t)-th response), weighted by its probability
            V, T = self.V, self.T
            rows = [(w.view(V**t, -1).sum(1, keepdim=True), self._logp_full_det[:: V ** (T - t), t],
                     self.logp_ref_full[:: V ** (T - t), t]) for t in range(T)]
            for name, f in token_kls.items():
                directions[name] = self.policy.level_grad([p * f(a, b) for p, a, b in rows], self._level_probs)
        else:
            mw = (w[:, None] * m)[..., None]  # (N, T, 1)
            for name, f in token_kls.items():
                directions[name] = self.weighted_grad(None, mw * f(self._logp_full_det, self.logp_ref_full))
        directions["zero"] = torch.zeros_like(directions["reverse_kl"])
        kl_rev = float((w * (lp - lr)).sum())
        kl_fwd = float((lr.exp() * (lr - lp)).sum())
        score = Coefficients(m, None)
        score_sq = self.per_sample_dots(score, score)  # (N,) ||grad log pi(y)||^2
        self._truths = Truths(kl_rev, kl_fwd, directions, math.sqrt(float((w * score_sq).sum())))
        return self._truths

    def truths_autograd(self) -> dict[str, Tensor]:
        """The four gradients by autograd of their defining sums (slower; a cross-check of ``truths``)."""
        w, lp, lr, m = self.weights, self.logp_seq, self.logp_ref_seq, self.mask
        p_full, q_full = self.logp_full.exp(), self.logp_ref_full.exp()  # (N, T, V)
        return {
            "reverse_kl": self.grad_of((lp.exp() * (lp - lr)).sum()),
            "forward_kl": self.grad_of((lr.exp() * (lr - lp)).sum()),
            "forward_kl_token": self.grad_of(
                (w[:, None] * m * (q_full * (self.logp_ref_full - self.logp_full)).sum(-1)).sum()
            ),
            "reverse_kl_token": self.grad_of(
                (w[:, None] * m * (p_full * (self.logp_full - self.logp_ref_full)).sum(-1)).sum()
            ),
        }

    def direction(self, name: str) -> Tensor:
        """(P,) the gradient of the objective ``name`` (``biaslab.core.objectives``) over complete responses.

        The standard four come from ``truths``. Otherwise, with w(y) = pi(y) and m the response mask:

            neg_entropy (sequence)    grad E_pi[log pi(y)] = sum_y pi(y) (log pi(y) + 1) grad log pi(y)
            per prefix, law L         sum_y L(y) sum_t sum_v dD/dlogp_v (pi(.|y_<t), pi_ref(.|y_<t))
                                      * grad log pi(v|y_<t),  L = pi (law "policy") or pi_ref (law "reference")

        where dD/dlogp_v is autograd of the divergence through the student's log-distribution at each visited prefix
        (exact: grad_theta D = sum_v dD/dlogp_v grad_theta log p_v), the prefix law held fixed.
        """
        if name in ("reverse_kl", "forward_kl", "forward_kl_token", "reverse_kl_token", "zero"):
            return self.truths().directions[name]
        if name in self._objective_dirs:
            return self._objective_dirs[name]
        obj = named_objective(name)
        if self.chunk_size is not None:
            self._objective_dirs[name] = self._sum_chunks(lambda sub: sub.direction(name))
            return self._objective_dirs[name]
        w, m = self.weights, self.mask  # (N,), (N, T)
        if obj.kind == "sequence":  # only neg_entropy is not among the standard four
            d = self.weighted_grad((w * (self.logp_seq.detach() + 1))[:, None] * m, None)
        else:
            law = w if obj.law == "policy" else self.logp_ref_seq.exp()  # (N,) probability of each response's prefixes
            leaf = self._logp_full_det.clone().requires_grad_(True)  # (N, T, V)
            with torch.enable_grad():
                (c,) = input_grads(obj.divergence(leaf, self.logp_ref_full).sum(), [leaf])  # (N, T, V) dD/dlogp
            d = self.weighted_grad(None, (law[:, None] * m)[..., None] * c)
        self._objective_dirs[name] = d
        return d

    def clamped_fraction(self, est, level: str = "token") -> float | None:
        """The share of the expected response tokens (prefixes weighted by mu) at which ``est``'s clamps are active,
        i.e. where its gradient is zeroed whatever the log-probabilities (None: no clamps, or a sequence-level
        estimate). sum_y mu(y) sum_t m_t 1[clamp active at t] / sum_y mu(y) sum_t m_t."""
        mask_fn = getattr(est, "clamp_mask", None)
        if mask_fn is None or level != "token":
            return None
        if self.chunk_size is not None:
            hit, tot = self._sum_chunks(lambda sub: sub._clamp_counts(est))
            return hit / tot
        hit, tot = self._clamp_counts(est)
        return hit / tot

    def _clamp_counts(self, est) -> tuple[float, float]:
        with torch.no_grad():
            if est.needs_full_logits:
                active = est.clamp_mask(self._logp_full_det, self.logp_ref_full)  # (N, T)
            else:
                active = est.clamp_mask(self.logp, self.logp_ref)  # (N, T)
        wm = self.prob_mu[:, None] * self.mask  # (N, T)
        return float((wm * active.to(wm.dtype)).sum()), float(wm.sum())

    def task_grad(self) -> Tensor:
        """(P,) grad E_pi[R] = sum_y pi(y) R(y) grad log pi(y) (zeros without a task reward)."""
        if self.chunk_size is not None and self.task_reward is not None:
            return self._sum_chunks(lambda sub: sub.task_grad())
        if self.task_reward is None:
            return torch.zeros(self.P, dtype=DTYPE)
        return self.weighted_grad((self.weights * self.task_reward)[:, None] * self.mask, None)

    def expected_value_grad(self, config: Recipe) -> Tensor | None:
        """(P,) grad_theta E_pi[K]: the true derivative of the KL estimate's expected value (None when the
        configuration has no single estimator).

        d/dtheta sum_y pi(y) K_theta(y) = sum_y pi(y) [K(y) grad log pi(y) + dK/dlogp . grad logp]. dK/dlogp is the
        derivative of K's *value* (``value_derivative``: detach / straight-through tricks inside the estimator do
        not change it), or autograd for estimators reading whole distributions.
        """
        est = config.estimator
        if est is None or (config.has_reward_kl and config.has_loss_kl and config.reward_estimator != est):
            return None
        key = (est, config.level)
        if key in self._value_grads:
            return self._value_grads[key]
        if self.chunk_size is not None:
            self._value_grads[key] = self._sum_chunks(lambda sub: sub.expected_value_grad(config))
            return self._value_grads[key]
        view = Recipe(loss_estimator=est, loss_coef=1.0, level=config.level)
        m, lr, w = self.mask, self.logp_ref, self.weights
        values, d_tok, d_full = self._kl_values(est, config.level)
        big_k = values if config.level == "sequence" else (values * m).sum(-1)  # (N,) K(y)
        if est.needs_full_logits:
            wc = w[:, None, None] * d_full
        else:
            h = float(torch.finfo(config_dtype(config)).eps) ** 0.2
            if config.level == "sequence":  # K = k(S, S_ref) with S = sum_t logp_t: dK/dlogp_t = dK/dS
                s_ref = lr.sum(-1, keepdim=True)  # (N, 1)
                d_s = value_derivative(
                    lambda s: est(s.reshape(-1), s_ref.reshape(-1)).reshape(-1, 1), self.logp.sum(-1, keepdim=True), h,
                    elementwise=True,
                )  # (N, 1)
                d_tok = d_s * m
            else:  # sum_t k(logp_t, logp_ref_t): element-wise when k is (checked against the general form), so
                # taken at each distinct (prefix, token) only when the enumeration is every sequence in base-V order
                tree = self.eos is None and self._full_enumeration
                lp_u, lr_u, m_u = (self._distinct(x) for x in (self.logp, lr, m)) if tree else (self.logp, lr, m)
                d_u = value_derivative(lambda lp: token_values(est, lp * m_u, lr_u, m_u) * m_u, lp_u, h,
                                       elementwise=True) * m_u
                d_tok = self._spread(d_u) if tree else d_u
                check = d_tok[: min(self.N, 64)]
                general = value_derivative(lambda lp: view.kl_estimate(lp * m[:64], lr[:64], m[:64]),
                                           self.logp[: check.shape[0]], h)
                if not torch.allclose(check, general * m[: check.shape[0]], rtol=1e-6, atol=1e-12):
                    d_tok = value_derivative(lambda lp: view.kl_estimate(lp * m, lr, m), self.logp, h) * m
            wc = None
        if self.behaviour is None:  # weights pi = mu: the mean of field "K on every token" plus that of dK/dlogp
            k_field = self._parts(make_config(est, "reward", config.level, "full"))[0][1]
            d_field = self._parts(make_config(est, "loss", config.level))[0][1]
            mine = Coefficients(d_tok, d_full)
            if not all(x is y or (x is not None and y is not None and torch.equal(x, y))
                       for x, y in zip(self._field(d_field), mine)):  # a straight-through estimator: its own field
                d_field = ("value", est, config.level)
                self._fields[d_field] = mine
            self._field(k_field)
            g = self._field_mean(k_field) + self._field_mean(d_field)
        else:
            g = self.weighted_grad(w[:, None] * (big_k[:, None] * m + d_tok), wc)
        self._value_grads[key] = g
        return g
