"""The controlled policy perturbation: pi_theta = pi_ref + a LoRA adapter, written in plain torch.

Each adapted projection computes ``out = base(x) + s * (x A^T) B^T`` with A (r, d_in), B (d_out, r) and the
scale s = alpha / r. With the adapter disabled the same module is the frozen reference pi_ref, so one copy of the
weights serves both models. The adapter is either

* ``perturb``: A ~ N(0, 1/d_in), B ~ N(0, sigma^2) from a seeded generator (a random low-rank step), or
* ``train``: the perturbation above followed by a few REINFORCE steps on a simple reward (the fraction of
  response tokens whose id lies in a seeded half of the vocabulary), like an early RL checkpoint.

The resulting sequence-level reverse KL(pi_theta || pi_ref) is measured from samples (``run.py``) and reported.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .models import LLMError

#: projection names adapted by default, per architecture (the attention projections, as in most LoRA recipes)
DEFAULT_TARGETS = ("q_proj", "v_proj", "c_attn")


def is_linear(m: nn.Module) -> bool:
    """An nn.Linear or a transformers Conv1D (out = x @ W + b, weight stored transposed: (d_in, d_out))."""
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def _linear_dims(base: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear or a transformers Conv1D."""
    if not is_linear(base):
        raise LLMError(f"LoRA adapts nn.Linear or Conv1D modules, not {type(base).__name__}")
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    return int(base.weight.shape[0]), int(base.weight.shape[1])


class LoRALinear(nn.Module):
    """``base(x) + s * (x A^T) B^T``; ``enabled=False`` gives back the base module exactly (the reference)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float) -> None:
        super().__init__()
        d_in, d_out = _linear_dims(base)
        self.base = base
        self.rank = int(rank)
        self.scale = float(alpha) / self.rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.zeros(self.rank, d_in, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(d_out, self.rank, device=w.device, dtype=w.dtype))
        self.enabled = True

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)  # (..., d_out), in the autocast dtype when one is active
        if not self.enabled:
            return out
        # the low-rank delta in float32 (float64 with float64 weights) whatever autocast is active: a bf16 delta of
        # a small perturbation would round away most of pi_theta - pi_ref
        wide = torch.float64 if x.dtype == torch.float64 or self.lora_A.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=x.device.type, enabled=False):
            u = x.to(wide) @ self.lora_A.T.to(wide)  # (..., r)
            return out.to(wide) + self.scale * (u @ self.lora_B.T.to(wide))  # (..., d_out)


def attach_lora(
    model: nn.Module, targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS, rank: int = 4, alpha: float = 4.0
) -> dict[str, LoRALinear]:
    """Wrap every Linear/Conv1D whose attribute name matches one of ``targets`` (fnmatch patterns) in a LoRALinear
    with A = B = 0 (so pi_theta = pi_ref until the adapter is set); returns {qualified name: module}."""
    if rank < 1:
        raise LLMError(f"LoRA rank must be >= 1, got {rank}")
    found: dict[str, LoRALinear] = {}
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not is_linear(child) or not any(fnmatch.fnmatch(child_name, t) for t in targets):
                continue
            lora = LoRALinear(child, rank, alpha)
            setattr(parent, child_name, lora)
            found[f"{parent_name}.{child_name}" if parent_name else child_name] = lora
    if not found:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise LLMError(f"no Linear module matches LoRA targets {list(targets)}; linear modules here: {names}")
    return found


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def reference_mode(model: nn.Module) -> Iterator[None]:
    """Within the block the model is pi_ref: every LoRA adapter is switched off."""
    mods = list(lora_modules(model).values())
    previous = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield
    finally:
        for m, e in zip(mods, previous):
            m.enabled = e


@torch.no_grad()
def perturb_lora(model: nn.Module, sigma: float, seed: int) -> None:
    """Set A ~ N(0, 1/d_in) and B ~ N(0, sigma^2) in every adapter, from one seeded generator (module order)."""
    if not sigma >= 0:
        raise LLMError(f"perturbation scale must be >= 0, got {sigma}")
    g = torch.Generator().manual_seed(seed)
    for m in lora_modules(model).values():
        a = torch.randn(m.lora_A.shape, generator=g, dtype=torch.float64) / m.lora_A.shape[1] ** 0.5
        b = torch.randn(m.lora_B.shape, generator=g, dtype=torch.float64) * sigma
        m.lora_A.copy_(a)
        m.lora_B.copy_(b)


@torch.no_grad()
def scale_lora(model: nn.Module, factor: float) -> None:
    """Multiply every adapter's B by ``factor`` (the delta s B A x scales linearly; the KL roughly quadratically)."""
    for m in lora_modules(model).values():
        m.lora_B.mul_(factor)


@torch.no_grad()
def broadcast_lora(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s adapters to every rank (after ``train_lora``, so all ranks sample the same pi_theta)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for m in lora_modules(model).values():
        for p in (m.lora_A, m.lora_B):
            dist.broadcast(p.data, src=src)


def reward_tokens(vocab_size: int, seed: int) -> Tensor:
    """(V,) bool: the seeded half of the vocabulary the ``train`` reward likes."""
    g = torch.Generator().manual_seed(seed + 7919)
    return torch.randperm(vocab_size, generator=g) < vocab_size // 2


def train_lora(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    steps: int,
    lr: float,
    batch: int,
    max_new_tokens: int,
    seed: int,
    eos: int | None,
    pad: int,
    vocab_size: int,
) -> list[float]:
    """A few REINFORCE steps (Adam on the adapters) toward the reward R(y) = fraction of response tokens in
    ``reward_tokens``; the batch-mean reward is the baseline. Returns the mean reward before each step."""
    from .sample import generate, score_logits

    liked = reward_tokens(vocab_size, seed)
    params = [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    history: list[float] = []
    device = params[0].device
    for step in range(steps):
        idx = list(range(step * batch, (step + 1) * batch))
        chunk = [prompts[i % len(prompts)] for i in idx]
        gen = generate(model, chunk, max_new_tokens, sample_seeds=[(seed, 104729, i) for i in idx], eos=eos, pad=pad)
        mask = gen.mask.to(device)
        reward = (liked.to(device)[gen.completion] & mask.bool()).sum(1) / mask.sum(1).clamp_min(1)  # (B,)
        logits = score_logits(model, gen)  # (B, L, V) float32
        logp = torch.log_softmax(logits, -1).gather(-1, gen.completion.unsqueeze(-1)).squeeze(-1)  # (B, L)
        seq_logp = (logp * mask).sum(1)  # (B,)
        loss = -((reward - reward.mean()).detach() * seq_logp).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(reward.mean()))
    for p in params:
        p.requires_grad_(False)
    return history


__all__ = [
    "DEFAULT_TARGETS", "LoRALinear", "attach_lora", "broadcast_lora", "is_linear", "lora_modules", "perturb_lora",
    "reference_mode", "reward_tokens", "scale_lora", "train_lora",
]
