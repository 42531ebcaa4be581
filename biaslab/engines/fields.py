"""Per-response fields of the exact engine: dL/dlogp of a configuration on every response (or group), its mean
update E[g] and second moment E||g||^2 from shared fields and Gram products.

For B = 1 a configuration is a linear combination sum_i alpha_i of shared fields (its reward part and loss part), so
E[g] = sum_i alpha_i E[g_i] and E||g||^2 = sum_ij alpha_i alpha_j E[g_i . g_j], each computed once per enumeration;
for B > 1 the sum runs over the sorted groups (multisets weighted by their orderings) and E||g||^2 comes from the
pair Gram or the Jacobian. Approximates nothing; requires the ``Enumeration`` mixin on the same engine.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from ..core.placements import Coefficients, input_grads, loss_coefficients
from ..core.recipes import Recipe, advantages, kl_credit, sequence_values, token_values
from . import toy
from .toy import DTYPE


def _all_finite(x: Tensor) -> bool:
    """No NaN or inf in x: its sum is finite (one pass, no temporary), else (an overflowing sum) every element."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def _check_finite(config, a: Tensor, c: Tensor | None) -> None:
    if not _all_finite(a) or (c is not None and not _all_finite(c)):
        raise ValueError(
            f"{config.label}: the update is non-finite (NaN/inf) for some groups, e.g. a division by a zero "
            "group std with grpo_eps = 0"
        )



