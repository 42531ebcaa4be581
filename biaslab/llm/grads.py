"""Per-sample gradients of surrogate coefficients on a parameter subset of a causal LM, optionally sketched.

A configuration's surrogate S(y) depends on theta only through the next-token log-probabilities, so with the
coefficients a = dS/dlogp (``placements.surrogate_coefficients``: ``tok`` (B, L) on sampled tokens and ``full``
(B, L, V) on whole distributions) and logp = log_softmax(z), the cotangent on the logits z is

    dS/dz_tv = tok_t (1[v = y_t] - p_tv) + full_tv - p_tv sum_w full_tw          (p = softmax(z)).

One backward pass of the batch with that cotangent gives, at each adapted projection out = W x (+ s B A x), the
output gradient gout of every sample; samples never interact inside a decoder, so the per-sample gradients are
exact sums over positions:  dW_i = sum_t gout_it x_it^T,  dB_i = s sum_t gout_it u_it^T,  dA_i = s sum_t
(B^T gout_it) x_it^T  with u = A x. Parameters that are not weights/biases of Linear, Conv1D or LoRA modules fall
back to one backward pass per sample (``method='loop'``, also the benchmark's naive baseline).

When the subset has more than ``max_dense`` numbers, each per-sample gradient is projected on k orthonormal random
directions: coordinate j goes to bucket h(j) with a random sign s(j), u_b = sum_{h(j)=b} s(j) e_j / sqrt(n_b).
Linear statistics (means, biases, cosines up to the sketch's distortion) carry over to the projected space.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.placements import Coefficients
from .models import LLMError
from .policy import LoRALinear, is_linear, lora_modules

AUTO_LAST_BLOCKS = 4  # ``auto``: LoRA of every block up to 8 blocks, else of the last 4 (backward stops there)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The longest nn.ModuleList of the model: its transformer blocks."""
    best = None
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and (best is None or len(m) > len(best)):
            best = m
    if best is None:
        raise LLMError("cannot find the transformer blocks (no nn.ModuleList in the model)")
    return best


@dataclass
class ParamSubset:
    """The differentiated parameters theta, in a fixed order, and how their per-sample gradients are obtained."""

    names: list[str]
    params: list[Tensor]
    owners: dict[str, nn.Module]  # module qualified name -> module owning some of the params (hooks method)
    method: str  # "hooks" | "loop"
    spec: str = ""  # the resolved --params spec (``auto`` resolved)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def select_params(model: nn.Module, spec: str) -> ParamSubset:
    """``lora``: every adapter's A and B; ``lora-last:K``: those of the last K transformer blocks (the backward
    pass of the per-sample gradients then stops K blocks deep); ``auto``: ``lora`` up to 8 blocks, else
    ``lora-last:4``; ``last-layer``: weights and biases of the Linear layers of the last
    transformer block; otherwise comma-separated fnmatch patterns matched against ``named_parameters`` names."""
    named = dict(model.named_parameters())
    if spec == "auto":
        spec = "lora" if len(decoder_blocks(model)) <= 2 * AUTO_LAST_BLOCKS else f"lora-last:{AUTO_LAST_BLOCKS}"
    if spec == "lora" or spec.startswith("lora-last:"):
        mods = lora_modules(model)
        if not mods:
            raise LLMError(f"--params {spec}: the model has no LoRA adapter")
        if spec.startswith("lora-last:"):
            try:
                k = int(spec.split(":", 1)[1])
            except ValueError:
                raise LLMError(f"--params {spec!r}: expected lora-last:K with an integer K") from None
            blocks = decoder_blocks(model)
            keep = {id(m) for b in list(blocks)[-k:] for m in b.modules()}
            mods = {n: m for n, m in mods.items() if id(m) in keep}
        names = [f"{n}.{p}" for n in mods for p in ("lora_A", "lora_B")]
    elif spec == "last-layer":
        block = decoder_blocks(model)[-1]
        prefix = next(n for n, m in model.named_modules() if m is block)
        names = [
            f"{prefix}.{mn}.{pn}"
            for mn, m in block.named_modules()
            if is_linear(m)
            for pn, _ in m.named_parameters(recurse=False)
        ]
    else:
        patterns = [s.strip() for s in spec.split(",") if s.strip()]
        names = [n for n in named if any(fnmatch.fnmatch(n, pat) for pat in patterns)]
        missing = [pat for pat in patterns if not any(fnmatch.fnmatch(n, pat) for n in named)]
        if missing:
            sample = ", ".join(list(named)[:8])
            raise LLMError(
                f"--params: no parameter matches {missing}; use lora, last-layer or names such as: {sample}, ..."
            )
    if not names:
        raise LLMError(f"--params {spec!r} selects no parameter")
    params = [named[n] for n in names]
    if len({id(p) for p in params}) != len(params):
        raise LLMError(f"--params {spec!r} selects a tied parameter twice")
    owners: dict[str, nn.Module] = {}
    method = "hooks"
    mod_by_name = dict(model.named_modules())
    for n in names:
        mod_name, pname = n.rsplit(".", 1)
        mod = mod_by_name[mod_name]
        ok = (isinstance(mod, LoRALinear) and pname in ("lora_A", "lora_B")) or (
            is_linear(mod) and pname in ("weight", "bias")
        )
        if not ok:
            method = "loop"
        owners[mod_name] = mod
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    if any(id(p) in tied for p in params):
        method = "loop"  # a tied embedding/lm_head weight is used twice: only the generic path sums both uses
    return ParamSubset(names, params, owners if method == "hooks" else {}, method, spec)


