"""Batched generation and scoring of completions y ~ pi(.|x) for a causal LM, with per-sample random streams.

Every sample i draws its tokens from its own torch.Generator seeded by (seed, stream, i), so the set of samples is
the same whatever the micro-batching and however many processes share the work. Prompts are left-padded,
completions right-padded after the end-of-sequence token; ``mask`` (B, L) is 1 on the response tokens (the EOS
token included: it is sampled, so its log-probability is part of log pi(y)).

Scoring runs one teacher-forced forward pass on prompt + completion and keeps the logits of the L positions that
predict the completion: logits[:, t] gives pi(. | x, y_<t).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .models import LLMError

#: short math word problems written for biaslab (no dataset): answers take a few sentences, so an instruction-tuned
#: model ends them with its end-of-sequence token well inside a 64-token budget
DEFAULT_PROMPTS = (
    "Tom has 3 apples and buys 4 more. How many apples does he have? Answer in one sentence.",
    "A pencil costs 2 dollars. How much do 5 pencils cost? Answer briefly.",
    "Sara read 12 pages on Monday and 9 on Tuesday. How many pages did she read? Answer briefly.",
    "A box holds 6 eggs. How many eggs are in 4 boxes? Answer in one sentence.",
    "There are 20 birds on a tree and 7 fly away. How many are left? Answer briefly.",
    "A train travels 60 km in one hour. How far does it go in 3 hours? Answer briefly.",
    "Ben has 15 marbles and gives 6 to Amy. How many does Ben keep? Answer in one sentence.",
    "A class has 4 rows of 8 desks. How many desks are there? Answer briefly.",
    "What is half of 18? Answer in one sentence.",
    "A shirt costs 25 dollars and is 5 dollars off. What is the new price? Answer briefly.",
    "Lily saves 3 dollars a week. How much has she saved after 6 weeks? Answer briefly.",
    "A cake is cut into 8 slices and 3 are eaten. How many slices remain? Answer in one sentence.",
)


@dataclass
class Generation:
    """prompt (B, P) left-padded ids, prompt_mask (B, P), completion (B, L) ids, mask (B, L) float (response)."""

    prompt: Tensor
    prompt_mask: Tensor
    completion: Tensor
    mask: Tensor

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())


def stream_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (splitmix64 steps), e.g. (seed, stream, sample index)."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x >> 1


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on the device when ``dtype == 'bfloat16'`` (the decoder trunk only: the head, log_softmax and
    every KL run in float32 outside it, see ``head_logits``); a no-op for float32/float64."""
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if dtype not in ("float32", "float64"):
        raise LLMError(f"unknown --dtype {dtype!r}; choose float32 or bfloat16")
    return contextlib.nullcontext()


def encode_prompts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt, through the chat template when the tokenizer has one."""
    out = []
    for text in texts:
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            ids = tokenizer(text)["input_ids"]
        out.append([int(i) for i in ids])
    return out


def read_prompts(path: str) -> list[str]:
    """Prompts from a file: ``.jsonl`` (one JSON object a line with a ``prompt`` (or ``question``) string, or a
    bare JSON string), otherwise one prompt per non-empty line."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f]
    except FileNotFoundError:
        raise LLMError(f"--prompts {path}: no such file") from None
    if path.endswith(".jsonl"):
        prompts = []
        for i, ln in enumerate(lines, 1):
            if not ln:
                continue
            try:
                obj = json.loads(ln)
            except json.JSONDecodeError as exc:
                raise LLMError(f"--prompts {path}, line {i}: not JSON ({exc.msg})") from None
            text = obj if isinstance(obj, str) else (obj.get("prompt", obj.get("question")) if isinstance(obj, dict)
                                                    else None)
            if not isinstance(text, str) or not text.strip():
                raise LLMError(f"--prompts {path}, line {i}: expected {{\"prompt\": \"...\"}} or a JSON string")
            prompts.append(text.strip())
        lines = prompts
    prompts = [ln for ln in lines if ln]
    if not prompts:
        raise LLMError(f"--prompts {path}: the file holds no prompt (one per line)")
    return prompts


def random_prompts(n: int, length: int, vocab_size: int, seed: int, avoid: Sequence[int] = ()) -> list[list[int]]:
    """n prompts of ``length`` random token ids (for the tiny random models, which have no tokenizer)."""
    g = torch.Generator().manual_seed(stream_seed(seed, 31337))
    allowed = torch.tensor([v for v in range(vocab_size) if v not in set(avoid)])
    return [allowed[torch.randint(len(allowed), (length,), generator=g)].tolist() for _ in range(n)]


def _left_pad(prompts: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(p) for p in prompts)
    if width == 0:
        raise LLMError("a prompt is empty; every prompt needs at least one token")
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    att = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        att[i, width - len(p) :] = 1
    return ids.to(device), att.to(device)


