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

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me one tip for learning to code.",
    "Why is the sky blue?",
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
    """bf16 autocast on the device when ``dtype == 'bfloat16'``; a no-op for float32/float64."""
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
    """Non-empty lines of a text file, one prompt per line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f]
    except FileNotFoundError:
        raise FileNotFoundError(f"--prompts {path}: no such file") from None
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


def _wide(x: Tensor) -> Tensor:
    """float32 for half/bf16 logits; float32/float64 ones pass unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _cache_argument(model: nn.Module) -> str:
    """The KV-cache keyword of this transformers version: ``cache`` (>= 5.2x) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _positions(attention: Tensor) -> Tensor:
    return (attention.cumsum(-1) - 1).clamp_min(0)  # (B, S)


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
    """Sample one completion per prompt at temperature 1 (exactly pi), with a KV cache; row i uses the generator
    seeded by ``stream_seed(*sample_seeds[i])``. Stops at ``eos`` or after ``max_new_tokens`` tokens."""
    if max_new_tokens < 1:
        raise LLMError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if len(sample_seeds) != len(prompts):
        raise ValueError("one seed tuple per prompt")
    device = next(model.parameters()).device
    ids, att = _left_pad(prompts, pad, device)  # (B, P)
    gens = [torch.Generator().manual_seed(stream_seed(*s)) for s in sample_seeds]
    B = len(prompts)
    out = torch.full((B, max_new_tokens), pad, dtype=torch.long)
    mask = torch.zeros((B, max_new_tokens), dtype=torch.float32)
    alive = torch.ones(B, dtype=torch.bool)
    pos = _positions(att)
    step_ids, cache = ids, None
    cache_arg = _cache_argument(model)
    for t in range(max_new_tokens):
        with autocast(device, dtype):
            res = model(input_ids=step_ids, attention_mask=att, position_ids=pos, use_cache=True, **{cache_arg: cache})
        cache = res[cache_arg]
        probs = torch.softmax(_wide(res.logits[:, -1]), -1).cpu()  # (B, V)
        nxt = torch.stack([torch.multinomial(probs[i], 1, generator=gens[i])[0] for i in range(B)])  # (B,)
        nxt = torch.where(alive, nxt, torch.full_like(nxt, pad))
        out[:, t] = nxt
        mask[:, t] = alive.float()
        if eos is not None:
            alive = alive & (nxt != eos)
        if not alive.any():
            break
        step_ids = nxt.to(device).unsqueeze(1)  # (B, 1)
        att = torch.cat([att, torch.ones((B, 1), dtype=att.dtype, device=device)], 1)
        pos = pos[:, -1:] + 1
    ids_prompt, att_prompt = _left_pad(prompts, pad, device)
    return Generation(ids_prompt, att_prompt, out.to(device), mask.to(device))


def score_logits(model: nn.Module, gen: Generation, dtype: str = "float32") -> Tensor:
    """(B, L, V) float32 (or float64) logits of pi(. | x, y_<t) at the completion positions: one teacher-forced
    forward pass (differentiable through whatever parameters require grad)."""
    device = gen.prompt.device
    L = gen.completion.shape[1]
    ids = torch.cat([gen.prompt, gen.completion], 1)  # (B, P + L)
    att = torch.cat([gen.prompt_mask, torch.ones_like(gen.completion)], 1)  # (B, P + L)
    with autocast(device, dtype):
        res = model(input_ids=ids, attention_mask=att, position_ids=_positions(att), use_cache=False,
                    logits_to_keep=L + 1)
    return _wide(res.logits[:, :L])  # (B, L, V)


__all__ = [
    "DEFAULT_PROMPTS",
    "Generation",
    "autocast",
    "encode_prompts",
    "generate",
    "random_prompts",
    "read_prompts",
    "score_logits",
    "stream_seed",
]