# ---------------------------------------------------------------------------------------------- the sketch


class Sketch:
    """Orthonormal projection on k random sparse sign directions (seeded), applied per parameter tensor."""

    def __init__(self, shapes: list[torch.Size], k: int, seed: int, device: torch.device) -> None:
        g = torch.Generator().manual_seed(seed)
        self.k = int(k)
        self.index: list[Tensor] = []
        signs: list[Tensor] = []
        for shape in shapes:
            n = int(torch.Size(shape).numel())
            self.index.append(torch.randint(self.k, (n,), generator=g))
            signs.append(torch.randint(2, (n,), generator=g).to(torch.float64) * 2 - 1)
        counts = torch.bincount(torch.cat(self.index), minlength=self.k).clamp_min(1).to(torch.float64)
        self.weight = [(s / counts[i].sqrt()).to(device) for s, i in zip(signs, self.index)]
        self.index = [i.to(device) for i in self.index]

    def project_one(self, out: Tensor, j: int, g: Tensor) -> None:
        """out (B, k) += the projection of parameter j's per-sample gradients g (B, *shape_j)."""
        out.index_add_(1, self.index[j], g.reshape(g.shape[0], -1).to(torch.float64) * self.weight[j])

    def project(self, per_param: list[Tensor]) -> Tensor:
        """(B, k) projections from per-parameter per-sample gradients [(B, *shape_j)]."""
        out = torch.zeros((per_param[0].shape[0], self.k), dtype=torch.float64, device=per_param[0].device)
        for j, g in enumerate(per_param):
            self.project_one(out, j, g)
        return out


# ---------------------------------------------------------------------------------------------- cotangents


def logit_cotangent(coef: Coefficients, tokens: Tensor, logits: Tensor, mask: Tensor) -> Tensor:
    """(B, L, V) dS/dz from the coefficients dS/dlogp (see module docstring); masked positions get 0."""
    p = torch.softmax(logits.detach(), -1)  # (B, L, V)
    tok = coef.tok.to(p.dtype) * mask  # (B, L)
    dz = torch.zeros_like(p)
    dz.scatter_(-1, tokens.unsqueeze(-1), tok.unsqueeze(-1))  # tok_t 1[v = y_t]
    total = tok  # (B, L)
    if coef.full is not None:
        full = coef.full.to(p.dtype) * mask.unsqueeze(-1)  # (B, L, V)
        dz = dz + full
        total = total + full.sum(-1)
    return dz - p * total.unsqueeze(-1)  # (B, L, V)


# ---------------------------------------------------------------------------------------------- per-sample grads


