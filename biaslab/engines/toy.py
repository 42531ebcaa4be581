"""Enumerable toy autoregressive models over a vocabulary of V tokens and a fixed length T, in float64.

Two families share one interface (``AutoregressiveModel``):

* ``TabularAR``: its own logits for every prefix. Level t holds a (V**t, V) array; the row of a prefix is its
  base-V number, first token most significant. Parameters are the logits themselves.
* ``NeuralAR``: a small GRU whose parameters are shared across prefixes, so conclusions are not an artifact of
  the tabular parameterization.

Both give teacher-forced next-token log-probabilities ``log_probs(tokens) -> (N, T, V)`` and seeded sampling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from ..core.types import at_tokens

DTYPE = torch.float64


class ModelError(ValueError):
    """A toy model was given logits or sizes it cannot hold."""


def _check_logits(x: Tensor, what: str, *, reference: bool) -> None:
    if torch.isnan(x).any():
        raise ModelError(f"{what} contains NaN logits")
    if reference and torch.isneginf(x).any():
        raise ModelError(
            f"{what} gives zero probability (logit -inf) to some token: the reverse KL(pi || pi_ref) is infinite "
            "wherever pi puts mass there. Use a large negative finite logit instead."
        )
    if torch.isinf(x).any():
        raise ModelError(f"{what} contains infinite logits; logits must be finite")


class AutoregressiveModel(nn.Module):
    """A distribution over sequences y in {0..V-1}^T: log pi(y) = sum_t log pi(y_t | y_<t).

    Capability flags (class attributes):
        closed_form_grads: the model computes per-sample gradient norms in closed form (``coefficient_blocks``);
            otherwise the engines use torch.func.
    """

    closed_form_grads: bool = False

    def __init__(self, vocab_size: int, length: int) -> None:
        super().__init__()
        if vocab_size < 2 or length < 1:
            raise ModelError(f"need vocab_size >= 2 and length >= 1, got V={vocab_size}, T={length}")
        self.vocab_size = int(vocab_size)
        self.length = int(length)

    def log_probs(self, tokens: Tensor) -> Tensor:
        """(N, T, V) log pi(. | y_<t) for each position of each sequence in ``tokens`` (N, T), validated."""
        self._check_tokens(tokens)
        return self(tokens)

    def forward(self, tokens: Tensor) -> Tensor:
        """``log_probs`` without input checks (torch.func calls this)."""
        raise NotImplementedError

    def log_probs_enumerated(self, tokens: Tensor) -> Tensor:
        """``log_probs`` for the lexicographic enumeration of all V**T sequences (may be faster)."""
        return self.log_probs(tokens)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flat(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate per-parameter tensors (e.g. gradients) into one flat vector, parameter order."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def _check_tokens(self, tokens: Tensor) -> None:
        if tokens.dim() != 2 or tokens.shape[1] != self.length:
            raise ModelError(f"tokens must have shape (N, {self.length}); got {tuple(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ModelError(f"tokens must lie in [0, {self.vocab_size})")

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """(n, T) sequences y ~ pi, one token at a time, drawn with ``generator``.

        Position t draws ``torch.multinomial(pi(. | y_<t), 1, generator)`` for all n rows at once, t = 0..T-1; the
        subclasses carry their state (prefix row, recurrent state) from step to step, so sampling costs O(T)
        steps, and give the same samples as recomputing ``next_log_probs`` of the whole prefix at every step.
        """
        tokens = torch.zeros(n, self.length, dtype=torch.long)
        state = self._sample_start(n)
        for t in range(self.length):
            logp_t, state = self._sample_step(state, tokens[:, t - 1] if t else None)  # (n, V)
            tokens[:, t] = _draw(logp_t, generator)
        return tokens

    def _sample_start(self, n: int) -> object:
        """The sampling state before the first token (here: the empty prefixes, (n, 0))."""
        return torch.zeros(n, 0, dtype=torch.long)

    def _sample_step(self, state: object, last: Tensor | None) -> tuple[Tensor, object]:
        """Append the token just drawn (``last``, (n,); None at t = 0) to the state and return
        ((n, V) log pi(. | y_<t), the new state). Generic fallback: the prefix itself, re-read in full."""
        prefix = state if last is None else torch.cat([state, last[:, None]], 1)  # (n, t)
        return self.next_log_probs(prefix), prefix

    def next_log_probs(self, prefix: Tensor) -> Tensor:
        """(N, V) log pi(. | prefix) for prefixes (N, t): the sampling steps along the prefix (a subclass with the
        generic ``_sample_step`` must override this)."""
        if type(self)._sample_step is AutoregressiveModel._sample_step:
            raise NotImplementedError
        logp, state = self._sample_step(self._sample_start(prefix.shape[0]), None)
        for s in range(prefix.shape[1]):
            logp, state = self._sample_step(state, prefix[:, s])
        return logp

    # ---- memory estimates (bytes), for refusing work before allocating it

    def n_sequences(self) -> int:
        """V**T, the number of sequences an enumeration holds."""
        return self.vocab_size**self.length

    def log_probs_bytes(self, n: int | None = None) -> int:
        """Bytes of one float64 (n, T, V) log-probability tensor (n = V**T, the whole enumeration, by default)."""
        n = self.n_sequences() if n is None else int(n)
        return n * self.length * self.vocab_size * torch.finfo(DTYPE).bits // 8

    def per_sample_grads_bytes(self, n: int) -> int:
        """Bytes of n float64 per-sample gradients (n, P): the dominant term of storing Monte Carlo samples."""
        return int(n) * self.n_params() * torch.finfo(DTYPE).bits // 8


def check_models(
    policy: AutoregressiveModel,
    ref: AutoregressiveModel,
    behaviour: AutoregressiveModel | None = None,
    group_size: int = 1,
    eos: int | None = None,
) -> None:
    """Refuse (before an engine allocates anything) a reference or behaviour model of another V or T than the
    policy, a group size below 1, non-finite logits, an EOS id outside the vocabulary, or a tabular policy with
    frozen levels (its closed-form gradients cover every level)."""
    for what, m in (("reference", ref), ("behaviour", behaviour)):
        if m is not None and (m.vocab_size, m.length) != (policy.vocab_size, policy.length):
            raise ModelError(
                f"policy and {what} disagree: policy V={policy.vocab_size}, T={policy.length}; "
                f"{what} V={m.vocab_size}, T={m.length}"
            )
    if int(group_size) < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if policy.closed_form_grads and not all(p.requires_grad for p in policy.parameters()):
        raise ModelError("a tabular policy's levels must all be trainable (requires_grad): its closed-form "
                         "gradients cover every level; to study a subset, read those coordinates of the result")
    policy.check_finite("policy")
    ref.check_finite("reference", reference=True)
    if behaviour is not None:
        behaviour.check_finite("behaviour", reference=True)
    if eos is not None and not 0 <= eos < policy.vocab_size:
        raise ModelError(f"eos must be a token id in [0, {policy.vocab_size}); got {eos}")


def _draw(logp: Tensor, generator: torch.Generator | None) -> Tensor:
    """(n,) one token per row from (n, V) log-probabilities."""
    return torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)


# ====================================================================== tabular


def tabular_logit_count(vocab_size: int, length: int) -> int:
    """Number of logits a tabular model holds: sum_t V**t * V."""
    return sum(vocab_size**t * vocab_size for t in range(length))


class TabularAR(AutoregressiveModel):
    """Tabular autoregressive model: ``levels[t]`` is a (V**t, V) array of logits, one row per prefix.

    The row of prefix (y_0..y_{t-1}) is sum_s y_s V**(t-1-s) (base V, first token most significant). The flat
    parameter vector concatenates the levels in order, each row-major.
    """

    closed_form_grads = True
    max_logits = 50_000_000

    def __init__(self, levels: Sequence[Tensor | object]) -> None:
        levels = [torch.as_tensor(x, dtype=DTYPE) for x in levels]
        if not levels:
            raise ModelError("a tabular model needs at least one level")
        V = levels[0].shape[-1] if levels[0].dim() == 2 else -1
        super().__init__(max(V, 2), len(levels))
        for t, x in enumerate(levels):
            if x.dim() != 2 or x.shape != (V**t, V):
                raise ModelError(f"level {t} must have shape (V**{t}, V) = ({V**t}, {V}); got {tuple(x.shape)}")
        self.levels = nn.ParameterList([nn.Parameter(x.clone()) for x in levels])

    @staticmethod
    def check_size(vocab_size: int, length: int) -> None:
        n = tabular_logit_count(vocab_size, length)
        if n > TabularAR.max_logits:
            raise ModelError(
                f"a tabular model with V={vocab_size}, T={length} holds {n:.3g} logits "
                f"({n * 8 / 2**30:.3g} GiB in float64); use NeuralAR for large toys"
            )

    @classmethod
    def random(cls, vocab_size: int, length: int, seed: int = 0, scale: float = 1.0) -> TabularAR:
        """Logits i.i.d. N(0, scale^2), drawn from ``torch.Generator().manual_seed(seed)``."""
        cls.check_size(vocab_size, length)
        g = torch.Generator().manual_seed(seed)
        return cls([scale * torch.randn(vocab_size**t, vocab_size, generator=g, dtype=DTYPE) for t in range(length)])

    def perturbed(self, kl_scale: float, seed: int = 1) -> TabularAR:
        """A copy with logits + kl_scale * N(0, 1): the KL to ``self`` grows like kl_scale**2."""
        g = torch.Generator().manual_seed(seed)
        return TabularAR([x.detach() + kl_scale * torch.randn(x.shape, generator=g, dtype=DTYPE) for x in self.levels])

    def check_finite(self, what: str, *, reference: bool = False) -> None:
        for t, x in enumerate(self.levels):
            _check_logits(x.detach(), f"{what} level {t}", reference=reference)

    def prefix_rows(self, tokens: Tensor) -> Tensor:
        """(N, T) the row index of each prefix y_<t in level t."""
        N, T = tokens.shape
        rows = torch.zeros(N, T, dtype=torch.long)
        for t in range(1, T):
            rows[:, t] = rows[:, t - 1] * self.vocab_size + tokens[:, t - 1]
        return rows

    def forward(self, tokens: Tensor) -> Tensor:
        rows = self.prefix_rows(tokens)  # (N, T)
        out = [torch.log_softmax(lvl, -1)[rows[:, t]] for t, lvl in enumerate(self.levels)]  # T x (N, V)
        return torch.stack(out, 1)  # (N, T, V)

    def log_probs_enumerated(self, tokens: Tensor) -> Tensor:
        # In lexicographic order the prefix of length t repeats V**(T-t) times in a row: expand, no gather.
        V, T = self.vocab_size, self.length
        N = V**T
        out = [
            torch.log_softmax(lvl, -1).unsqueeze(1).expand(V**t, V ** (T - t), V).reshape(N, V)
            for t, lvl in enumerate(self.levels)
        ]  # T x (N, V)
        return torch.stack(out, 1)  # (N, T, V)

    def _sample_start(self, n: int) -> tuple[int, Tensor]:
        return 0, torch.zeros(n, dtype=torch.long)  # (level t, the prefix row of each sample (n,))

    def _sample_step(self, state: tuple[int, Tensor], last: Tensor | None) -> tuple[Tensor, tuple[int, Tensor]]:
        t, row = state
        if last is not None:
            row = row * self.vocab_size + last  # (n,)
        return torch.log_softmax(self.levels[t][row], -1), (t + 1, row)  # (n, V)

    # ---- closed forms: d log softmax(theta)_v / d theta = e_v - p, one block of parameters per prefix row.
    # A per-sample gradient g_n = sum_t a_nt grad log pi(y_nt | y_<t) (token coefficients a, (N, T)) plus
    # sum_{t,v} c_ntv grad log pi(v | y_<t) (full coefficients c, (N, T, V)) has, at the prefix row of level t,
    # the block  a_nt e_{y_nt} + c_nt - p_t * (a_nt + sum_v c_ntv).  Blocks of different t are different rows.

    def coefficient_blocks(
        self, tokens: Tensor, coef_tok: Tensor | None, coef_full: Tensor | None, logp_full: Tensor | None = None
    ) -> Tensor:
        """(N, T, V) the block a_nt e_{y_nt} + c_nt - p_t (a_nt + sum_v c_ntv) of each token's prefix row: g_n
        restricted to the rows it touches (either coefficient may be None; ``logp_full`` (N, T, V): the
        next-token log-probabilities when the caller has them, else one forward pass)."""
        p = (self(tokens) if logp_full is None else logp_full).detach().exp()  # (N, T, V)
        block = torch.zeros_like(p) if coef_full is None else coef_full.clone()  # (N, T, V)
        if coef_tok is not None:
            block.scatter_add_(-1, tokens.unsqueeze(-1), coef_tok.unsqueeze(-1))
        return block - p * block.sum(-1, keepdim=True)

    def token_sq_norm_factor(self, tokens: Tensor, logp_full: Tensor | None = None) -> Tensor:
        """(N, T) ||e_{y_t} - p_t||^2 = 1 - 2 p_t(y_t) + ||p_t||^2: with token coefficients only,
        ||g_n||^2 = sum_t a_nt^2 * factor_nt (``logp_full`` (N, T, V) when the caller has it)."""
        p = (self(tokens) if logp_full is None else logp_full).detach().exp()  # (N, T, V)
        p_y = at_tokens(p, tokens)  # (N, T)
        return 1 - 2 * p_y + (p**2).sum(-1)

    def enumerated_expected_grad(
        self, wa_tok: Tensor | None, wc_full: Tensor | None, probs: list[Tensor] | None = None
    ) -> Tensor:
        """(P,) sum_n g_n for weighted coefficients over the lexicographic enumeration of all V**T sequences.

        Sequences sharing y_<=t are contiguous blocks, so the sum over sequences is a reshape-sum per level.
        ``probs`` may hold the cached next-token probabilities of each level.
        """
        V, T = self.vocab_size, self.length
        wa_t = None if wa_tok is None else wa_tok.t().contiguous()  # (T, N)
        tables = []
        for t in range(T):
            acc = torch.zeros(V**t, V, dtype=DTYPE)
            if wa_t is not None:
                acc += wa_t[t].view(V ** (t + 1), V ** (T - t - 1)).sum(1).view(V**t, V)
            if wc_full is not None:
                acc += wc_full[:, t].reshape(V**t, V ** (T - t), V).sum(1)
            tables.append(acc)
        return self.level_grad(tables, probs)

    def level_grad(self, tables: list[Tensor], probs: list[Tensor] | None = None) -> Tensor:
        """(P,) sum_t sum_{row, v} c_t[row, v] grad log pi(v | prefix row) of coefficient tables c_t (V**t, V),
        one per level (each row's block is c - p sum_v c)."""
        probs = probs if probs is not None else self.level_probs()
        return torch.cat([(c - p * c.sum(-1, keepdim=True)).reshape(-1) for c, p in zip(tables, probs)])

    def param_offsets(self) -> Tensor:
        """(T,) start of each level's block in the flat parameter vector: sum_{s<t} V**s * V."""
        V = self.vocab_size
        return torch.tensor([sum(V**s * V for s in range(t)) for t in range(self.length)], dtype=torch.long)

    def block_columns(self, tokens: Tensor) -> Tensor:
        """(N, T, V) flat parameter index of each entry of a token's block (the V logits of its prefix row)."""
        V = self.vocab_size
        return (self.param_offsets() + self.prefix_rows(tokens) * V).unsqueeze(-1) + torch.arange(V)

    def token_logp_jacobian(
        self, tokens: Tensor, mask: Tensor | None = None, logp_full: Tensor | None = None
    ) -> Tensor:
        """(N, T, P) d log pi(y_t | y_<t) / d theta in closed form (row t of sequence n: e_{y_t} - p_t at the
        block of its prefix row, zero elsewhere), times ``mask`` (N, T) when given (0 on padding). Equals
        torch.func.jacrev of the gathered log-probabilities without importing torch._dynamo (about 1.2 s of CPU
        on the first torch.func call). Memory N * T * P floats; ``logp_full`` (N, T, V) spares a forward pass."""
        N, T = tokens.shape
        block = self.coefficient_blocks(tokens, torch.ones(N, T, dtype=DTYPE), None, logp_full)  # e_y - p, (N, T, V)
        if mask is not None:
            block = block * mask.to(block.dtype).unsqueeze(-1)
        jac = torch.zeros(N, T, self.n_params(), dtype=block.dtype)
        jac.scatter_(-1, self.block_columns(tokens), block)  # each (n, t) writes its own V columns: no collisions
        return jac  # (N, T, P)

    def weighted_grad(
        self, tokens: Tensor, wa_tok: Tensor | None, wc_full: Tensor | None, probs: list[Tensor] | None = None
    ) -> Tensor:
        """(P,) sum_n g_n for weighted coefficients of any set of sequences ``tokens`` (N, T) (a chunk of the
        enumeration, or responses padded after EOS with zero coefficients): the same closed form as
        ``enumerated_expected_grad``, accumulated per prefix row with index_add, touching only the rows (prefixes)
        the sequences visit, so a chunk of a large enumeration costs O(chunk), not O(P)."""
        V = self.vocab_size
        probs = probs if probs is not None else self.level_probs()
        rows = self.prefix_rows(tokens)  # (N, T)
        out = torch.zeros(sum(p.numel() for p in probs), dtype=DTYPE)
        offset = 0
        for t in range(self.length):
            p = probs[t]  # (V**t, V)
            r = rows[:, t]
            lo, hi = int(r.min()), int(r.max()) + 1
            acc = torch.zeros(hi - lo, V, dtype=DTYPE)
            if wa_tok is not None:
                acc.view(-1).index_add_(0, (r - lo) * V + tokens[:, t], wa_tok[:, t])
            if wc_full is not None:
                acc.index_add_(0, r - lo, wc_full[:, t])
            out[offset + lo * V : offset + hi * V] = (acc - p[lo:hi] * acc.sum(-1, keepdim=True)).reshape(-1)
            offset += p.numel()
        return out

    def level_probs(self) -> list[Tensor]:
        """[(V**t, V)] next-token probabilities of every prefix, detached."""
        return [torch.softmax(lvl.detach(), -1) for lvl in self.levels]


# ====================================================================== neural


class NeuralAR(AutoregressiveModel):
    """A GRU language model with shared parameters: embedding -> GRU cell (written out) -> linear head.

    Input at position t is y_{t-1} (a BOS id V at t = 0). Written with plain linear algebra so torch.func can
    take per-sample gradients.
    """

    def __init__(self, vocab_size: int, length: int, hidden: int = 8, embed: int = 8) -> None:
        super().__init__(vocab_size, length)
        self.hidden = hidden
        self.embed = nn.Embedding(vocab_size + 1, embed, dtype=DTYPE)
        self.w_x = nn.Linear(embed, 3 * hidden, dtype=DTYPE)
        self.w_h = nn.Linear(hidden, 3 * hidden, dtype=DTYPE)
        self.head = nn.Linear(hidden, vocab_size, dtype=DTYPE)

    @classmethod
    def random(
        cls, vocab_size: int, length: int, seed: int = 0, scale: float = 1.0, hidden: int = 8, embed: int = 8
    ) -> NeuralAR:
        """Weights i.i.d. N(0, scale^2 / fan_in) from ``torch.Generator().manual_seed(seed)``."""
        m = cls(vocab_size, length, hidden, embed)
        m._add_noise(scale, seed, add=False)
        return m

    def perturbed(self, kl_scale: float, seed: int = 1) -> NeuralAR:
        """A copy with every weight + kl_scale * N(0, 1/fan_in)."""
        m = NeuralAR(self.vocab_size, self.length, self.hidden, self.embed.embedding_dim)
        m.load_state_dict(self.state_dict())
        m._add_noise(kl_scale, seed, add=True)
        return m

    @torch.no_grad()
    def _add_noise(self, scale: float, seed: int, add: bool) -> None:
        """scale * N(0, 1/fan_in) from ``torch.Generator().manual_seed(seed)`` added to every weight (or, with
        ``add=False``, replacing it)."""
        g = torch.Generator().manual_seed(seed)
        for p in self.parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            noise = scale * torch.randn(p.shape, generator=g, dtype=DTYPE) / math.sqrt(fan_in)
            if add:
                p.add_(noise)
            else:
                p.copy_(noise)

    def check_finite(self, what: str, *, reference: bool = False) -> None:
        for name, p in self.named_parameters():
            if not torch.isfinite(p).all():
                raise ModelError(f"{what} parameter {name} is not finite")

    def _cell(self, x: Tensor, h: Tensor) -> Tensor:
        xr, xz, xn = self.w_x(x).chunk(3, -1)
        hr, hz, hn = self.w_h(h).chunk(3, -1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h

    def _inputs(self, tokens: Tensor) -> Tensor:
        bos = torch.full_like(tokens[:, :1], self.vocab_size)
        return torch.cat([bos, tokens[:, :-1]], 1)  # (N, T)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(self._inputs(tokens))  # (N, T, E)
        h = x.new_zeros(tokens.shape[0], self.hidden)  # (N, H)
        hs = []
        for t in range(self.length):
            h = self._cell(x[:, t], h)
            hs.append(h)
        return torch.log_softmax(self.head(torch.stack(hs, 1)), -1)  # (N, T, V)

    def _sample_start(self, n: int) -> Tensor:
        return self.embed.weight.new_zeros(n, self.hidden)  # (n, H): the state before the BOS input

    def _sample_step(self, state: Tensor, last: Tensor | None) -> tuple[Tensor, Tensor]:
        # the GRU reads y_{t-1} (BOS at t = 0) and its state; one cell per step instead of the whole prefix
        inp = torch.full((state.shape[0],), self.vocab_size, dtype=torch.long) if last is None else last  # (n,)
        h = self._cell(self.embed(inp), state)  # (n, H)
        return torch.log_softmax(self.head(h), -1), h  # (n, V)


# ====================================================================== per-sample gradients (torch.func)
# For models without a closed form: g_n = sum_{t,v} coef[n,t,v] grad log pi(v | y_<t) by functional_call + vmap +
# grad (or jacrev) in chunks, so memory stays at chunk x P floats; parameter order of the model.


def _functional(model: AutoregressiveModel):
    """(params, logp_one(params, y (T,)) -> (T, V) next-token log-probabilities): the model as a function of its
    trainable parameters, for torch.func."""
    named = dict(model.named_parameters())
    names = [n for n, p in named.items() if p.requires_grad]
    frozen = {n: p.detach() for n, p in named.items() if not p.requires_grad}

    def logp_one(ps: tuple[Tensor, ...], y: Tensor) -> Tensor:
        state = {**frozen, **dict(zip(names, ps))}
        return functional_call(model, state, (y.unsqueeze(0),), {}, strict=False)[0]  # (T, V)

    return tuple(named[n].detach() for n in names), logp_one


def per_sample_grads(model: AutoregressiveModel, tokens: Tensor, coef: Tensor, chunk: int = 2048):
    """Yield (start, (n, P) flat per-sample gradients g_n of the coefficients ``coef`` (N, T, V)) chunk by chunk."""
    params, logp_one = _functional(model)
    fn = vmap(grad(lambda ps, y, c: (c * logp_one(ps, y)).sum()), in_dims=(None, 0, 0))
    for start in range(0, tokens.shape[0], chunk):
        gs = fn(params, tokens[start : start + chunk], coef[start : start + chunk].detach())
        yield start, torch.cat([g.reshape(g.shape[0], -1) for g in gs], 1)  # (n, P)


def per_sample_dots(model: AutoregressiveModel, tokens: Tensor, cx: Tensor, cy: Tensor, chunk: int = 2048) -> Tensor:
    """(N,) g_n(cx) . g_n(cy) of two coefficient sets (N, T, V), chunked (one pass when cy is cx)."""
    out = torch.empty(tokens.shape[0], dtype=cx.dtype)
    grads_y = None if cy is cx else per_sample_grads(model, tokens, cy, chunk)
    for start, gx in per_sample_grads(model, tokens, cx, chunk):
        gy = gx if grads_y is None else next(grads_y)[1]
        out[start : start + gx.shape[0]] = (gx * gy).sum(1)
    return out


def _jacobians(model: AutoregressiveModel, tokens: Tensor, outputs, chunk: int):
    """Yield (start, (n, K, P)) per-sample Jacobians of ``outputs(logp (T, V), y (T,)) -> (K,)``, chunk by chunk
    (K reverse passes per response)."""
    params, logp_one = _functional(model)
    fn = vmap(jacrev(lambda ps, y: outputs(logp_one(ps, y), y)), in_dims=(None, 0))
    for start in range(0, tokens.shape[0], chunk):
        jac = fn(params, tokens[start : start + chunk])  # tuple of (n, K, *shape)
        yield start, torch.cat([x.reshape(x.shape[0], x.shape[1], -1) for x in jac], -1)  # (n, K, P)


def per_sample_token_jacobians(model: AutoregressiveModel, tokens: Tensor, mask: Tensor, chunk: int = 2048):
    """Yield (start, (n, T, P) d log pi(y_t | y_<t) / d theta times ``mask`` (N, T)) chunk by chunk: the per-token
    Jacobian."""
    for start, j in _jacobians(model, tokens, at_tokens, chunk):
        yield start, j * mask[start : start + chunk, :, None]


def per_sample_gram(model: AutoregressiveModel, tokens: Tensor, chunk: int = 512) -> Tensor:
    """(N, T*V, T*V) Gram matrices G_n[(t,v),(s,w)] = grad log pi(v|y_n,<t) . grad log pi(w|y_n,<s).

    Computed once per enumeration (per-sample Jacobians of the (T, V) next-token log-probabilities, chunked), so
    that any coefficients give ||g_n||^2 = c_n^T G_n c_n without another pass through the model."""
    TV = tokens.shape[1] * model.vocab_size
    out = torch.empty(tokens.shape[0], TV, TV, dtype=torch.float64)
    for start, j in _jacobians(model, tokens, lambda lp, y: lp.reshape(-1), chunk):  # (n, TV, P)
        out[start : start + j.shape[0]] = j @ j.transpose(1, 2)
    return out


# ====================================================================== pairs


def make_pair(
    model: str = "tabular",
    vocab_size: int = 3,
    length: int = 4,
    seed: int = 0,
    kl_scale: float = 1.0,
    **kwargs: object,
) -> tuple[AutoregressiveModel, AutoregressiveModel]:
    """(policy, reference): the reference drawn from ``seed``, the policy = reference + kl_scale * noise."""
    if model == "tabular":
        ref = TabularAR.random(vocab_size, length, seed=seed, **kwargs)
    elif model == "neural":
        ref = NeuralAR.random(vocab_size, length, seed=seed, **kwargs)
    else:
        raise ModelError(f"unknown model {model!r}; choose 'tabular' or 'neural'")
    policy = ref.perturbed(kl_scale, seed=seed + 10_007)
    ref.requires_grad_(False)
    return policy, ref
