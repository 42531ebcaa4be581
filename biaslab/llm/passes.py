"""The sampling pass: draw the three independent response sets (main, directions, forward), score each micro-batch
under pi_ref and pi_theta, differentiate every configuration into per-sample (projected) gradient rows, measure the
numeric floor, and gather the rows of every process in sample order (``collect``)."""

from __future__ import annotations

import functools
import time

import torch
from torch import Tensor

from . import distributed as D
from .grads import logit_cotangent
from .options import (
    FLOOR_SAMPLES,
    FORWARD_TOKEN_KEY,
    REFERENCE_KEY,
    LLMOptions,
    Setup,
)
from .recipes import LLMRule, rule_coefficients, whiten_stats
from .sample import (
    Generation,
    head_logits,
    score_hidden,
    score_logits,
)
from .sample import rows as gen_rows
from .setup import build
from .tokens import (
    _forward_token_cotangent,
    _generate,
    _ref_logp_full,
    _reference_cotangent,
    _slices,
    _token_cotangent,
    masked_coefficients,
    masked_logp,
    sequence_kls,
    token_coefficients,
    token_stats,
    value_rows,
)

FORWARD_KEY = "forward_kl"

TOKENS_KEY = "tokens"

def _suffix(length: int | None) -> str:
    return "" if length is None else f"@{length}"

class _Scored:
    """One micro-batch scored under pi_ref and pi_theta: the recorded pass's root (hidden states before the head on
    the stacked path, else logits) and the per-token pieces every cotangent is built from."""

    def __init__(self, setup: Setup, gen: Generation, dtype: str, stacked: bool, need_ref: bool = True) -> None:
        model = setup.loaded.model
        self.setup = setup
        self.stacked = stacked and not setup.head_in_subset
        self.lr_full = _ref_logp_full(setup, gen, dtype) if need_ref else None  # (B, L, V)
        with setup.psg.recording():
            if self.stacked:
                self.root = score_hidden(model, gen, dtype)  # (B, L, d) with the graph to the parameters
                with torch.no_grad():
                    self.logits = head_logits(model, self.root.detach())  # (B, L, V), no graph
            else:
                self.root = self.logits = score_logits(model, gen, dtype)  # (B, L, V) with the graph
        if self.lr_full is not None:
            self.lr_full = self.lr_full.to(self.logits.dtype)
        self.tokens, self.mask = gen.completion, gen.mask.to(self.logits.dtype)  # (B, L)
        self.W = model.get_output_embeddings().weight.detach()  # (V, d)
        self.kl: Tensor | None = None  # (B, L) exact next-token KLs, set by the caller

    # hidden-space pieces: dz @ W for the logit cotangents dz of the module docstring, one (B, L, V) matmul each
    def _proj(self, f) -> Tensor:
        """(B, L, d) sum_v f(slice)_tv W_v over position slices, f giving (B, l, V)."""
        B, L, _ = self.logits.shape
        out = self.logits.new_empty(B, L, self.W.shape[1])
        W = self.W.to(self.logits.dtype)
        for s in _slices(L):
            out[:, s] = f(s) @ W
        return out

    @functools.cached_property
    def pbar(self) -> Tensor:
        return self._proj(lambda s: self.logits[:, s].softmax(-1))  # E_p[W_v] per position

    @functools.cached_property
    def score_dir(self) -> Tensor:
        """(B, L, d) W_{y_t} - E_p[W_v]: the hidden cotangent of log pi(y_t|y_<t) at each position."""
        return self.W.to(self.logits.dtype)[self.tokens] - self.pbar

    @functools.cached_property
    def path_dir(self) -> Tensor:
        """(B, L, d) sum_v p_v (log p_v - log q_v - KL_t) W_v: the hidden cotangent of KL_t (pathwise)."""

        def f(s):
            logp = self.logits[:, s].log_softmax(-1)
            return logp.exp() * (logp - self.lr_full[:, s] - self.kl[:, s].unsqueeze(-1))
        return self._proj(f)

    @functools.cached_property
    def fwd_dir(self) -> Tensor:
        """(B, L, d) E_p[W_v] - E_q[W_v]: the hidden cotangent of -sum_v q_v log p_v."""
        return self.pbar - self._proj(lambda s: self.lr_full[:, s].exp())

