"""The exact engine: enumerate every response (and every group of B responses) of a toy model and compute the
expected update of any configuration, its variance and its verdict, with no sampling noise.

For a policy pi_theta, a fixed reference pi_ref and a behaviour policy mu (mu = pi: on-policy), a configuration's
update on a group (y_1..y_B) drawn i.i.d. from mu is g = grad_theta L(y_1..y_B) (``Recipe.batch_loss``; for the
basic ``make_config`` configurations B = 1 and g(y) is the per-sample estimate of BACKGROUND section 3). Because L
depends on theta only through the next-token log-probabilities,

    g = sum_{i,t} a_it grad log pi(y_it | y_i,<t) + sum_{i,t,v} c_itv grad log pi(v | y_i,<t),

with a = dL/dlogp (and c = dL/dlogp_full for estimators that read whole distributions). The engine

* enumerates complete responses: all V**T sequences, or with an end-of-sequence token every response that ends
  at EOS or at T tokens (``tokens`` (N, T), ``mask`` (N, T) 1 on response tokens);
* computes the coefficients for every group in one autograd pass over stacked groups;
* sums them, weighted by the group's probability under mu, into per-response coefficients, so that E[g] is one
  weighted sum of grad log pi: a reshape-sum in closed form for tabular models, one backward pass otherwise;
* when B = 1, writes each configuration as a linear combination sum_i alpha_i of shared *fields* (a basic
  configuration: reward_coef x its reward part + loss_coef x its loss part), so E[g] = sum_i alpha_i E[g_i] and
  E||g||^2 = sum_ij alpha_i alpha_j E[g_i . g_j], each field's mean and each pair's inner product computed once
  per enumeration (closed form for tabular models; for others one per-token Jacobian pass gives the token Gram
  (N, T, T) and the means of every field registered before it);
* when B > 1, sums over the sorted groups (multisets, weighted by their orderings: a ``Recipe`` is symmetric in
  the group's members) and takes E||g||^2 from the Jacobian (N, T, P);
* computes the named directions (``biaslab.core.verdict.DIRECTIONS``) and KLs over complete responses, and applies
  the one verdict rule (``biaslab.core.verdict.exact_verdict``) against ``nominal * grad KL(pi || pi_ref)``.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..core.placements import Coefficients, TokenBatch, input_grads, loss_coefficients, make_config
from ..core.recipes import Recipe, advantages, kl_credit, sequence_values, token_values
from ..core.verdict import DIRECTIONS, Directions, Verdict, exact_verdict, true_gradient_is_zero
from . import toy
from .toy import DTYPE, AutoregressiveModel, ModelError, at_tokens, check_models

DEFAULT_MAX_BYTES = int(float(os.environ.get("BIASLAB_MAX_BYTES", 4 * 2**30)))
MAX_GROUPS = 2_000_000


class EnumerationTooLarge(MemoryError):
    """Enumerating every sequence would need more memory than allowed."""


# ---------------------------------------------------------------- enumeration


def count_complete(vocab_size: int, length: int, eos: int | None = None) -> int:
    """Number of complete responses: V**T without EOS; with one, sum_{L<T} (V-1)**(L-1) + (V-1)**(T-1) * V."""
    if eos is None:
        return vocab_size**length
    v = vocab_size - 1
    return sum(v ** (L - 1) for L in range(1, length)) + v ** (length - 1) * vocab_size


def enumeration_bytes(vocab_size: int, length: int, per_sample_params: int = 0, eos: int | None = None) -> int:
    """Rough peak bytes of the exact engine: ~16 float64 (N, T, V) tensors and the tokens, plus one chunk of
    torch.func per-sample gradients (``per_sample_params`` floats each) for models without a closed form."""
    n = count_complete(vocab_size, length, eos)
    return n * length * (16 * vocab_size * 8 + 16) + min(n, 2048) * per_sample_params * 8 * 3


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if n < 1024 or unit == "EiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g}"


def check_enumerable(
    vocab_size: int, length: int, per_sample_params: int = 0, max_bytes: int | None = None, eos: int | None = None
) -> int:
    """Refuse, before allocating anything, an enumeration that would not fit in ``max_bytes``."""
    max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
    need = enumeration_bytes(vocab_size, length, per_sample_params, eos)
    if need > max_bytes:
        n = count_complete(vocab_size, length, eos)
        raise EnumerationTooLarge(
            f"enumerating {n:.4g} responses (V={vocab_size}, T={length}) would need about {_human(need)} of memory "
            f"(limit {_human(max_bytes)}; set BIASLAB_MAX_BYTES to change it). "
            "Use Monte Carlo instead: biaslab.engines.montecarlo, or `biaslab check --mode mc`."
        )
    return need


def enumerate_sequences(vocab_size: int, length: int) -> Tensor:
    """(V**T, T) every sequence, row n is n written in base V with the first token most significant."""
    return _digits(0, vocab_size**length, vocab_size, length)  # (N, T)


def _digits(start: int, stop: int, base: int, width: int) -> Tensor:
    """(stop - start, width) the numbers start..stop-1 written in base ``base``, most significant digit first."""
    n = torch.arange(start, stop)
    return (n.unsqueeze(1) // base ** torch.arange(width - 1, -1, -1)) % base


def enumerate_complete(vocab_size: int, length: int, eos: int | None = None) -> tuple[Tensor, Tensor]:
    """(tokens (N, T) long, mask (N, T) float64): every complete response.

    Without EOS: all V**T sequences in base-V order. With EOS: shortest first, each length in lexicographic order;
    a response of length L ends with EOS (L < T) or reaches T; the EOS token is part of the response (it is
    sampled, so its log-probability is trained); positions after the end hold token 0 and mask 0.
    """
    if eos is None:
        tokens = enumerate_sequences(vocab_size, length)
        return tokens, torch.ones(tokens.shape, dtype=DTYPE)
    if not 0 <= eos < vocab_size:
        raise ModelError(f"eos must be a token id in [0, {vocab_size}); got {eos}")
    content = [v for v in range(vocab_size) if v != eos]
    rows, masks = [], []
    for L in range(1, length + 1):
        lasts = [eos] if L < length else list(range(vocab_size))
        for body in itertools.product(content, repeat=L - 1):
            for last in lasts:
                rows.append(list(body) + [last] + [0] * (length - L))
                masks.append([1.0] * L + [0.0] * (length - L))
    return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=DTYPE)


# ---------------------------------------------------------------- precision of user code


@functools.lru_cache(maxsize=256)
def estimator_dtype(est) -> torch.dtype:
    """The precision an estimator computes in: its output dtype on float64 inputs, or float32 when a float64
    output holds only float32-representable values (a function that casts internally)."""
    if est is None:
        return torch.float64
    g = torch.Generator().manual_seed(12345)
    if est.needs_full_logits:  # two (3, 4, 5) next-token log-distributions, else two (3, 4) log-probabilities
        x, y = (torch.log_softmax(torch.randn(3, 4, 5, generator=g, dtype=torch.float64), -1) for _ in range(2))
    else:
        x, y = (-0.1 - 2 * torch.rand(3, 4, generator=g, dtype=torch.float64) for _ in range(2))
    try:
        with torch.no_grad():
            out = est.fn(x, y)
    except Exception:  # the engine's own call reports the error with its context
        return torch.float64
    if not isinstance(out, Tensor) or not out.is_floating_point():
        return torch.float64
    if out.dtype == torch.float64 and out.numel() and bool((out.float().double() == out).all()):
        return torch.float32
    return out.dtype


def config_dtype(config) -> torch.dtype:
    """The lowest precision among a configuration's estimators (or its declared ``compute_dtype``)."""
    declared = getattr(config, "compute_dtype", None)
    if declared is not None:
        return declared
    dts = [estimator_dtype(getattr(config, name, None)) for name in ("reward_estimator", "loss_estimator")]
    return max(dts, key=lambda d: torch.finfo(d).eps)


