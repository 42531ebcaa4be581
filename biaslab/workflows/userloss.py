"""Audit any trainer's own loss function: ``biaslab audit --loss FILE:FUNC`` and ``biaslab.audit_loss(fn)``.

Contract. ``FUNC(batch) -> scalar loss`` for ONE group of B responses to one prompt; the trainer steps along
-grad. ``batch`` has attributes (and keys: ``batch["logp"]``):

    logp      (B, T) differentiable log pi_theta(y_t | y_<t)
    old_logp  (B, T) behaviour policy's log-probs (detached; equal to logp in value on-policy)
    ref_logp  (B, T) reference policy's log-probs (detached)
    mask      (B, T) 1.0 on response tokens (up to and including the end token), 0.0 after the end
    rewards   (B,)   task rewards (0 with ``rewards="zero"``)

Log-probs are 0 after the end. ``UserLoss`` wraps the function as an update rule of the exact engine
(``biaslab.engines.exact.ExactEngine``): it is evaluated on every enumerated group at once with ``torch.func.vmap``
when the function allows it (checked against a plain loop on the first groups), else in a loop. The expected
gradient of the loss is compared with ``nominal * grad KL(pi || pi_ref)`` where nominal = beta * B * (the weight
the declared aggregation ``agg`` gives one token of a full-length group): ``agg="seq-mean-token-sum"`` (the
default) is a mean over the B responses of per-response sums; a token mean over the group is ``token-mean``.

With ``rewards="binary"`` each enumerated response gets a seeded 0/1 task reward and ``biaslab.audit_loss`` judges
the whole update against grad(E[R] - beta KL): E[g] must equal nominal * (grad KL - grad E[R] / beta)
(``biaslab.workflows.audit.evaluate_whole_update``). ``UserLoss.without_kl()`` (the same function with the
behaviour policy as its own reference, ``ref_logp := old_logp``: every per-token KL value is 0 and its gradient
has expectation 0 on-policy) is what an engine subtracts when it judges the KL part of an update alone.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor

from ..core.aggregation import check_mode, nominal_token_weight

FIELDS = ("logp", "old_logp", "ref_logp", "mask", "rewards")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UserLossError(ValueError):
    """The user's loss function cannot be loaded, raised, or returned something that is not a usable loss."""


class LossBatch(Mapping):
    """One group's tensors, by attribute (``batch.logp``) or key (``batch["logp"]``); see module docstring."""

    __slots__ = FIELDS

    def __init__(self, logp: Tensor, old_logp: Tensor, ref_logp: Tensor, mask: Tensor, rewards: Tensor) -> None:
        self.logp, self.old_logp, self.ref_logp, self.mask, self.rewards = logp, old_logp, ref_logp, mask, rewards

    def __getitem__(self, key: str) -> Tensor:
        if key not in FIELDS:
            raise KeyError(f"{key!r}; the batch has: {', '.join(FIELDS)}")
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(FIELDS)

    def __len__(self) -> int:
        return len(FIELDS)


def load_loss(spec: str) -> Callable:
    """The function ``FUNC`` of ``FILE:FUNC`` (a Python file path, or a module importable from the current folder),
    loaded by the same loader as ``biaslab check`` (``biaslab.workflows.check.load_function``)."""
    from ..core.estimators import EstimatorError
    from .check import load_function

    try:
        return load_function(spec)
    except EstimatorError as exc:
        raise UserLossError(f"--loss {spec}: {exc}") from exc


