"""Per-token KL estimators: the values k1, k2, k3, abs, their clamped and straight-through variants.

Every estimator shares one signature, ``k(logp, logp_ref) -> Tensor`` of the same shape, where ``logp`` is
log pi_theta(y_t | y_<t) at the sampled token (differentiable) and ``logp_ref`` is log pi_ref(y_t | y_<t) (fixed).
With ``delta = logp - logp_ref`` and ``r = pi_ref / pi_theta = exp(-delta)``, each estimates the *reverse* KL
KL(pi_theta || pi_ref) of the next-token distribution when y_t ~ pi_theta:

    k1  = delta                      E[k1] = KL (unbiased value)
    k2  = delta**2 / 2               E[k2] = KL + O(KL^2) (biased value, an f-divergence)
    k3  = r - 1 - log r              E[k3] = KL (unbiased value because E[r - 1] = 0)
    abs = |delta|                    biased value

Whether the *gradient* that reaches theta is unbiased is a separate question decided by the placement
(``biaslab.core.placements``) and answered by computation (``biaslab.engines.exact``), never by a flag on the estimator.

Estimators that need the whole next-token distribution (the Rao-Blackwellized ``rb``) set
``needs_full_logits=True`` and take ``(logp_full, logp_ref_full)`` of shape (..., V) instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

EstimatorFn = Callable[[Tensor, Tensor], Tensor]


class EstimatorError(ValueError):
    """A KL estimator is unknown, or returned something that cannot be a per-token estimate."""


@dataclass(frozen=True)
class Estimator:
    """A named per-token estimator of the reverse KL(pi_theta || pi_ref).

    Attributes:
        name: registry key.
        fn: ``fn(logp, logp_ref) -> Tensor`` of the same shape; or, when ``needs_full_logits``,
            ``fn(logp_full, logp_ref_full) -> Tensor`` with the last (vocabulary) axis reduced.
        description: one line with the formula.
        needs_full_logits: capability flag: the estimator reads the whole next-token distribution,
            so it has no sequence-level form and the LLM path must keep full logits.
        clamp_mask: where the estimator's clamps bite (gradient zeroed), or None for an estimator without clamps.
    """

    name: str
    fn: EstimatorFn
    description: str = ""
    needs_full_logits: bool = False
    #: optional ``clamp_mask(logp, logp_ref) -> bool Tensor`` (the output's shape): where a clamp is active, so the
    #: estimator's gradient there is zero whatever the log-probabilities (the engines report that token mass)
    clamp_mask: EstimatorFn | None = None

    def __call__(self, logp: Tensor, logp_ref: Tensor) -> Tensor:
        """Evaluate and validate: the result must have the expected shape and be finite."""
        expected = logp.shape[:-1] if self.needs_full_logits else logp.shape
        versions = (logp._version, logp_ref._version)  # in-place writes bump a tensor's version counter
        try:
            out = self.fn(logp, logp_ref)
        except Exception as exc:  # a user function failing: name it, keep the cause
            raise EstimatorError(f"estimator {self.name!r} raised {type(exc).__name__}: {exc}") from exc
        if (logp._version, logp_ref._version) != versions:
            which = "logp" if logp._version != versions[0] else "logp_ref"
            raise EstimatorError(
                f"estimator {self.name!r} modified its input {which} in place; compute on a copy "
                "(e.g. logp_ref = logp_ref.clone()) so the caller's log-probabilities stay intact"
            )
        if not isinstance(out, Tensor):
            raise EstimatorError(
                f"estimator {self.name!r} returned {type(out).__name__}, expected a torch.Tensor "
                f"of shape {tuple(expected)}"
            )
        if out.shape != expected:
            raise EstimatorError(
                f"estimator {self.name!r} returned shape {tuple(out.shape)} for inputs of shape "
                f"{tuple(logp.shape)}; expected one value per token, shape {tuple(expected)}"
            )
        if out.is_complex() or not out.is_floating_point():
            raise EstimatorError(
                f"estimator {self.name!r} returned dtype {str(out.dtype).removeprefix('torch.')}; expected real "
                f"floating-point values (the dtype of its inputs, {str(logp.dtype).removeprefix('torch.')})"
            )
        if not torch.isfinite(out).all():
            bad = (~torch.isfinite(out)).sum().item()
            raise EstimatorError(f"estimator {self.name!r} returned {bad} non-finite value(s) (NaN or inf)")
        return out


# ---------------------------------------------------------------- the values (one place for the math)


def k1(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """k1 = delta = log pi(y_t) - log pi_ref(y_t). Unbiased for the reverse KL; can be negative."""
    return logp - logp_ref


def k2(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """k2 = (log r)^2 / 2 = delta^2 / 2. Biased for the reverse KL (second-order approximation), >= 0."""
    return 0.5 * (logp - logp_ref) ** 2


def k3(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """k3 = r - 1 - log r with r = pi_ref / pi = exp(-delta). Unbiased for the reverse KL, >= 0."""
    delta = logp - logp_ref
    return torch.expm1(-delta) + delta


def abs_delta(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """abs = |delta|. Biased for the reverse KL (as in verl/SkyRL ``abs``)."""
    return (logp - logp_ref).abs()


def rb_full(logp_full: Tensor, logp_ref_full: Tensor) -> Tensor:
    """Rao-Blackwellized k1: sum_v pi(v|prefix) (log pi(v|prefix) - log pi_ref(v|prefix)).

    The exact next-token reverse KL(pi(.|y_<t) || pi_ref(.|y_<t)) at the visited prefix; inputs (..., V),
    output (...). Unbiased for the reverse KL with lower variance than k1 (Amini, Vieira, Cotterell 2025).
    """
    return (logp_full.exp() * (logp_full - logp_ref_full)).sum(-1)


# ---------------------------------------------------------------- variants


def clamped(
    base: Estimator | str,
    input_clamp: float | tuple[float | None, float | None] | None = None,
    output_clamp: float | None = None,
    name: str | None = None,
) -> Estimator:
    """The estimator ``base`` with delta clamped to +-input_clamp before it and the value to +-output_clamp after.

    This is how frameworks guard k3 (verl ``low_var_kl``: input +-20, output +-10; OpenRLHF: output +-10).
    Inside the clamps the gradient is the base's; outside it is zero. ``input_clamp`` may also be a
    ``(low, high)`` pair with either side None (OpenRLHF's k3 clamps delta from below only: ``(-10, None)``).
    """
    base = get_estimator(base)
    if base.needs_full_logits:
        raise EstimatorError(f"clamped() takes a per-token estimator; {base.name!r} needs full logits")

    def fn(logp: Tensor, logp_ref: Tensor) -> Tensor:
        if input_clamp is not None:
            lo, hi = input_clamp if isinstance(input_clamp, tuple) else (-input_clamp, input_clamp)
            logp = logp_ref + (logp - logp_ref).clamp(lo, hi)
        out = base.fn(logp, logp_ref)
        if output_clamp is not None:
            out = out.clamp(-output_clamp, output_clamp)
        return out

    def active(logp: Tensor, logp_ref: Tensor) -> Tensor:
        delta = logp - logp_ref
        hit = torch.zeros_like(delta, dtype=torch.bool)
        if input_clamp is not None:
            lo, hi = input_clamp if isinstance(input_clamp, tuple) else (-input_clamp, input_clamp)
            hit = hit | (delta < lo if lo is not None else hit) | (delta > hi if hi is not None else hit)
            logp = logp_ref + delta.clamp(lo, hi)
        if output_clamp is not None:
            hit = hit | (base.fn(logp, logp_ref).abs() > output_clamp)
        return hit

    auto = f"{base.name}_clamped" if name is None else name
    return Estimator(auto, fn, f"{base.name} with delta in +-{input_clamp}, value in +-{output_clamp}",
                     clamp_mask=active)


def straight_through(value: Estimator | str, grad: Estimator | str, name: str | None = None) -> Estimator:
    """Value of one estimator with the gradient of another: ``v.detach() + g - g.detach()``.

    verl's ``low_var_kl+`` is ``straight_through("k3_clamped", "k2")``: the loss reads k3, backpropagates k2.
    """
    value, grad = get_estimator(value), get_estimator(grad)

    def fn(logp: Tensor, logp_ref: Tensor) -> Tensor:
        g = grad.fn(logp, logp_ref)
        return value.fn(logp, logp_ref).detach() + (g - g.detach())

    return Estimator(name or f"{value.name}_st_{grad.name}", fn, f"value of {value.name}, gradient of {grad.name}")


# ---------------------------------------------------------------- full-distribution estimators (distillation)


def full_divergence(name: str, divergence: Callable[[Tensor, Tensor], Tensor], description: str,
                    min_clamp: float | None = None, max_clamp: float | None = None) -> Estimator:
    """A per-token estimate that is itself a next-token divergence D(pi(.|prefix), pi_ref(.|prefix)) computed from
    the whole distributions (``needs_full_logits``), optionally clamped to [min_clamp, max_clamp] afterwards (verl
    clamps its top-k forward KL at 0 from below); the clamp mask marks where either bound is active."""

    def fn(logp_full: Tensor, logp_ref_full: Tensor) -> Tensor:
        out = divergence(logp_full, logp_ref_full)
        if min_clamp is not None or max_clamp is not None:
            out = out.clamp(min_clamp, max_clamp)
        return out

    def active(logp_full: Tensor, logp_ref_full: Tensor) -> Tensor:
        out = divergence(logp_full, logp_ref_full)
        hit = torch.zeros_like(out, dtype=torch.bool)
        if min_clamp is not None:
            hit = hit | (out < min_clamp)
        if max_clamp is not None:
            hit = hit | (out > max_clamp)
        return hit

    clamps = min_clamp is not None or max_clamp is not None
    return Estimator(name, fn, description, needs_full_logits=True, clamp_mask=active if clamps else None)


def topk_reverse_kl_student(k: int) -> Estimator:
    """miles' top-k OPD penalty (``--opd-log-prob-top-k K``, strategy ``only-student``, weights ``student_p``):
    sum_{v in S} w_v (log p_v - log q_v) over the student's top-k tokens S, w = p renormalised on S. A function of
    the prefix only: it never reads the sampled token."""
    from .objectives import renormalised_topk, topk_mask

    def d(p_log: Tensor, q_log: Tensor) -> Tensor:
        keep = topk_mask(p_log, k)
        w = renormalised_topk(p_log, keep).exp()
        return torch.where(keep, w * (p_log - q_log), torch.zeros_like(p_log)).sum(-1)

    return full_divergence(f"rkl_topk_student:{k}", d, f"miles top-{k} reverse KL on the student's top tokens")


def _factory(name: str, params: list[str]) -> Estimator:
    from . import objectives as ob

    if name == "fkl_topk":  # verl forward_kl_topk: K[, loss_max_clamp]; clamp_min(0) always (losses.py:365)
        k = int(params[0])
        hi = float(params[1]) if len(params) > 1 else None
        return full_divergence(f"fkl_topk:{':'.join(params)}", ob.forward_kl_topk(k), f"verl forward_kl_topk, K={k},"
                               " clamped at 0 from below", min_clamp=0.0, max_clamp=hi)
    if name == "jsd":
        beta = float(params[0])
        return full_divergence(f"jsd:{params[0]}", ob.jsd(beta), f"generalized JSD, beta={beta} (TRL GKD)")
    if name == "mixed_topk":
        k, w = int(params[0]), float(params[1])
        return full_divergence(f"mixed_topk:{params[0]}:{params[1]}", ob.mixed_kl_topk(k, w),
                               f"NeMo-RL top-{k} renormalised mixed KL, forward weight {w}")
    if name == "rkl_topk_student":
        return topk_reverse_kl_student(int(params[0]))
    raise KeyError(name)


#: estimators built from parameters: ``get_estimator("fkl_topk:32")`` (name -> parameters they take)
FACTORIES = {"fkl_topk": "K[:MAX]", "jsd": "BETA", "mixed_topk": "K:W", "rkl_topk_student": "K"}


# ---------------------------------------------------------------- registry

_REGISTRY: dict[str, Estimator] = {}


def register_estimator(
    name: str,
    fn: EstimatorFn | Estimator,
    description: str = "",
    *,
    needs_full_logits: bool = False,
    overwrite: bool = False,
) -> Estimator:
    """Register ``fn(logp, logp_ref) -> Tensor`` under ``name`` so configurations and the CLI can use it."""
    if not overwrite and name in _REGISTRY:
        raise EstimatorError(f"estimator {name!r} is already registered (pass overwrite=True to replace it)")
    if isinstance(fn, Estimator):
        est = Estimator(name, fn.fn, description or fn.description, fn.needs_full_logits, fn.clamp_mask)
    else:
        if not callable(fn):
            raise EstimatorError(f"estimator {name!r}: {fn!r} is not callable")
        est = Estimator(name, fn, description or (fn.__doc__ or "").strip().split("\n")[0], needs_full_logits)
    _REGISTRY[name] = est
    return est


def get_estimator(name: str | Estimator) -> Estimator:
    """Look up an estimator by name (an ``Estimator`` passes through)."""
    if isinstance(name, Estimator):
        return name
    if name in _REGISTRY:
        return _REGISTRY[name]
    base, *params = str(name).split(":")
    if base in FACTORIES and params:
        try:
            return _factory(base, params)
        except (ValueError, IndexError) as exc:
            raise EstimatorError(f"estimator {name!r}: parameters are {base}:{FACTORIES[base]} ({exc})") from None
    known = ", ".join(sorted(_REGISTRY)) + "; with parameters: " + ", ".join(f"{k}:{v}" for k, v in FACTORIES.items())
    raise EstimatorError(f"unknown estimator {name!r}; registered: {known}")


def registered_estimators() -> dict[str, Estimator]:
    """A copy of the registry, name -> Estimator."""
    return dict(_REGISTRY)


register_estimator("k1", k1)
register_estimator("k2", k2)
register_estimator("k3", k3)
register_estimator("abs", abs_delta)
register_estimator("rb", rb_full, needs_full_logits=True)
register_estimator("neg_entropy", full_divergence("neg_entropy", lambda p, q: (p.exp() * p).sum(-1),
                                                  "-H(pi(.|prefix)) = sum_v p_v log p_v: an entropy bonus's loss"))
register_estimator("k1_clamped", clamped("k1", output_clamp=10.0))
register_estimator("k2_clamped", clamped("k2", output_clamp=10.0))
register_estimator("k3_clamped", clamped("k3", input_clamp=20.0, output_clamp=10.0))
register_estimator("k3_st_k2", straight_through("k3_clamped", "k2"))
register_estimator("k3_lowclamp", clamped("k3", input_clamp=(-10.0, None), output_clamp=10.0))
register_estimator("k1_st_k2", straight_through("k1", "k2"))
register_estimator("abs_st_k2", straight_through("abs", "k2"))
