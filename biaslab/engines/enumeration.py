"""Enumeration of a toy model's complete responses, the chunk plan for enumerations too large for memory, and the
mapping of per-token coefficients to theta (``weighted_grad``): the storage layer of the exact engine.

Approximates nothing: every complete response (all V**T sequences, or with an EOS token every response that ends at
EOS or at T tokens) is listed, with its log-probabilities under pi, pi_ref and mu. Requires V**T (or the EOS count)
rows of (T, V) float64 tensors, refused beforehand when above the memory budget (``check_enumerable``); tabular
models without EOS are processed in chunks of consecutive sequences instead.
"""

from __future__ import annotations

import itertools
import math
import os

import torch
from torch import Tensor

from ..core.placements import TokenBatch
from .toy import DTYPE, ModelError, at_tokens

DEFAULT_MAX_BYTES = int(float(os.environ.get("BIASLAB_MAX_BYTES", 4 * 2**30)))

MAX_GROUPS = 2_000_000


class EnumerationTooLarge(MemoryError):
    """Enumerating every sequence would need more memory than allowed."""


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



class Enumeration:
    """The enumerated responses of an ``ExactEngine`` (mixin): tensors of every response, chunks, and sums of
    weighted score functions over them. Attributes set by ``ExactEngine.__init__``: policy, ref, behaviour, V, T,
    eos, B, params, P, N, chunk_size, task_reward, _max_bytes, _level_probs, _full_enumeration."""

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
            sub = object.__new__(type(self))
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

    def _distinct(self, x: Tensor) -> Tensor:
        """(sum_t V**(t+1), 1) the entries of x (N, T) at each distinct prefix y_<=t of the full base-V enumeration,
        where column t repeats in blocks of V**(T-1-t) rows; ``_spread`` puts them back."""
        return torch.cat([x[:: self.V ** (self.T - 1 - t), t] for t in range(self.T)]).unsqueeze(1)

    def _spread(self, u: Tensor) -> Tensor:
        """(N, T) from the distinct entries (sum_t V**(t+1), 1) of ``_distinct``."""
        cols = u.squeeze(1).split([self.V ** (t + 1) for t in range(self.T)])
        return torch.stack([c.repeat_interleave(self.V ** (self.T - 1 - t)) for t, c in enumerate(cols)], 1)

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