def _wide_dtype(weight: Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def head_logits(model: nn.Module, hidden: Tensor) -> Tensor:
    """(..., V) logits from the trunk's final hidden states, in float32 (float64 with float64 weights) with autocast
    off: the lm_head, and everything computed from its logits, never sees bf16 (module hooks on it still fire)."""
    head = model.get_output_embeddings()
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return head(hidden.to(_wide_dtype(head.weight)))


def _cache_argument(model: nn.Module) -> str:
    """The KV-cache keyword of this transformers version: ``cache`` (>= 5.2x) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _positions(attention: Tensor) -> Tensor:
    return (attention.cumsum(-1) - 1).clamp_min(0)  # (B, S)


_MASK64 = (1 << 64) - 1


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_MIX1, _MIX2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def uniforms(seeds: Tensor, step: int) -> Tensor:
    """(B,) float64 uniforms in [0, 1): a splitmix64 hash of (per-sample seed, step), computed on the seeds' device.

    A counter-based stream: sample i's token t depends on (seed_i, t) alone, so samples are the same whatever the
    batch they share and however many processes split the work, and no state moves between device and host."""
    x = seeds ^ _signed((0x9E3779B97F4A7C15 * (step + 1)) & _MASK64)  # tensor int64 arithmetic wraps mod 2**64
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    x = x ^ _shr(x, 31)
    return _shr(x, 11).to(torch.float64) * 2.0**-53  # top 53 bits


def sample_tokens(probs: Tensor, u: Tensor) -> Tensor:
    """(B,) tokens by the inverse CDF: the first v with cumsum(probs)_v > u * sum(probs) (float64 cumsum)."""
    cdf = probs.to(torch.float64).cumsum(-1)  # (B, V)
    target = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)  # (B, 1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)  # (B,)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    sample_seeds: Sequence[tuple[int, ...]],
    eos: int | None,
    pad: int,
    dtype: str = "float32",
) -> Generation:
    """Sample one completion per prompt at temperature 1 (exactly pi), with a KV cache, on the model's device.

    Row i's token t is the inverse-CDF draw at ``uniforms(stream_seed(*sample_seeds[i]), t)``; the probabilities
    come from float32 logits (``head_logits``). A row stops after sampling ``eos`` (which is part of the response,
    mask 1) or after ``max_new_tokens`` tokens; later positions hold ``pad`` with mask 0."""
    if max_new_tokens < 1:
        raise LLMError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if len(sample_seeds) != len(prompts):
        raise ValueError("one seed tuple per prompt")
    device = next(model.parameters()).device
    ids, att = _left_pad(prompts, pad, device)  # (B, P)
    prompt_att = att
    seeds = torch.tensor([stream_seed(*s) for s in sample_seeds], dtype=torch.long, device=device)  # (B,)
    B = len(prompts)
    out = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
    mask = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    alive = torch.ones(B, dtype=torch.bool, device=device)
    pos = _positions(att)
    trunk = model.base_model
    step_ids, cache = ids, None
    cache_arg = _cache_argument(trunk)
    for t in range(max_new_tokens):
        with autocast(device, dtype):
            res = trunk(input_ids=step_ids, attention_mask=att, position_ids=pos, use_cache=True, **{cache_arg: cache})
        cache = res[cache_arg]
        probs = torch.softmax(head_logits(model, res.last_hidden_state[:, -1]), -1)  # (B, V) float32
        nxt = torch.where(alive, sample_tokens(probs, uniforms(seeds, t)), pad)  # (B,)
        out[:, t] = nxt
        mask[:, t] = alive.float()
        if eos is not None:
            alive = alive & (nxt != eos)
        if t + 1 == max_new_tokens or (eos is not None and not bool(alive.any())):
            break
        step_ids = nxt.unsqueeze(1)  # (B, 1)
        att = torch.cat([att, torch.ones((B, 1), dtype=att.dtype, device=device)], 1)
        pos = pos[:, -1:] + 1
    return Generation(ids, prompt_att, out, mask)


def score_hidden(model: nn.Module, gen: Generation, dtype: str = "float32") -> Tensor:
    """(B, L, d) final hidden states (after the trunk's last norm) at the positions that predict the completion, in
    the head's dtype (float32, float64 with float64 weights): one teacher-forced pass of the trunk (bf16 under
    ``dtype='bfloat16'``), differentiable through whatever parameters require grad. ``head_logits`` of them are the
    logits; a cotangent dz on the logits is dz @ W_head on them (``run.sample_grads`` uses that)."""
    L = gen.completion.shape[1]
    device = gen.prompt.device
    ids = torch.cat([gen.prompt, gen.completion], 1)  # (B, P + L)
    att = torch.cat([gen.prompt_mask, torch.ones_like(gen.completion)], 1)  # (B, P + L)
    with autocast(device, dtype):
        res = model.base_model(input_ids=ids, attention_mask=att, position_ids=_positions(att), use_cache=False)
    return res.last_hidden_state[:, -L - 1 : -1].to(_wide_dtype(model.get_output_embeddings().weight))


def score_logits(model: nn.Module, gen: Generation, dtype: str = "float32") -> Tensor:
    """(B, L, V) float32 (float64 with float64 weights) logits of pi(. | x, y_<t) at the completion positions: one
    teacher-forced pass of the trunk (bf16 under ``dtype='bfloat16'``) and the head in float32, differentiable
    through whatever parameters require grad."""
    return head_logits(model, score_hidden(model, gen, dtype))  # (B, L, V)


def trim(gen: Generation) -> Generation:
    """The same responses without the columns that are padding in every row (leading prompt padding, trailing
    completion padding): a causal model gives the same numbers on the remaining positions, with less work."""
    keep_p = gen.prompt_mask.bool().any(0)
    first = int(keep_p.nonzero()[0]) if bool(keep_p.any()) else 0
    filled = gen.mask.bool().any(0)
    last = int(filled.nonzero()[-1]) + 1 if bool(filled.any()) else 1
    return Generation(gen.prompt[:, first:], gen.prompt_mask[:, first:], gen.completion[:, :last], gen.mask[:, :last])


def rows(gen: Generation, index: Tensor) -> Generation:
    """The responses ``index`` of ``gen`` (a micro-batch of a generation batch), trimmed."""
    return trim(Generation(gen.prompt[index], gen.prompt_mask[index], gen.completion[index], gen.mask[index]))


__all__ = [
    "DEFAULT_PROMPTS", "Generation", "autocast", "encode_prompts", "generate", "head_logits", "random_prompts",
    "read_prompts", "rows", "score_hidden", "score_logits", "trim", "sample_tokens", "stream_seed", "uniforms",
]
