"""The named gradient directions, the one tolerance policy and the one verdict rule.

Every exact verdict biaslab prints (table, check, audit, figures, train, notebooks) comes from ``exact_verdict``;
every Monte Carlo verdict from ``mc_verdict``. The objective is the sequence-level reverse KL(pi_theta || pi_ref)
unless another is named (``target``: any objective of ``biaslab.core.objectives``, e.g. a per-token divergence to a
distillation teacher); a configuration's expected update E[g] is compared with ``nominal * grad objective``, where
``nominal`` is the scale an unbiased configuration must have (beta, batch size, aggregation constant; 1 for
``make_config``). "grad KL" below stands for the target's gradient.

Exact verdicts (all relative, so invariant under beta and under the scale of the gradient):

* ``undefined``: the true gradient is itself zero to round-off (policy == reference): no ratio is meaningful.
* ``unbiased``:  ||E g - c grad KL|| <= tol * ||c grad KL||.
* ``rescaled``:  E g = s grad KL with s > 0, s != c (reported as the factor s / c: another effective beta).
* ``zero``:      ||E g|| <= tol * ||c grad KL|| (nothing in expectation: pure noise).
* ``biased``:    anything else; reported with the named direction E g follows (up to a positive scale), or the
  nearest one by cosine.

``tol`` is set by the dtype the user's code computes in (``tolerance``): sqrt(machine epsilon), so float32
round-off (~1e-7) is not called bias while any bias above ~3e-4 relative is. Round-off of the enumerated sums
adds ``ROUNDOFF * eps * rms(g)``, a floor proportional to the update's own size (never an absolute one).

Monte Carlo verdicts never say "unbiased": a test that does not reject says ``no bias detected`` together with the
smallest relative bias it could have detected at power 0.9.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .objectives import OBJECTIVES

#: The directions every exact verdict is matched against, in the order a match is reported (``zero`` and
#: ``expected_value`` are handled specially). Any other objective of ``biaslab.core.objectives`` joins them when it
#: is the target.
STANDARD = ("reverse_kl", "forward_kl", "forward_kl_token", "reverse_kl_token")
DIRECTIONS = {
    **{k: OBJECTIVES[k] for k in STANDARD},
    "expected_value": "grad E_pi[K]: the derivative of the estimator's own expected value",
    **{k: v for k, v in OBJECTIVES.items() if k not in STANDARD},
    "sampler": "grad E_mu[sum_t (log pi - log mu)^2] with the sampler mu fixed (a pull toward the sampler)",
    "zero": "0: the gradient vanishes in expectation",
}

EXACT_VERDICTS = ("unbiased", "rescaled", "zero", "biased", "undefined", "no_kl")
MC_VERDICTS = ("biased", "no bias detected", "undefined")

#: multiples of eps * rms(g) allowed for the round-off of enumerated sums
ROUNDOFF = 64.0
#: the true gradient is "zero" (verdict undefined) when ||grad KL|| <= UNDEFINED * eps64 * rms(score) / tol64
UNDEFINED = 10.0


def tolerance(dtype: torch.dtype = torch.float64) -> float:
    """Relative tolerance for code computing in ``dtype``: sqrt(eps) (float64 1.5e-8, float32 3.5e-4,
    float16 3.1e-2, bfloat16 8.8e-2)."""
    return math.sqrt(torch.finfo(dtype).eps)


def eps(dtype: torch.dtype = torch.float64) -> float:
    return float(torch.finfo(dtype).eps)


def format_factor(x: float) -> str:
    """A scale factor with 4 significant digits, or as many more (up to 12) as it takes not to read 1 when it is not
    1: a GRPO group of one divides by 1 + 1e-6, a 'rescaled x0.999999' that 4 digits would print as 'x1'."""
    for digits in range(4, 13):
        text = f"{x:.{digits}g}"
        if x == 1 or float(text) != 1:
            return text
    return text


def true_gradient_is_zero(grad_norm: float, score_rms: float) -> bool:
    """True when ||grad KL(pi||pi_ref)|| is round-off relative to the size of the score, sqrt(E||grad log pi||^2):
    no relative bias can be resolved at the float64 tolerance (policy == reference)."""
    return grad_norm <= UNDEFINED * eps(torch.float64) / tolerance(torch.float64) * score_rms


@dataclass
class Verdict:
    """The outcome of the verdict rule for one expected update."""

    verdict: str  # one of EXACT_VERDICTS
    rel_bias: float  # ||E g - c grad KL|| / ||c grad KL|| (nan when undefined / no KL)
    scale: float  # <E g, grad KL> / (c ||grad KL||^2): 1 when the magnitude along grad KL is right
    factor: float  # the rescaling factor s / c when verdict == "rescaled" (else nan)
    matches: dict[str, float] = field(default_factory=dict)  # direction -> scale relative to c, exact matches
    nearest: str = "none"  # the named direction with the largest cosine
    nearest_cos: float = math.nan
    cos_reverse: float = math.nan
    cos_forward: float = math.nan
    tolerance: float = math.nan
    dtype: str = "float64"
    target: str = "reverse_kl"  # the objective E[g] was judged against

    @property
    def direction(self) -> str:
        """The first matched named direction, or "none" (what table rows print as ``matches``)."""
        if self.verdict == "zero":
            return "zero"
        return next(iter(self.matches), "none")

    def describe(self) -> str:
        """One phrase: 'unbiased', 'rescaled x0.5', 'biased, follows forward_kl_token', ... ('unbiased for
        reverse_kl_token' when judged against another objective than the reverse KL)."""
        if self.target != "reverse_kl" and self.verdict in ("unbiased", "rescaled"):
            what = "unbiased" if self.verdict == "unbiased" else f"rescaled x{format_factor(self.factor)}"
            return f"{what} for {self.target}"
        if self.verdict == "rescaled":
            return f"rescaled x{format_factor(self.factor)}"
        if self.verdict == "biased":
            if self.matches:
                name, s = next(iter(self.matches.items()))
                return f"biased, follows {name}" + ("" if abs(s - 1) <= 1e-6 else f" (x{format_factor(s)})")
            return f"biased, nearest {self.nearest} (cos {self.nearest_cos:.4f})"
        return self.verdict


def cosine(a: Tensor, b: Tensor) -> float:
    """<a, b> / (||a|| ||b||), nan when either vector is zero."""
    na, nb = float(a.norm()), float(b.norm())
    return math.nan if na == 0 or nb == 0 else float(a @ b) / (na * nb)


class Directions:
    """Named (P,) directions, stacked once so that one matrix product gives a vector's dot products with all of
    them; ``extended`` adds more without copying these (an engine builds its named directions once)."""

    def __init__(self, named: dict[str, Tensor], base: Directions | None = None) -> None:
        block = torch.stack(list(named.values()))  # (K, P)
        self.names = [*(base.names if base else ()), *named]
        self.blocks = [*(base.blocks if base else ()), block]
        self.sq = [*(base.sq if base else ()), *(block * block).sum(1).tolist()]  # ||d||^2 each

    def extended(self, named: dict[str, Tensor]) -> Directions:
        return Directions(named, self)

    def __getitem__(self, name: str) -> Tensor:
        i = self.names.index(name)
        for b in self.blocks:
            if i < b.shape[0]:
                return b[i]
            i -= b.shape[0]
        raise KeyError(name)

    def dots(self, v: Tensor) -> list[float]:
        return torch.cat([b @ v for b in self.blocks]).tolist()


def exact_verdict(
    mean: Tensor,
    directions: dict[str, Tensor] | Directions,
    nominal: float,
    rms: float,
    undefined: bool,
    dtype: torch.dtype = torch.float64,
    target: str = "reverse_kl",
) -> Verdict:
    """Apply the verdict rule (module docstring) to an exact expected update.

    Args:
        mean: (P,) E[g].
        directions: name -> (P,) named gradient directions (or ``Directions``); must hold ``target`` and
            ``reverse_kl`` and ``forward_kl``, and may hold ``forward_kl_token``, ``reverse_kl_token``,
            ``expected_value`` and other objectives (order = report order; zero vectors never match).
        nominal: c, the scale of an unbiased update (0: the configuration has no KL term: verdict ``no_kl``).
        rms: sqrt(E||g||^2), the size of one update: the round-off floor is relative to it.
        undefined: the target's gradient is zero (see ``true_gradient_is_zero``).
        dtype: the lowest precision the configuration's code computes in.
        target: the objective E[g] should follow (``biaslab.core.objectives``; default the reverse KL).
    """
    tol, e = tolerance(dtype), eps(dtype)
    floor = ROUNDOFF * e * rms
    out = Verdict("biased", math.nan, math.nan, math.nan, tolerance=tol, dtype=str(dtype).replace("torch.", ""),
                  target=target)
    if undefined or nominal == 0:  # the true gradient is zero, or the configuration has no KL term
        out.verdict = "undefined" if undefined else "no_kl"
        return out
    dirs = directions if isinstance(directions, Directions) else Directions(directions)
    rev = dirs[target]
    target_vec = nominal * rev
    tnorm, gnorm = float(target_vec.norm()), float(mean.norm())
    miss = float((mean - target_vec).norm())
    out.rel_bias = miss / tnorm
    md = dict(zip(dirs.names, dirs.dots(mean)))  # <E g, d>
    sq = dict(zip(dirs.names, dirs.sq))  # ||d||^2
    out.scale = md[target] / (nominal * sq[target])
    if miss <= tol * tnorm + floor:
        out.verdict = "unbiased"
    elif gnorm <= tol * tnorm + floor:
        out.verdict = "zero"
        out.scale = 0.0  # E g = 0: what remains is round-off
        out.matches = {"zero": 1.0}
        return out  # round-off has no other direction
    cos = {k: md[k] / (gnorm * math.sqrt(sq[k])) for k in dirs.names if sq[k] > 0}
    out.cos_reverse, out.cos_forward = cos.get("reverse_kl", math.nan), cos.get("forward_kl", math.nan)
    best, best_cos = "none", -2.0
    reach = tol * gnorm + floor  # E g matches d when ||E g - s d|| <= reach, s = <E g, d> / ||d||^2 > 0
    mm = gnorm**2
    for name, c in cos.items():
        if c > best_cos + 1e-12:  # ties (equal directions) go to the first named
            best, best_cos = name, c
        s = md[name] / sq[name]
        # ||E g - s d||^2 = ||E g||^2 (1 - cos^2) up to round-off ~1e-13 ||E g||^2: only near-parallel directions
        # need the residual itself
        if s > 0 and mm * (1 - c * c) <= reach**2 + 1e-9 * mm and float((mean - s * dirs[name]).norm()) <= reach:
            out.matches[name] = s / nominal
    out.nearest, out.nearest_cos = best, best_cos
    if out.verdict == "biased" and target in out.matches:
        out.verdict = "rescaled"
        out.factor = out.matches[target]
    return out


__all__ = [
    "DIRECTIONS",
    "Directions",
    "STANDARD",
    "EXACT_VERDICTS",
    "MC_VERDICTS",
    "Verdict",
    "cosine",
    "exact_verdict",
    "tolerance",
    "true_gradient_is_zero",
]