def sample_grads(setup: Setup, gen: Generation, dtype: str = "float32", keys: tuple[str, ...] | None = None,
                 truncations: tuple[int, ...] = (), stacked: bool = True) -> tuple[dict[str, Tensor], Tensor]:
    """Per-sample gradients on given responses y (scored, not sampled here): {"reference": g_ref, config key: g_c,
    "forward_kl_token": f_tok(y)} each (B, dim) float64 (``keys`` restricts them; a recipe key of ``setup.rules``
    gives (B / group, dim) rows, each group's gradient divided by the rule's nominal scale), and the (B, 8) value
    rows. ``truncations`` L' add the same keys suffixed ``@L'`` for the responses cut after L' tokens (exact samples
    of the policy capped at L' tokens: the KL sweep by truncation) and their value rows as ``values@L'``; key
    ``tokens`` adds (B, 3, max_new_tokens) rows of masked log pi, log pi_ref and the mask.

    ``stacked`` (default): the cotangent of every key on the logits, dz, is taken through the output head
    analytically (dz @ W_head: one (B, L, V) matmul shared by all token coefficients, W_{y_t} - E_p[W]) and all
    keys' per-sample gradients come from ONE batched backward pass from the hidden states
    (``PerSampleGrads.grads_stack``); otherwise one backward pass from the logits per distinct cotangent (the
    former path; equal numbers, tested). When a differentiated parameter belongs to the head the logits path is
    used."""
    want = keys if keys is not None else (REFERENCE_KEY, *setup.configs, FORWARD_TOKEN_KEY)
    sc = _Scored(setup, gen, dtype, stacked)
    logits, lr_full, tokens, mask = sc.logits, sc.lr_full, sc.tokens, sc.mask
    lp, lr, kl = token_stats(logits, lr_full, tokens, mask)
    sc.kl = kl
    B, L, _ = logits.shape
    specs: list[tuple[str, str, object, Tensor]] = []  # (out key, kind, payload, mask)
    extra: dict[str, Tensor] = {}
    alias: dict[str, str] = {}
    post: dict[str, tuple[LLMRule, int]] = {}
    values = value_rows(lp, lr, kl, mask)
    for cut in (None, *truncations):
        sfx = _suffix(cut)
        if cut is None:
            m, lp_c, kl_c = mask, lp, kl
        else:  # the response cut after ``cut`` tokens: the reference's log-probs (and KL 0) past it
            m = mask * (torch.arange(L, device=mask.device) < cut).to(mask.dtype)
            lp_c, kl_c = torch.where(m.bool(), lp, lr), kl * m
            extra[f"values{sfx}"] = value_rows(lp_c, lr, kl_c, m)
        done: list[tuple[Tensor, str]] = []
        for key in want:
            out_key = key + sfx
            if key == TOKENS_KEY:
                if cut is None:
                    pad = setup.max_new_tokens - L
                    t3 = torch.stack([lp * mask, lr * mask, mask], 1).to(torch.float64)  # (B, 3, L)
                    extra[TOKENS_KEY] = torch.nn.functional.pad(t3, (0, pad)) if pad > 0 else t3
                continue
            if key == REFERENCE_KEY:
                specs.append((out_key, "ref", kl_c, m))
            elif key == FORWARD_TOKEN_KEY:
                specs.append((out_key, "fwd", None, m))
            elif key in setup.rules:
                r = setup.rules[key]
                tok = rule_coefficients(r, lp_c, lr, m, setup.whiten.get((key, cut or setup.max_new_tokens)))
                specs.append((out_key, "tok", tok.to(mask.dtype), m))
                post[out_key] = (r, cut or setup.max_new_tokens)
            else:
                cfg = setup.configs[key]
                if cfg.needs_full_logits:  # the general (B, L, V) path
                    logp_m = masked_logp(logits.detach().log_softmax(-1), lr_full, m)
                    specs.append((out_key, "full", masked_coefficients(cfg, tokens, logp_m, lr_full, m), m))
                else:
                    tok = token_coefficients(cfg, tokens, lp_c, lr, m)  # (B, L)
                    same = next((k for t, k in done if torch.equal(t, tok)), None)
                    if same is not None:  # e.g. k1 in the loss at token and sequence level
                        alias[out_key] = same
                        continue
                    done.append((tok, out_key))
                    specs.append((out_key, "tok", tok, m))
    out = _grads_of_specs(sc, specs)
    for k, src in alias.items():
        out[k] = out[src]
    for k, (r, length) in post.items():  # sum each group's rows, divide by the nominal scale
        g = out[k]
        wstd = setup.whiten.get((r.key, length), (0.0, None))[1] if r.needs_whitening else None
        out[k] = g.reshape(B // r.group_size, r.group_size, -1).sum(1) / r.nominal(length, wstd)
    out = {k: out[k] for k in [s[0] for s in specs] + list(alias) if k in out}
    out.update(extra)
    return out, values

def _grads_of_specs(sc: _Scored, specs: list) -> dict[str, Tensor]:
    """Per-sample gradient rows of every cotangent spec: stacked (hidden-space cotangents, one batched backward)
    or one logits backward per spec."""
    psg = sc.setup.psg
    if not specs:
        return {}
    if sc.stacked:  # each hidden-space piece of _Scored is computed once, for the specs that need it
        cots = []
        for _, kind, payload, m in specs:
            if kind == "tok":
                cots.append(payload.unsqueeze(-1) * sc.score_dir)
            elif kind == "ref":
                rtg = payload.flip(-1).cumsum(-1).flip(-1) * m
                cots.append(rtg.unsqueeze(-1) * sc.score_dir + sc.path_dir * m.unsqueeze(-1))
            elif kind == "fwd":
                cots.append(sc.fwd_dir * m.unsqueeze(-1))
            else:  # full coefficients: the (B, L, V) cotangent, through the head
                dz = logit_cotangent(payload, sc.tokens, sc.logits, m)
                cots.append(dz @ sc.W.to(dz.dtype))
        rows = psg.grads_stack(sc.root, torch.stack(cots))
        return {s[0]: g for s, g in zip(specs, rows)}
    out = {}
    buf = torch.empty_like(sc.logits)  # (B, L, V) the one cotangent buffer
    for key, kind, payload, m in specs:
        if kind == "tok":
            dz = _token_cotangent(sc.logits, sc.tokens, payload, buf)
        elif kind == "ref":
            dz = _reference_cotangent(sc.logits, sc.lr_full, sc.tokens, payload, m, buf)
        elif kind == "fwd":
            dz = _forward_token_cotangent(sc.logits, sc.lr_full, m, buf)
        else:
            dz = logit_cotangent(payload, sc.tokens, sc.logits, m)
        out[key] = psg.grads(sc.root, dz)  # (B, dim)
    return out

def forward_grads(setup: Setup, gen: Generation, dtype: str = "float32", stacked: bool = True) -> Tensor:
    """(B, dim) -grad log pi(y) for given responses (drawn from pi_ref, they sample grad KL(pi_ref || pi))."""
    return forward_rows(setup, gen, dtype, (), stacked)[FORWARD_KEY]

def forward_rows(setup: Setup, gen: Generation, dtype: str = "float32", truncations: tuple[int, ...] = (),
                 stacked: bool = True) -> dict[str, Tensor]:
    """{"forward_kl": (B, dim) -grad log pi(y), and "forward_kl@L'" for the responses cut after L' tokens} for given
    responses (drawn from pi_ref, they sample grad KL(pi_ref || pi))."""
    sc = _Scored(setup, gen, dtype, stacked, need_ref=False)
    L = sc.logits.shape[1]
    specs = []
    for cut in (None, *truncations):
        m = sc.mask if cut is None else sc.mask * (torch.arange(L) < cut).to(sc.mask.dtype)
        specs.append((FORWARD_KEY + _suffix(cut), "tok", -m, m))
    return _grads_of_specs(sc, specs)

def numeric_floor(setup: Setup, gen: Generation, opts: LLMOptions) -> dict:
    """The sequence-KL error (nats) the chosen dtype causes on the responses ``gen``: against float32 for bfloat16,
    against float64 for float32 (the model is converted in place and back, exactly); 0 for float64."""
    if opts.dtype == "float64":
        return {"nats": 0.0, "mean_abs_nats": 0.0, "against": "float64", "samples": gen.completion.shape[0]}
    kl = sequence_kls(setup, gen, opts.dtype)
    models = [m for m in (setup.loaded.model, setup.ref_model) if m is not None]
    if opts.dtype == "bfloat16":
        against = "float32"
        hi = sequence_kls(setup, gen, "float32")
    else:
        against = "float64"
        for m in models:
            m.double()
        try:
            hi = sequence_kls(setup, gen, "float64")
        finally:
            for m in models:
                m.float()
    err = (kl - hi).abs()
    return {"nats": float(err.max()), "mean_abs_nats": float(err.mean()), "error_of_mean_nats":
            float((kl - hi).mean().abs()), "against": against, "samples": int(kl.shape[0])}

def _gather_rows(local: dict[int, dict[str, Tensor]]) -> dict[str, Tensor]:
    """{chunk: {key: (b, P)}} of every rank, concatenated per key in chunk (= sample) order."""
    every: dict[int, dict[str, Tensor]] = {}
    for part in D.gather({j: {k: v.cpu() for k, v in d.items()} for j, d in local.items()}):
        every.update(part)  # type: ignore[arg-type]
    keys = next(iter(every.values())).keys() if every else []
    return {k: torch.cat([every[j][k] for j in sorted(every)]) for k in keys}

def _micro_batches(gen: Generation, micro: int, group: int) -> list[Tensor]:
    """Index tensors of the micro-batches of a generation batch: whole groups, sorted by their longest response
    (similar lengths together: less padding to score and differentiate)."""
    n = gen.completion.shape[0]
    lengths = gen.mask.sum(1).reshape(-1, group).max(1).values  # (n / group,)
    order = torch.argsort(lengths.cpu(), stable=True)
    idx = (order.unsqueeze(1) * group + torch.arange(group)).reshape(-1).to(gen.completion.device)
    return [idx[a : a + micro] for a in range(0, n, micro)]

def _by_micro_batch(gen: Generation, micro: int, group: int, fn) -> dict[str, Tensor]:
    """``fn(sub_generation) -> {key: rows}`` on each micro-batch, rows put back in sample order (per-group rows of a
    recipe in group order)."""
    n = gen.completion.shape[0]
    parts: dict[str, list[tuple[Tensor, Tensor]]] = {}
    for idx in _micro_batches(gen, micro, group):
        for key, t in fn(gen_rows(gen, idx)).items():
            per = idx.shape[0] // t.shape[0]  # 1, or the group size of a recipe's rows
            parts.setdefault(key, []).append((idx.reshape(-1, per)[:, 0].cpu() // per, t))
    out = {}
    for key, ps in parts.items():
        count = sum(t.shape[0] for _, t in ps)
        full = ps[0][1].new_empty((count, *ps[0][1].shape[1:]))
        for where, t in ps:
            full[where] = t
        out[key] = full
        assert count * (n // count) == n
    return out

def collect(opts: LLMOptions) -> tuple[dict[str, dict[str, Tensor]], Setup, dict]:
    """Run (this rank's share of) the three sample sets and gather every rank's rows in sample order:
    {"main": {...}, "directions": {...}, "forward": {...}}. Responses are generated in batches of
    ``opts.gen_batch`` (the unit shared among processes), then scored and differentiated in micro-batches of
    ``opts.micro_batch`` whole groups."""
    from tqdm.auto import tqdm

    opts.validate()
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = opts.allow_tf32
    rank, size, device = D.init_from_env(opts.device)
    torch.manual_seed(opts.seed)
    setup = build(opts, device)
    t0 = time.perf_counter()
    show = opts.progress and rank == 0
    gb, micro, group, cuts = opts.gen_batch, opts.micro_batch, setup.group, opts.truncations
    main_chunks = D.my_chunks(opts.samples, gb, rank, size)
    dir_chunks = D.my_chunks(opts.n_dir, gb, rank, size)
    total = sum(b - a for _, a, b in main_chunks) + 2 * sum(b - a for _, a, b in dir_chunks)
    local: dict[str, dict[int, dict[str, Tensor]]] = {"main": {}, "directions": {}, "forward": {}}
    floor_gen = None
    whitened = [r for r in setup.rules.values() if r.needs_whitening]
    dir_keys = (REFERENCE_KEY, FORWARD_TOKEN_KEY) + ((TOKENS_KEY,) if whitened else ())
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with tqdm(total=total, desc="llm: sample+score+grads", disable=not show) as bar:
        for j, a, b in dir_chunks:
            gen = _generate(setup, opts, a, b, 3)
            local["directions"][j] = _by_micro_batch(
                gen, micro, group, lambda g: sample_grads(setup, g, opts.dtype, dir_keys, cuts, opts.stacked)[0])
            bar.update(b - a)
            gen = _generate(setup, opts, a, b, 2, reference=True)
            local["forward"][j] = _by_micro_batch(
                gen, micro, group, lambda g: forward_rows(setup, g, opts.dtype, cuts, opts.stacked))
            bar.update(b - a)
        if whitened:  # population statistics of the whitened recipes' advantages, from the direction samples
            toks = _gather_rows({j: {TOKENS_KEY: d[TOKENS_KEY]} for j, d in local["directions"].items()})[TOKENS_KEY]
            for r in whitened:
                for cut in (setup.max_new_tokens, *cuts):
                    m = toks[:, 2] * (torch.arange(toks.shape[2]) < cut).to(toks.dtype)
                    setup.whiten[(r.key, cut)] = whiten_stats(r, toks[:, 0], toks[:, 1], m)

        def main_fn(g: Generation) -> dict[str, Tensor]:
            grads, values = sample_grads(setup, g, opts.dtype, (REFERENCE_KEY, *setup.configs, *setup.rules), cuts,
                                         opts.stacked)
            ended = (g.completion == setup.eos) & g.mask.bool() if setup.eos is not None else g.mask[:, :0]
            return {**grads, "values": values, "ended": ended.any(1).double().unsqueeze(1)}

        for j, a, b in main_chunks:
            gen = _generate(setup, opts, a, b, 1)
            if j == 0:
                floor_gen = gen
            local["main"][j] = _by_micro_batch(gen, micro, group, main_fn)
            bar.update(b - a)
    rows_ = {name: _gather_rows(part) for name, part in local.items()}
    timing = {"seconds_rank0": time.perf_counter() - t0, "world_size": size, "device": str(device),
              "threads": torch.get_num_threads(), "generation_batch": gb, "micro_batch": micro,
              "stacked_backward": opts.stacked and not setup.head_in_subset}
    if str(device).startswith("cuda"):
        timing["gpu"] = torch.cuda.get_device_name(torch.device(device))
        timing["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if rank == 0 and opts.numeric_floor and floor_gen is not None:
        timing["numeric_floor"] = numeric_floor(
            setup, gen_rows(floor_gen, torch.arange(min(FLOOR_SAMPLES, floor_gen.completion.shape[0]))), opts)
    return rows_, setup, timing