class Fields:
    """Coefficients, fields and moments of an ``ExactEngine`` (mixin)."""

    def per_sample_dots(self, x: Coefficients, y: Coefficients) -> Tensor:
        """(N,) g_x(y_n) . g_y(y_n) of two coefficient sets (N, T) [+ (N, T, V)] on every response: the token Gram
        (``token_gram``) for token coefficients; otherwise the closed form of tabular models (different tokens
        touch different prefix rows), the full Gram, or torch.func."""
        if x.full is None and y.full is None and self.token_gram() is not None:
            g = self.token_gram()
            if g.dim() == 2:  # tabular: diagonal, ||e_y - p_t||^2
                return (x.tok * y.tok * g).sum(-1)
            return torch.einsum("nt,nts,ns->n", x.tok, g, y.tok)
        if self.policy.closed_form_grads:
            bx = self.policy.coefficient_blocks(self.tokens, x.tok, x.full, self._logp_full_det)  # (N, T, V)
            by = bx if y is x else self.policy.coefficient_blocks(self.tokens, y.tok, y.full, self._logp_full_det)
            return (bx * by).sum((-1, -2))
        dx, dy = x.dense(self.tokens, self.V), y.dense(self.tokens, self.V)  # (N, T, V)
        gram = self.gram()
        if gram is not None:  # one Jacobian pass per enumeration, then a quadratic form per pair of fields
            return torch.einsum("ni,nij,nj->n", dx.reshape(self.N, -1), gram, dy.reshape(self.N, -1))
        return toy.per_sample_dots(self.policy, self.tokens, dx, dx if y is x else dy)

    def token_gram(self) -> Tensor | None:
        """G_n[t, s] = grad log pi(y_t|y_<t) . grad log pi(y_s|y_<s) of every response, built once per enumeration
        and shared by every configuration: (N, T) diagonal 1 - 2 p_t(y_t) + ||p_t||^2 for tabular models (different
        tokens, different rows), (N, T, T) from the per-token Jacobian otherwise, which the same pass contracts
        with every field registered so far into its mean; None when it would not fit in the memory budget."""
        if self._tok_gram is None:
            if self.policy.closed_form_grads:
                self._tok_gram = self.policy.token_sq_norm_factor(self.tokens, self._logp_full_det)  # (N, T)
            elif self.N * self.T * (self.T + 1) * 8 > self._max_bytes // 2:
                self._tok_gram = False
            else:
                keys = [k for k, f in self._fields.items() if k not in self._means and f.full is None]
                wa = self.mask.new_zeros(len(keys), self.N, self.T)  # (K, N, T) mu-weighted token coefficients
                for i, k in enumerate(keys):
                    wa[i] = self.prob_mu[:, None] * self._fields[k].tok
                means = torch.zeros(len(keys), self.P, dtype=DTYPE)
                gram = torch.empty(self.N, self.T, self.T, dtype=DTYPE)
                for start, j in toy.per_sample_token_jacobians(self.policy, self.tokens, self.mask):  # (n, T, P)
                    gram[start : start + j.shape[0]] = j @ j.transpose(1, 2)
                    means += torch.einsum("knt,ntp->kp", wa[:, start : start + j.shape[0]], j)
                self._means.update(zip(keys, means))
                self._tok_gram = gram
        return self._tok_gram if self._tok_gram is not False else None

    def gram(self) -> Tensor | None:
        """(N, T*V, T*V) per-response Gram matrices of grad log pi(v|y_<t) (models without a closed form), built
        once and shared by every configuration; None when they would not fit in the memory budget."""
        if self._gram is None and not self.policy.closed_form_grads:
            fits = self.N * (self.T * self.V) ** 2 * 8 <= self._max_bytes // 2
            self._gram = toy.per_sample_gram(self.policy, self.tokens) if fits else False
        return self._gram if self._gram is not False else None

    def jacobian(self) -> Tensor:
        """(N, T, P) grad_theta log pi(y_t | y_<t) for every response token (0 on padding): closed form for tabular
        models, per-sample torch.func otherwise."""
        if self._jac is None and self.policy.closed_form_grads and hasattr(self.policy, "token_logp_jacobian"):
            self._jac = self.policy.token_logp_jacobian(self.tokens, self.mask, self._logp_full_det)
        if self._jac is None:
            self._jac = torch.cat([j for _, j in toy.per_sample_token_jacobians(self.policy, self.tokens, self.mask)])
        return self._jac

    def pair_gram(self) -> Tensor | None:
        """(N, T, N, T) inner products grad log pi(y_t|y_<t) . grad log pi(y'_s|y'_<s) of every pair of response
        tokens (groups of B > 1), built once from the Jacobian; None when it would exceed 256 MiB."""
        if self._pair_gram is None:
            if (self.N * self.T) ** 2 * 8 > 2**28:
                self._pair_gram = False
            else:
                j = self.jacobian().reshape(self.N * self.T, -1)  # (N T, P)
                self._pair_gram = (j @ j.T).view(self.N, self.T, self.N, self.T)
        return self._pair_gram if self._pair_gram is not False else None

    def whiten_stats(self, config, chunk: int = 65536) -> tuple[float, float]:
        """Population (mean, std) of the per-token advantages of ``config`` under mu: the limit of a large
        rollout batch's token-level whitening."""
        s0 = s1 = s2 = 0.0
        for idx, prob in self._group_chunks(chunk, isinstance(config, Recipe)):
            lp, lo, lr, m, rew = self._inputs(idx)
            adv = advantages(config, lo, lp, lr, m, rew)  # (E, B, T)
            s0 += float((prob[:, None, None] * m).sum())
            s1 += float((prob[:, None, None] * m * adv).sum())
            s2 += float((prob[:, None, None] * m * adv**2).sum())
        mean = s1 / s0
        var = max(s2 / s0 - mean**2, 0.0)
        return mean, math.sqrt(max(var, 1e-8))

    def _loss_coefficients(self, config, idx: Tensor | None, whiten_stats=None) -> tuple[Tensor, Tensor | None]:
        """dL/dlogp of ``config.batch_loss`` on the groups ``idx`` (None: every response alone)."""
        lp, lo, lr, m, rew = self._inputs(idx)  # (E, B, T) each, rew (E, B) or None
        full = None
        if getattr(config, "needs_full_logits", False):
            full = (self._pick(self._logp_full_det, idx), self._pick(self.logp_ref_full, idx))  # (E, B, T, V)
        return tuple(loss_coefficients(config, lp, lo, lr, m, rew, full, whiten_stats))

    def _kl_values(self, est, level: str) -> tuple[Tensor, Tensor, Tensor | None]:
        """(values, d_tok (N, T), d_full (N, T, V) or None) of estimator ``est`` on every response, once per
        enumeration: the detached token values k (N, T) (0 on padding; sequence level: K (N,)) and the autograd
        derivative of sum_t k_t (K) with respect to the token (and full) log-probabilities, 0 on padding."""
        key = (est, level)
        if key not in self._kl:
            m = self.mask
            leaf = self.logp.clone().requires_grad_(True)
            full = (self._logp_full_det.clone().requires_grad_(True),) if est.needs_full_logits else ()
            with torch.enable_grad():
                if level == "sequence":
                    values = sequence_values(est, leaf, self.logp_ref, m)  # (N,)
                    total = values.sum()
                else:
                    values = token_values(est, leaf, self.logp_ref, m, (*full, self.logp_ref_full) if full else None)
                    total = (values * m).sum()
            grads = input_grads(total, [leaf, *full])
            d_full = grads[1] * m[..., None] if full else None
            self._kl[key] = (values.detach(), (grads[0] * m).detach(), d_full)
        return self._kl[key]

    def _plain_coefficients(self, config) -> tuple[Tensor, Tensor | None]:
        """make_config's direct path, on-policy, every response alone: reward_coef x the credit of the estimator's
        values + loss_coef x their derivative (``_kl_values``; the tests check it equals ``batch_loss``)."""
        terms, c = [], None
        if config.has_reward_kl:
            credit = kl_credit(config, self._kl_values(config.reward_estimator, config.level)[0], self.mask)[0]
            terms.append(config.reward_coef * credit)
        if config.has_loss_kl:
            _, d_tok, d_full = self._kl_values(config.loss_estimator, config.level)
            terms.append(config.loss_coef * d_tok)
            c = None if d_full is None else config.loss_coef * d_full
        a = sum(terms[1:], terms[0]) if terms else torch.zeros_like(self.logp)
        return a[:, None], None if c is None else c[:, None]

    def coefficients(self, config, idx: Tensor | None = None, whiten_stats=None) -> tuple[Tensor, Tensor | None]:
        """(a (E, B, T), c (E, B, T, V) or None): dL/dlogp of every group's loss (the KL part when a task reward
        is set); ``idx`` (E, B) response indices (default: every response alone, B = 1)."""
        if idx is None and self.behaviour is None and getattr(config, "is_plain", False):
            a, c = self._plain_coefficients(config)  # the KL part alone, masked
            _check_finite(config, a, c)
            return a, c
        a, c = self._loss_coefficients(config, idx, whiten_stats)
        if self.task_reward is not None and hasattr(config, "without_kl"):
            a0, c0 = self._loss_coefficients(config.without_kl(), idx, whiten_stats)
            a = a - a0
            c = None if c is None else c - (0 if c0 is None else c0)
        m = self._pick(self.mask, idx)
        if c is not None:
            c = c * m.unsqueeze(-1)
        a = a * m
        _check_finite(config, a, c)
        return a, c

    def moments(self, config, chunk: int | None = None) -> tuple[Tensor, float, float | None]:
        """(E[g] (P,), E||g||^2, whitening std or None) over all groups."""
        if self.chunk_size is not None:
            if getattr(config, "whiten", False):
                raise ValueError("whitened configurations need the whole enumeration in memory; use a smaller toy")
            return (*self._sum_chunks(lambda sub: sub.moments(config, chunk)[:2]), None)
        stats = self.whiten_stats(config) if getattr(config, "whiten", False) else None
        if self.B == 1:  # g = sum_i alpha_i g_i: E g = sum_i alpha_i E g_i, E||g||^2 = sum_ij alpha_i alpha_j E g_i.g_j
            parts = self._parts(config)
            for _, key in parts:
                self._field(key, stats)
            mean = torch.zeros(self.P, dtype=DTYPE)
            for alpha, key in parts:
                mean += alpha * self._field_mean(key)
            second = sum(ai * aj * self._field_dot(ki, kj) for ai, ki in parts for aj, kj in parts)
            return mean, float(second), (None if stats is None else stats[1])
        if getattr(config, "needs_full_logits", False):
            raise ValueError("groups of B > 1 take per-token estimators only (no full-logit estimator)")
        gram = self.pair_gram()  # (N, T, N, T) or None
        jac = self.jacobian() if gram is None else None  # (N, T, P)
        per = self.B * self.T * (self.B * self.T if gram is not None else max(self.P, 1))
        chunk = chunk or max(1, int(2e7 // per))
        acc = torch.zeros(self.N, self.T, dtype=DTYPE)  # per-response coefficients weighted by group probability
        second = 0.0
        for idx, prob in self._group_chunks(chunk, isinstance(config, Recipe)):
            a, _ = self.coefficients(config, idx, stats)  # (E, B, T)
            acc.index_add_(0, idx.reshape(-1), (prob[:, None, None] * a).reshape(-1, self.T))
            if gram is not None:  # ||g||^2 = sum_{b,c} a_b^T G[y_b, y_c] a_c, no per-group P-vector
                blocks = gram[idx[:, :, None], :, idx[:, None, :], :]  # (E, B, B, T, T)
                second += float(prob @ torch.einsum("ebt,ebcts,ecs->e", a, blocks, a))
            else:
                g = torch.einsum("ebt,ebtp->ep", a, jac[idx])  # (E, P) one update per group
                second += float(prob @ (g**2).sum(-1))
        return self.weighted_grad(acc, None), second, (None if stats is None else stats[1])

    def _parts(self, config) -> list[tuple[float, object]]:
        """[(alpha_i, field key_i)] with config's coefficients = sum_i alpha_i (coefficients of field i), B = 1.

        The basic on-policy configurations (``Recipe.is_plain``) are linear in their two KL coefficients, so each is
        reward_coef x (its reward part alone) + loss_coef x (its loss part alone), and configurations sharing an
        estimator and level share fields (the sequence-level reward credits K to every token whatever the credit);
        any other configuration is its own field."""
        if not (self.behaviour is None and isinstance(config, Recipe) and config.is_plain):
            return [(1.0, config)]
        part = replace(config, name="custom", reward_coef=0.0, loss_coef=0.0, reward_estimator=None,
                       loss_estimator=None, reward_credit="rtg")
        parts = []
        if config.has_reward_kl:
            credit = config.reward_credit if config.level == "token" else "rtg"
            key = replace(part, reward_estimator=config.reward_estimator, reward_coef=1.0, reward_credit=credit)
            parts.append((config.reward_coef, key))
        if config.has_loss_kl:
            parts.append((config.loss_coef, replace(part, loss_estimator=config.loss_estimator, loss_coef=1.0)))
        return parts

    def _field(self, key, whiten_stats=None) -> Coefficients:
        """Coefficients (N, T) [+ (N, T, V)] of field ``key`` (a configuration) on every response alone, cached."""
        if key not in self._fields:
            a, c = self.coefficients(key, None, whiten_stats)  # (N, 1, T), (N, 1, T, V)
            self._fields[key] = Coefficients(a[:, 0], None if c is None else c[:, 0])
        return self._fields[key]

    def _field_mean(self, key) -> Tensor:
        """(P,) E_mu[g] = sum_n mu(y_n) g_n of a registered field (models without a closed form: from the per-token
        Jacobian pass of ``token_gram`` when the field was registered before it, else one backward pass)."""
        if key not in self._means and not self.policy.closed_form_grads and self._fields[key].full is None:
            self.token_gram()
        if key not in self._means:
            f, w = self._fields[key], self.prob_mu
            wc = None if f.full is None else w[:, None, None] * f.full
            self._means[key] = self.weighted_grad(w[:, None] * f.tok, wc)
        return self._means[key]

    def _field_dot(self, ki, kj) -> float:
        """E_mu[g_i . g_j] = sum_n mu(y_n) g_i(y_n) . g_j(y_n) of two registered fields."""
        if (ki, kj) not in self._dots:
            x, y = self._fields[ki], self._fields[kj]
            self._dots[(ki, kj)] = self._dots[(kj, ki)] = float(self.prob_mu @ self.per_sample_dots(x, y))
        return self._dots[(ki, kj)]

    def expected_grad(self, config) -> Tensor:
        """(P,) E[g] of ``config`` over groups drawn from mu (no variance, no verdict)."""
        return self.moments(config)[0]