# ---------------------------------------------------------------- results


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


@dataclass
class ExactResult:
    """Exact statistics of one configuration's update g, groups drawn from mu."""

    config: Recipe
    expected_grad: Tensor  # (P,) E[g]
    variance: float  # E||g - E g||^2 (trace of the covariance)
    nominal_scale: float  # c: an unbiased configuration has E g = c * grad KL
    info: Verdict

    # the verdict's fields, flat
    verdict = property(lambda self: self.info.verdict)
    rel_bias = property(lambda self: self.info.rel_bias)
    scale = property(lambda self: self.info.scale)
    factor = property(lambda self: self.info.factor)
    cos_reverse = property(lambda self: self.info.cos_reverse)
    cos_forward = property(lambda self: self.info.cos_forward)
    all_matches = property(lambda self: self.info.matches)  # direction -> scale relative to c
    matches = property(lambda self: self.info.direction)  # the first matched direction, or "none"
    nearest = property(lambda self: self.info.nearest)
    nearest_cos = property(lambda self: self.info.nearest_cos)
    recipe = property(lambda self: self.config)

    def as_dict(self, with_grad: bool = True) -> dict:
        cfg = self.config
        basic = cfg.estimator is not None
        d = {
            "label": cfg.label,
            "estimator": cfg.estimator.name if basic else None,
            "placement": cfg.placement.value if cfg.placement is not None else None,
            "level": cfg.level.value,
            "credit": cfg.credit.value if cfg.credit is not None else None,
            "variance": self.variance,
            "rel_bias": self.rel_bias,
            "scale": self.scale,
            "factor": self.factor,
            "cos_reverse": self.cos_reverse,
            "cos_forward": self.cos_forward,
            "verdict": self.verdict,
            "verdict_text": self.info.describe(),
            "matches": self.matches,
            "all_matches": dict(self.all_matches),
            "nearest": self.nearest,
            "nearest_cos": self.nearest_cos,
            "nominal_scale": self.nominal_scale,
            "dtype": self.info.dtype,
            "tolerance": self.info.tolerance,
        }
        if with_grad:
            d["expected_grad"] = self.expected_grad.tolist()
        return d