class UserLoss:
    """A loss function ``fn(batch) -> scalar`` as an update rule of the exact engine (see module docstring).

    Args:
        fn: the loss function of one group.
        beta: the KL coefficient inside the function (sets the nominal scale).
        agg: how the function aggregates tokens (``biaslab.core.aggregation`` mode; sets the nominal scale only).
        horizon: H of ``seq-mean-token-sum-norm`` / ``constant`` (default: the toy's T).
        name: shown in reports.
        vectorize: "auto" (vmap, checked against a loop, falling back to the loop), "vmap" or "loop".
        compute_dtype: the precision the function computes in (sets the verdict's tolerance); None: float64,
            or float32 when the first gradient holds only float32-representable values.
    """

    whiten = False
    has_reward_kl = True  # unknown where the function puts its KL: both flags keep the engine's KL paths on
    has_loss_kl = True

    def __init__(
        self,
        fn: Callable,
        beta: float = 1.0,
        agg: str = "seq-mean-token-sum",
        horizon: int | None = None,
        name: str | None = None,
        vectorize: str = "auto",
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        if not callable(fn):
            raise UserLossError(f"the loss must be callable, got {type(fn).__name__}")
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
            raise UserLossError(f"beta (the KL coefficient inside the function) must be a positive number, got {beta}")
        if vectorize not in ("auto", "vmap", "loop"):
            raise UserLossError(f"vectorize must be auto, vmap or loop, got {vectorize!r}")
        check_mode(agg)
        self.fn, self.beta, self.agg, self.horizon = fn, float(beta), agg, horizon
        self.name = name or getattr(fn, "__qualname__", repr(fn))
        self.mode: str | None = None if vectorize == "auto" else vectorize
        self.mode_note = "" if vectorize == "auto" else f"{vectorize} (requested)"
        self.self_reference = False  # True in ``without_kl``: ref_logp := old_logp
        self.compute_dtype: torch.dtype | None = compute_dtype  # the precision the verdict's tolerance assumes

    # ---------------------------------------------------------------- the rule interface

    def without_kl(self) -> UserLoss:
        """The same function with the behaviour policy as its own reference (KL values 0; module docstring)."""
        other = copy.copy(self)  # the same settings, vectorization mode and compute dtype
        other.self_reference = True
        return other

    def nominal_scale(self, batch_size: int, length: int, whiten_std: float | None = None) -> float:
        return self.beta * batch_size * nominal_token_weight(self.agg, batch_size, length, self.horizon)

    def describe(self) -> str:
        return f"user loss {self.name} (beta {self.beta:g}, aggregation {self.agg})"

    label = property(describe)

    # ---------------------------------------------------------------- evaluation

    def _one(self, lp: Tensor, lo: Tensor, lr: Tensor, m: Tensor, r: Tensor) -> Tensor:
        batch = LossBatch(lp, lo, lo if self.self_reference else lr, m, r)
        try:
            out = self.fn(batch)
        except Exception as exc:
            raise UserLossError(f"the loss function {self.name} raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(out, Tensor):
            raise UserLossError(f"the loss function {self.name} returned {type(out).__name__}, expected a tensor")
        if out.numel() != 1:
            raise UserLossError(
                f"the loss function {self.name} returned shape {tuple(out.shape)}; it must return a scalar loss "
                "for one group (aggregate over responses and tokens inside the function)"
            )
        return out.reshape(())

    def _loop(self, lp: Tensor, lo: Tensor, lr: Tensor, m: Tensor, r: Tensor) -> Tensor:
        return torch.stack([self._one(lp[e], lo[e], lr[e], m[e], r[e]) for e in range(lp.shape[0])])  # (E,)

    def _vmap(self, lp: Tensor, lo: Tensor, lr: Tensor, m: Tensor, r: Tensor) -> Tensor:
        return torch.func.vmap(self._one)(lp, lo, lr, m, r)  # (E,)

    def _validate(self, lp: Tensor, lo: Tensor, lr: Tensor, m: Tensor, r: Tensor) -> None:
        """Check one group on its own: a finite scalar that depends on batch.logp."""
        leaf = lp.detach().clone().requires_grad_(True)
        out = self._one(leaf, lo, lr, m, r)
        if not torch.isfinite(out.detach()).all():
            raise UserLossError(f"the loss function {self.name} returned a non-finite loss ({float(out.detach())})")
        if not out.requires_grad:
            raise UserLossError(
                f"the loss function {self.name} is not differentiable in batch.logp (the result does not require "
                "grad: was logp detached, or the loss built from old_logp / ref_logp only?)"
            )
        (g,) = torch.autograd.grad(out, leaf, allow_unused=True)
        if g is None:
            raise UserLossError(f"the loss function {self.name} does not depend on batch.logp (no gradient reaches it)")
        if self.compute_dtype is None and g.dtype == torch.float64 and bool((g != 0).any()):
            if bool((g.float().double() == g).all()):  # computed in float32 inside (e.g. OpenRLHF's .float())
                self.compute_dtype = torch.float32

    def _resolve_mode(self, lp: Tensor, lo: Tensor, lr: Tensor, m: Tensor, r: Tensor) -> None:
        """vmap when it runs and agrees with the loop (values and gradients) on the first groups."""
        n = min(lp.shape[0], 4)
        probe = [x[:n] for x in (lp, lo, lr, m, r)]
        try:
            leaf_v = probe[0].detach().clone().requires_grad_(True)
            v = self._vmap(leaf_v, *probe[1:])
            (gv,) = torch.autograd.grad(v.sum(), leaf_v, allow_unused=True)
        except Exception as exc:  # the group alone passed validation: vmap itself is what failed
            cause = exc.__cause__ if isinstance(exc, UserLossError) and exc.__cause__ is not None else exc
            first = str(cause).splitlines()[0] if str(cause) else ""
            self.mode, self.mode_note = "loop", f"loop (torch.func.vmap failed: {type(cause).__name__}: {first[:120]})"
            return
        leaf_l = probe[0].detach().clone().requires_grad_(True)
        w = self._loop(leaf_l, *probe[1:])
        (gl,) = torch.autograd.grad(w.sum(), leaf_l, allow_unused=True)
        gv = torch.zeros_like(leaf_v) if gv is None else gv
        gl = torch.zeros_like(leaf_l) if gl is None else gl
        if v.shape == w.shape and torch.allclose(v, w, rtol=1e-9, atol=1e-12) and torch.allclose(gv, gl, 1e-9, 1e-12):
            self.mode, self.mode_note = "vmap", "vmap (torch.func.vmap over groups)"
        else:
            self.mode, self.mode_note = "loop", "loop (vmap ran but disagreed with a plain loop)"

    def batch_loss(
        self,
        logp: Tensor,
        logp_old: Tensor,
        logp_ref: Tensor,
        mask: Tensor,
        task_reward: Tensor | None = None,
        whiten_stats: tuple[float, float] | None = None,
    ) -> Tensor:
        """(E,) the function's loss on each stacked group; inputs (E, B, T), ``task_reward`` (E, B) or None."""
        if logp.dim() == 2:  # a single group (B, T)
            task = None if task_reward is None else task_reward[None]
            return self.batch_loss(logp[None], logp_old[None], logp_ref[None], mask[None], task, whiten_stats)[0]
        lo, lr, m = logp_old.detach(), logp_ref.detach(), mask.to(logp.dtype)
        r = torch.zeros(logp.shape[:-1], dtype=logp.dtype) if task_reward is None else task_reward.to(logp.dtype)
        if self.mode is None:
            if lr.dtype == torch.float64:
                self._validate(logp[0], lo[0], lr[0], m[0], r[0])
            self._resolve_mode(logp, lo, lr, m, r)
        out = self._vmap(logp, lo, lr, m, r) if self.mode == "vmap" else self._loop(logp, lo, lr, m, r)  # (E,)
        if not torch.isfinite(out.detach()).all():
            bad = int((~torch.isfinite(out.detach())).sum())
            raise UserLossError(f"the loss function {self.name} returned a non-finite loss for {bad} group(s)")
        return out


# ---------------------------------------------------------------- precision


def _rel(a: Tensor, b: Tensor) -> float:
    den = float(b.norm())
    num = float((a - b).norm())
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def precision_report(
    rule, dtype: str | torch.dtype, group_size: int = 2, length: int = 8, n_groups: int = 32, seed: int = 0
) -> dict:
    """Error of the loss value and of its gradient in ``dtype`` against float64, on random groups.

    Two regimes: ``near_reference`` (log pi - log pi_ref ~ 1e-5..1e-3: early training, where cancellations
    such as exp(d) - 1 - d bite) and ``far`` (differences of order 1). Each reports the largest and the median
    relative error over groups (value: |v - v64| / |v64|; gradient: ||g - g64|| / ||g64||) and how many groups
    came out non-finite.
    """
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    g = torch.Generator().manual_seed(seed)
    shape = (n_groups, group_size, length)
    out: dict = {"dtype": str(dt).replace("torch.", ""), "group_size": group_size, "length": length}
    for regime, spread in (("near_reference", 1e-3), ("far", 1.0)):
        lp = torch.log(torch.rand(shape, generator=g, dtype=torch.float64) * 0.9 + 0.05)  # (E, B, T)
        delta = spread * torch.randn(shape, generator=g, dtype=torch.float64)
        if regime == "near_reference":
            delta = delta * torch.rand(shape, generator=g, dtype=torch.float64)  # spans ~1e-5..1e-3
        ref = lp - delta
        old = lp.clone()
        lengths = torch.randint(length // 2, length + 1, (n_groups, group_size), generator=g)
        mask = (torch.arange(length) < lengths[..., None]).to(torch.float64)  # (E, B, T)
        lp, ref, old = lp * mask, ref * mask, old * mask
        rew = (torch.rand(n_groups, group_size, generator=g) < 0.5).to(torch.float64)
        vals, grads = {}, {}
        for name, d in (("float64", torch.float64), ("low", dt)):
            leaf = lp.to(d).clone().requires_grad_(True)
            ws = (0.0, 1.0) if getattr(rule, "whiten", False) else None  # identity whitening: the arithmetic only
            v = rule.batch_loss(leaf, old.to(d), ref.to(d), mask.to(d), rew.to(d), ws)  # (E,)
            (gr,) = torch.autograd.grad(v.sum(), leaf, allow_unused=True)
            vals[name] = v.detach().to(torch.float64)
            grads[name] = (torch.zeros_like(leaf) if gr is None else gr).detach().to(torch.float64) * mask
        v_err = [
            abs(float(vals["low"][e] - vals["float64"][e])) / max(abs(float(vals["float64"][e])), 1e-300)
            for e in range(n_groups)
        ]
        g_err = [_rel(grads["low"][e], grads["float64"][e]) for e in range(n_groups)]
        finite = torch.isfinite(vals["low"]) & torch.isfinite(grads["low"]).flatten(1).all(-1)
        out[regime] = {
            "value_rel_error_max": max(v_err),
            "value_rel_error_median": float(torch.tensor(v_err).median()),
            "grad_rel_error_max": max(g_err),
            "grad_rel_error_median": float(torch.tensor(g_err).median()),
            "non_finite_groups": int((~finite).sum()),
            "negative_values": int((vals["low"] < 0).sum()) - int((vals["float64"] < 0).sum()),
        }
    return out


__all__ = ["DTYPES", "FIELDS", "LossBatch", "UserLoss", "UserLossError", "load_loss", "precision_report"]