class PerSampleGrads:
    """Records the owners' inputs/outputs during a forward pass, then turns cotangents into (B, P or k) grads.

    Usage: ``with psg.recording(): logits = score_logits(...)`` then ``psg.grads(logits, dz)`` per configuration.
    """

    def __init__(self, model: nn.Module, subset: ParamSubset, sketch: Sketch | None = None) -> None:
        self.model = model
        self.subset = subset
        self.sketch = sketch
        self._saved: dict[str, tuple[Tensor, Tensor]] = {}

    @property
    def dim(self) -> int:
        return self.sketch.k if self.sketch is not None else self.subset.numel

    @contextlib.contextmanager
    def recording(self) -> Iterator[PerSampleGrads]:
        """Within the block, the owners' forward hooks save their inputs and outputs (the parameters require grad)."""
        self._saved = {}
        for p in self.subset.params:
            p.requires_grad_(True)
        handles = [mod.register_forward_hook(self._hook(name)) for name, mod in self.subset.owners.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _hook(self, name: str):
        def fn(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if name in self._saved:
                raise LLMError(f"module {name} ran twice in one forward pass; per-sample hooks need one call")
            self._saved[name] = (inputs[0].detach(), output)

        return fn

    def grads(self, logits: Tensor, dz: Tensor) -> Tensor:
        """(B, dim) float64 per-sample gradients sum_{t,v} dz_tv grad z_tv of every sample of the batch. ``logits``
        may be any (B, ...) output of the recorded pass (e.g. the hidden states before the head, with the cotangent
        dz @ W_head)."""
        return self.grads_stack(logits, dz.unsqueeze(0))[0]

    def grads_stack(self, root: Tensor, cots: Tensor, chunk: int = 8) -> list[Tensor]:
        """[(B, dim)] * K per-sample gradients of K cotangents ``cots`` (K, *root.shape) on the recorded pass's output
        ``root``: ONE backward pass per ``chunk`` cotangents (``torch.autograd.grad(..., is_grads_batched=True)``
        vmaps the backward over them), then the per-module sums over positions for each cotangent."""
        if self.subset.method == "loop":
            return [self.loop_grads(root, c) for c in cots]
        names = list(self._saved)
        outs = [self._saved[n][1] for n in names]
        result: list[Tensor] = []
        for a in range(0, cots.shape[0], chunk):
            part = cots[a : a + chunk].to(root.dtype)
            if part.shape[0] == 1:
                g1 = torch.autograd.grad(root, outs, grad_outputs=part[0], retain_graph=True)
                stacked = [g.unsqueeze(0) for g in g1]
            else:
                stacked = list(torch.autograd.grad(root, outs, grad_outputs=part, retain_graph=True,
                                                   is_grads_batched=True))  # each (k, B, S, d_out)
            for k in range(part.shape[0]):
                result.append(self._from_gouts(root, names, {n: g[k] for n, g in zip(names, stacked)}))
        return result

    def _from_gouts(self, root: Tensor, names: list[str], gouts: dict[str, Tensor]) -> Tensor:
        if self.sketch is not None:  # stream: one module's dense per-sample gradients alive at a time
            out = torch.zeros((root.shape[0], self.sketch.k), dtype=torch.float64, device=root.device)
            index = {name: j for j, name in enumerate(self.subset.names)}
            for n in names:
                grads = self._module_grads(self.subset.owners[n], self._saved[n][0], gouts.pop(n))
                for pname, g in grads.items():
                    j = index.get(f"{n}.{pname}")
                    if j is not None:
                        self.sketch.project_one(out, j, g)
            return out
        per_mod = {n: self._module_grads(self.subset.owners[n], self._saved[n][0], gouts[n]) for n in names}
        per_param = [per_mod[n.rsplit(".", 1)[0]][n.rsplit(".", 1)[1]] for n in self.subset.names]
        return self._finish(per_param)

    @staticmethod
    def _module_grads(mod: nn.Module, x: Tensor, gout: Tensor) -> dict[str, Tensor]:
        x = x.to(torch.float32 if x.dtype != torch.float64 else x.dtype)  # (B, S, d_in)
        gout = gout.to(x.dtype)  # (B, S, d_out)
        out: dict[str, Tensor] = {}
        if isinstance(mod, LoRALinear):
            a, b = mod.lora_A.detach().to(x.dtype), mod.lora_B.detach().to(x.dtype)
            u = x @ a.T  # (B, S, r)
            out["lora_B"] = mod.scale * torch.einsum("bso,bsr->bor", gout, u)  # (B, d_out, r)
            out["lora_A"] = mod.scale * torch.einsum("bsr,bsi->bri", gout @ b, x)  # (B, r, d_in)
        elif isinstance(mod, nn.Linear):
            out["weight"] = torch.einsum("bso,bsi->boi", gout, x)  # (B, d_out, d_in)
            out["bias"] = gout.sum(1)  # (B, d_out)
        else:  # transformers Conv1D: out = x @ W + b, W (d_in, d_out)
            out["weight"] = torch.einsum("bsi,bso->bio", x, gout)  # (B, d_in, d_out)
            out["bias"] = gout.sum(1)  # (B, d_out)
        return out

    def loop_grads(self, logits: Tensor, dz: Tensor) -> Tensor:
        """The naive path: one backward pass per sample (B passes), same result as ``grads``."""
        rows = []
        for i in range(logits.shape[0]):
            gs = torch.autograd.grad(logits[i], self.subset.params, grad_outputs=dz[i].to(logits.dtype),
                                     retain_graph=True, allow_unused=True)
            rows.append([torch.zeros_like(p) if g is None else g for g, p in zip(gs, self.subset.params)])
        per_param = [torch.stack([r[j] for r in rows]) for j in range(len(self.subset.params))]
        return self._finish(per_param)

    def _finish(self, per_param: list[Tensor]) -> Tensor:
        if self.sketch is not None:
            return self.sketch.project(per_param)  # (B, k)
        B = per_param[0].shape[0]
        return torch.cat([g.reshape(B, -1).to(torch.float64) for g in per_param], 1)  # (B, P)


def make_sketch(subset: ParamSubset, max_dense: int, k: int, seed: int) -> Sketch | None:
    """A Sketch when the subset has more than ``max_dense`` numbers, else None (dense gradients)."""
    if subset.numel <= max_dense:
        return None
    if k < 2:
        raise LLMError(f"--projections must be >= 2, got {k}")
    return Sketch([p.shape for p in subset.params], k, seed, subset.params[0].device)


__all__ = [
    "ParamSubset", "PerSampleGrads", "Sketch", "decoder_blocks", "logit_cotangent", "make_sketch", "select_params",
]