# ---------------------------------------------------------------- the engine


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


def _all_finite(x: Tensor) -> bool:
    """No NaN or inf in x: its sum is finite (one pass, no temporary), else (an overflowing sum) every element."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def _check_finite(config, a: Tensor, c: Tensor | None) -> None:
    if not _all_finite(a) or (c is not None and not _all_finite(c)):
        raise ValueError(
            f"{config.label}: the update is non-finite (NaN/inf) for some groups, e.g. a division by a zero "
            "group std with grpo_eps = 0"
        )


class ExactEngine:
    """Enumerate every complete response (and group) and evaluate configurations exactly (module docstring).

    Args:
        policy: pi_theta (its parameters receive the gradient).
        ref: pi_ref (never differentiated).
        behaviour: mu, the policy that sampled the data (None: on-policy, mu = pi).
        eos: end-of-sequence token id (None: fixed length T).
        group_size: B, the responses per group (baselines and aggregation act within a group).
        task_reward: optional (N,) task reward of each enumerated response (default 0); the KL part of the
            update is then judged: g(config) - g(config without KL).
        max_bytes: refuse enumerations whose estimated peak memory exceeds this (default 4 GiB or
            $BIASLAB_MAX_BYTES).
    """

    def __init__(
        self,
        policy: AutoregressiveModel,
        ref: AutoregressiveModel,
        behaviour: AutoregressiveModel | None = None,
        eos: int | None = None,
        group_size: int = 1,
        task_reward: Tensor | None = None,
        max_bytes: int | None = None,
        max_groups: int = MAX_GROUPS,
    ) -> None:
        check_models(policy, ref, behaviour, group_size, eos)
        self.policy, self.ref, self.behaviour = policy, ref, behaviour
        self.V, self.T, self.eos, self.B = policy.vocab_size, policy.length, eos, int(group_size)
        self.params = [p for p in policy.parameters() if p.requires_grad]
        if not self.params:
            raise ModelError("the policy has no parameters that require grad")
        self.P = sum(p.numel() for p in self.params)
        n_params = 0 if policy.closed_form_grads else self.P
        self._max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
        self.N = count_complete(self.V, self.T, eos)
        self.chunk_size: int | None = None  # set when the enumeration is processed in chunks (see _plan_chunks)
        try:
            check_enumerable(self.V, self.T, n_params, self._max_bytes, eos)
        except EnumerationTooLarge:
            if not (policy.closed_form_grads and eos is None and self.B == 1 and behaviour is None):
                raise
            self.chunk_size = self._plan_chunks()
        if self.B > 1:
            if self.N**self.B > max_groups:
                raise ValueError(
                    f"exact enumeration of groups needs N**B = {self.N}**{self.B} = {self.N**self.B:.3g} groups "
                    f"(limit {max_groups:.3g}); use a smaller group size or toy, or Monte Carlo over groups"
                )
            need = self.N * self.T * self.P * 8 * 2
            if need > self._max_bytes:
                raise EnumerationTooLarge(
                    f"groups of B > 1 need the Jacobian of {self.N} responses x {self.T} tokens x {self.P} "
                    f"parameters, about {_human(need)}; use a smaller toy"
                )

        if task_reward is not None:
            task_reward = torch.as_tensor(task_reward, dtype=DTYPE)
            if task_reward.shape != (self.N,) or not torch.isfinite(task_reward).all():
                raise ValueError(f"task_reward must be a finite ({self.N},) tensor, one value per complete response")
        self.task_reward = task_reward
        self._directions: Directions | None = None
        self._level_probs: list[Tensor] | None = None
        self._full_enumeration = True  # tokens are all V**T sequences in base-V order (closed-form reshape sums)
        self._reset_caches()
        if self.chunk_size is None:
            self._setup(*enumerate_complete(self.V, self.T, eos))

    def _reset_caches(self) -> None:
        """Empty the caches of one enumeration (or chunk): truths, Jacobian and Gram matrices, fields and sums."""
        self._truths: Truths | None = None
        self._jac: Tensor | None = None
        self._gram: Tensor | bool | None = None  # False: would not fit in the memory budget
        self._tok_gram: Tensor | bool | None = None
        self._pair_gram: Tensor | bool | None = None
        self._value_grads: dict = {}
        self._kl: dict = {}  # (estimator, level) -> its values and derivative on every response (``_kl_values``)
        self._fields: dict = {}  # field key -> Coefficients of one response's update (B = 1)
        self._means: dict = {}  # field key -> (P,) sum_n mu(y_n) g_n
        self._dots: dict = {}  # (key, key) -> sum_n mu(y_n) g_n . g'_n

    # ------------------------------------------------------------------ storage: in memory, or in chunks

    def _setup(self, tokens: Tensor, mask: Tensor, check_total: bool = True) -> None:
        """Per-response tensors of ``tokens`` (N, T): log-probabilities (the policy's with its graph), weights."""
        policy, ref, behaviour, eos = self.policy, self.ref, self.behaviour, self.eos
        self.tokens, self.mask = tokens, mask  # (N, T), (N, T)
        enumerated = eos is None and self._full_enumeration  # all V**T sequences in base-V order
        self.logp_full = (policy.log_probs_enumerated if enumerated else policy.log_probs)(self.tokens)  # (N, T, V)
        with torch.no_grad():  # the policy's graph is kept for many backward passes, not the reference's
            self.logp_ref_full = (ref.log_probs_enumerated if enumerated else ref.log_probs)(self.tokens)  # (N, T, V)
        self._logp_tok = at_tokens(self.logp_full, tokens) * self.mask  # (N, T), differentiable
        self._logp_full_det = self.logp_full.detach()  # (N, T, V)
        self.logp = self._logp_tok.detach()  # (N, T) masked log pi(y_t|y_<t)
        self.logp_ref = at_tokens(self.logp_ref_full, tokens) * self.mask  # (N, T) masked
        self.batch = TokenBatch(self.tokens, self.logp_full, self.logp_ref_full, self._logp_tok, self.logp_ref)
        self.logp_seq = self._logp_tok.sum(-1)  # (N,) log pi(y), differentiable
        self.logp_ref_seq = self.logp_ref.sum(-1)  # (N,)
        self.weights = self.logp_seq.detach().exp()  # (N,) pi(y)
        total = float(self.weights.sum())
        if check_total and abs(total - 1) > 1e-9:
            raise ModelError(f"enumerated response probabilities sum to {total!r}, not 1")
        if behaviour is None:
            self.logp_mu, self.prob_mu = self.logp, self.weights
        else:
            with torch.no_grad():
                self.logp_mu = at_tokens(behaviour.log_probs(tokens), tokens) * self.mask  # (N, T)
            self.prob_mu = self.logp_mu.sum(-1).exp()  # (N,) mu(y)

    def _plan_chunks(self) -> int:
        """Sequences per chunk (a power of V) so that one chunk's tensors fit in a quarter of the memory budget;
        refuses when even the level tables would not fit."""
        tables = 8 * 8 * sum(self.V ** (t + 1) for t in range(self.T))  # logits, probabilities, accumulators
        if tables > self._max_bytes // 2:
            raise EnumerationTooLarge(
                f"even in chunks, V={self.V}, T={self.T} needs about {_human(tables)} for its prefix tables "
                f"(limit {_human(self._max_bytes)}); use Monte Carlo instead"
            )
        per_seq = enumeration_bytes(self.V, self.T) / self.N
        c = 1
        while c * self.V * per_seq <= self._max_bytes // 4 and c * self.V <= self.N:
            c *= self.V
        return c

    def _chunks(self):
        """Yield an engine over each chunk of consecutive sequences (in-memory engines yield themselves). Sums of
        the chunks' weighted gradients, KLs and second moments are the whole enumeration's (all are linear)."""
        if self.chunk_size is None:
            yield self
            return
        if self._level_probs is None and self.policy.closed_form_grads:
            self._level_probs = self.policy.level_probs()  # shared by every chunk
        for start in range(0, self.N, self.chunk_size):
            sub = object.__new__(ExactEngine)
            sub.__dict__.update(self.__dict__)
            sub.chunk_size, sub._full_enumeration = None, False
            sub._reset_caches()
            tokens = _digits(start, min(start + self.chunk_size, self.N), self.V, self.T)  # (C, T)
            sub._setup(tokens, torch.ones(tokens.shape, dtype=DTYPE), check_total=False)
            if self.task_reward is not None:
                sub.task_reward = self.task_reward[start : start + tokens.shape[0]]
            yield sub

    def _sum_chunks(self, fn):
        """sum over chunks of fn(chunk engine) (tensors or floats, or tuples of them)."""
        total = None
        for sub in self._chunks():
            part = fn(sub)
            if total is None:
                total = part
            elif isinstance(part, tuple):
                total = tuple(a + b for a, b in zip(total, part))
            else:
                total = total + part
        return total

    @property
    def n_sequences(self) -> int:
        return self.N

    # ------------------------------------------------------------------ mapping coefficients to theta

    def flat(self, grads) -> Tensor:
        return torch.cat(
            [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, self.params)]
        )

    def grad_of(self, scalar: Tensor) -> Tensor:
        """Flat gradient of ``scalar`` (built on this engine's forward pass) with respect to theta."""
        return self.flat(torch.autograd.grad(scalar, self.params, retain_graph=True, allow_unused=True))

    def weighted_grad(self, wa_tok: Tensor | None, wc_full: Tensor | None) -> Tensor:
        """(P,) sum_n [sum_t wa[n,t] grad log pi(y_nt|y_<t) + sum_{t,v} wc[n,t,v] grad log pi(v|y_<t)].

        A reshape-sum for tabular models over all V**T sequences (closed form), one backward pass otherwise.
        """
        if self.policy.closed_form_grads and self.eos is None:
            if self._level_probs is None:
                self._level_probs = self.policy.level_probs()
            if not self._full_enumeration:  # a chunk: accumulate per prefix row
                return self.policy.weighted_grad(self.tokens, wa_tok, wc_full, self._level_probs)
            return self.policy.enumerated_expected_grad(wa_tok, wc_full, self._level_probs)
        outputs, cotangents = [], []
        if wa_tok is not None:
            outputs.append(self._logp_tok)
            cotangents.append(wa_tok)
        if wc_full is not None:
            outputs.append(self.logp_full)
            cotangents.append(wc_full * self.mask.unsqueeze(-1))
        if not outputs:
            return torch.zeros(self.P, dtype=DTYPE)
        return self.flat(torch.autograd.grad(outputs, self.params, cotangents, retain_graph=True, allow_unused=True))

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

    # ------------------------------------------------------------------ truths

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

    def task_grad(self) -> Tensor:
        """(P,) grad E_pi[R] = sum_y pi(y) R(y) grad log pi(y) (zeros without a task reward)."""
        if self.chunk_size is not None and self.task_reward is not None:
            return self._sum_chunks(lambda sub: sub.task_grad())
        if self.task_reward is None:
            return torch.zeros(self.P, dtype=DTYPE)
        return self.weighted_grad((self.weights * self.task_reward)[:, None] * self.mask, None)

    # ------------------------------------------------------------------ the estimator's own expected value

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

    def _distinct(self, x: Tensor) -> Tensor:
        """(sum_t V**(t+1), 1) the entries of x (N, T) at each distinct prefix y_<=t of the full base-V enumeration,
        where column t repeats in blocks of V**(T-1-t) rows; ``_spread`` puts them back."""
        return torch.cat([x[:: self.V ** (self.T - 1 - t), t] for t in range(self.T)]).unsqueeze(1)

    def _spread(self, u: Tensor) -> Tensor:
        """(N, T) from the distinct entries (sum_t V**(t+1), 1) of ``_distinct``."""
        cols = u.squeeze(1).split([self.V ** (t + 1) for t in range(self.T)])
        return torch.stack([c.repeat_interleave(self.V ** (self.T - 1 - t)) for t, c in enumerate(cols)], 1)

    # ------------------------------------------------------------------ coefficients over groups

    def _group_chunks(self, chunk: int, symmetric: bool = False):
        """Yield (idx (E, B) response indices, prob (E,) probability under mu) over all N**B ordered groups, or, for
        an update symmetric in the group's members (``symmetric``: every ``Recipe``), over the sorted groups (one
        per multiset) with prob = mu(group) x its number of orderings B! / prod_v (count of v)!."""
        if symmetric and self.B > 1:
            groups = torch.combinations(torch.arange(self.N), self.B, with_replacement=True)  # (M, B) sorted rows
            earlier = torch.ones(self.B, self.B, dtype=torch.bool).tril(-1)  # [b, c]: c < b
            rank = ((groups[:, :, None] == groups[:, None, :]) & earlier).sum(-1) + 1  # position within a run
            orderings = math.factorial(self.B) / rank.prod(-1).to(DTYPE)  # (M,)
            for start in range(0, groups.shape[0], chunk):
                idx = groups[start : start + chunk]
                yield idx, orderings[start : start + chunk] * self.prob_mu[idx].prod(-1)
            return
        total = self.N**self.B
        for start in range(0, total, chunk):
            idx = _digits(start, min(start + chunk, total), self.N, self.B)  # (E, B)
            yield idx, self.prob_mu[idx].prod(-1)

    @staticmethod
    def _pick(x: Tensor, idx: Tensor | None) -> Tensor:
        """x (N, ...) at the groups ``idx`` (E, B): (E, B, ...); idx None: every response alone, (N, 1, ...), a view."""
        return x[:, None] if idx is None else x[idx]

    def _inputs(self, idx: Tensor | None):
        """(logp, logp_mu, logp_ref, mask (E, B, T), rewards (E, B) or None) of the groups ``idx`` (E, B), or of
        every response alone (idx None)."""
        rew = None if self.task_reward is None else self._pick(self.task_reward, idx)
        return (*(self._pick(x, idx) for x in (self.logp, self.logp_mu, self.logp_ref, self.mask)), rew)

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

    # ------------------------------------------------------------------ fields: one response's updates (B = 1)

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

    def expected_grad(self, config) -> Tensor:
        """(P,) E[g] of ``config`` over groups drawn from mu (no variance, no verdict)."""
        return self.moments(config)[0]

    # ------------------------------------------------------------------ verdicts

    def evaluate(self, config) -> ExactResult:
        """Exact expected update, variance, verdict (``biaslab.core.verdict``) and matched directions of ``config``."""
        tr = self.truths()
        mean, second, wstd = self.moments(config)
        variance = max(second - float(mean @ mean), 0.0)
        nominal = config.nominal_scale(self.B, self.T, wstd)
        # a named direction of round-off size (the rule of ``true_gradient_is_zero``) is zero: it never matches
        def named(d: Tensor) -> Tensor:
            return torch.zeros_like(d) if true_gradient_is_zero(float(d.norm()), tr.score_rms) else d

        if self._directions is None:  # stacked once per engine (batched dot products in the verdict rule)
            self._directions = Directions({k: named(v) for k, v in tr.directions.items() if k != "zero"})
        directions = self._directions
        ev = self.expected_value_grad(config) if isinstance(config, Recipe) else None
        if ev is not None:
            directions = directions.extended({"expected_value": named(ev)})
        info = exact_verdict(mean, directions, nominal, math.sqrt(max(second, 0.0)), tr.undefined, config_dtype(config))
        return ExactResult(config, mean.detach(), variance, nominal, info)

    def evaluate_all(self, configs: list, progress: bool = False) -> list[ExactResult]:
        """``evaluate`` every configuration, under the thread policy for the enumeration's size."""
        from tqdm.auto import tqdm

        from .threads import small_problem_threads, work_size

        with small_problem_threads(work_size(self.N * self.B, self.T, self.V)):
            if self.B == 1 and self.chunk_size is None:  # every field first: one Jacobian pass serves them all
                for c in configs:
                    if not getattr(c, "whiten", False):
                        for _, key in self._parts(c):
                            self._field(key)
            return [self.evaluate(c) for c in tqdm(configs, desc="exact", disable=not progress, leave=False)]


__all__ = [
    "DIRECTIONS",
    "EnumerationTooLarge",
    "ExactEngine",
    "ExactResult",
    "Truths",
    "check_enumerable",
    "config_dtype",
    "count_complete",
    "enumerate_complete",
    "enumerate_sequences",
    "estimator_dtype",
]
