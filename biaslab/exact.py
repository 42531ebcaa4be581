"""Exact engine: enumerate every sequence of a toy model and compute gradients and variances with no noise.

For a policy pi_theta and a fixed reference pi_ref over {0..V-1}^T, the engine returns

* the reverse KL(pi || pi_ref) and forward KL(pi_ref || pi) at the sequence level, and their exact gradients;
* the token-level KLs with the prefix law held fixed (the "partial" directions per-token losses follow):
  sum_t E_{y_<t ~ sg(pi)} grad KL(pi_ref(.|y_<t) || pi(.|y_<t))  (forward) and the same for the reverse KL;
* for any ``KLConfig``: the exact expected gradient E_{y~pi}[g(y)] = sum_y pi(y) g(y), the per-sample variance
  trace E||g - E g||^2, the relative bias against grad KL(pi || pi_ref), cosines, a verdict, and the named
  direction E[g] equals, if any.

Vectorized over all V**T sequences: one forward pass builds the (N, T, V) next-token log-probabilities, and each
configuration costs one backward pass of its surrogate on those log-probabilities (giving the coefficients
a = dS/dlogp), one backward pass into theta for E[g] = J^T (pi * a), and one per-sample norm computation
(closed form for tabular models, torch.func otherwise).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .placements import Coefficients, Credit, KLConfig, Placement, TokenBatch, surrogate_coefficients
from .toy import AutoregressiveModel, ModelError

DEFAULT_MAX_BYTES = int(float(os.environ.get("BIASLAB_MAX_BYTES", 4 * 2**30)))
RTOL = 1e-8  # relative tolerance for "equal" directions; the engine's round-off is ~1e-13 in float64
ATOL = 1e-13  # absolute floor for gradients that are round-off (policy == reference)

#: Named directions, in the order a match is reported.
DIRECTIONS = {
    "reverse_kl": "grad KL(pi || pi_ref), sequence level (the objective)",
    "forward_kl": "grad KL(pi_ref || pi), sequence level",
    "forward_kl_token": "sum_t E_prefix grad KL(pi_ref(.|prefix) || pi(.|prefix)), prefix law held fixed",
    "reverse_kl_token": "sum_t E_prefix grad KL(pi(.|prefix) || pi_ref(.|prefix)), prefix law held fixed",
    "expected_value": "grad E_pi[K]: the estimator's own expected value, differentiated in full",
    "zero": "0: the gradient vanishes in expectation",
}


class EnumerationTooLarge(MemoryError):
    """Enumerating every sequence would need more memory than allowed."""


def enumeration_bytes(vocab_size: int, length: int, per_sample_params: int = 0) -> int:
    """Rough peak bytes of the exact engine: ~16 float64 (N, T, V) tensors and the tokens, plus one chunk of
    torch.func per-sample gradients (``per_sample_params`` floats each) for models without a closed form."""
    n = vocab_size**length
    return n * length * (16 * vocab_size * 8 + 16) + min(n, 2048) * per_sample_params * 8 * 3


def check_enumerable(vocab_size: int, length: int, per_sample_params: int = 0, max_bytes: int | None = None) -> int:
    """Refuse, before allocating anything, an enumeration that would not fit in ``max_bytes``."""
    max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
    need = enumeration_bytes(vocab_size, length, per_sample_params)
    if need > max_bytes:
        raise EnumerationTooLarge(
            f"enumerating V**T = {vocab_size}**{length} = {vocab_size**length:.4g} sequences would need about "
            f"{_human(need)} of memory (limit {_human(max_bytes)}; set BIASLAB_MAX_BYTES to change it). "
            "Use Monte Carlo instead: biaslab.montecarlo, or `biaslab check --mode mc`."
        )
    return need


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if n < 1024 or unit == "EiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g}"


def enumerate_sequences(vocab_size: int, length: int) -> Tensor:
    """(V**T, T) every sequence, row n is n written in base V with the first token most significant."""
    n = torch.arange(vocab_size**length)
    powers = vocab_size ** torch.arange(length - 1, -1, -1)  # (T,)
    return (n.unsqueeze(1) // powers) % vocab_size  # (N, T)


@dataclass
class Truths:
    """Exact KL values and gradients (flat, the policy's parameter order)."""

    kl_reverse: float
    kl_forward: float
    directions: dict[str, Tensor]  # every named direction except "expected_value" (config-specific)

    @property
    def grad_reverse(self) -> Tensor:
        return self.directions["reverse_kl"]

    @property
    def grad_forward(self) -> Tensor:
        return self.directions["forward_kl"]


@dataclass
class ExactResult:
    """Exact statistics of one configuration's gradient estimator g(y), y ~ pi."""

    config: KLConfig
    expected_grad: Tensor  # (P,) E[g]
    variance: float  # E||g - E g||^2 (trace of the per-sample covariance)
    rel_bias: float  # ||E g - grad KL_rev|| / ||grad KL_rev||
    cos_reverse: float
    cos_forward: float
    verdict: str  # "unbiased" | "zero" | "biased"
    matches: str  # first matched direction name, or "none"
    all_matches: list[str] = field(default_factory=list)

    def as_dict(self, with_grad: bool = True) -> dict:
        d = {
            "label": self.config.label,
            "estimator": self.config.estimator.name,
            "placement": self.config.placement.value,
            "level": self.config.level.value,
            "credit": self.config.credit.value if self.config.credit is not None else None,
            "variance": self.variance,
            "rel_bias": self.rel_bias,
            "cos_reverse": self.cos_reverse,
            "cos_forward": self.cos_forward,
            "verdict": self.verdict,
            "matches": self.matches,
            "all_matches": self.all_matches,
        }
        if with_grad:
            d["expected_grad"] = self.expected_grad.tolist()
        return d


def _cos(a: Tensor, b: Tensor) -> float:
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return float("nan")
    return float(a @ b / (na * nb))


def matched_directions(g: Tensor, directions: dict[str, Tensor], rtol: float = RTOL, atol: float = ATOL) -> list[str]:
    """Names of the directions d with ||g - d|| <= rtol * max(||d||, ||g||) + atol, in ``directions`` order.

    ``zero`` matches when ||g|| <= rtol * ||grad KL|| + atol. ``atol`` is an absolute round-off floor so that a
    policy equal to its reference (every gradient ~1e-17) is not called biased.
    """
    out = []
    rev_norm = float(directions["reverse_kl"].norm())
    for name, d in directions.items():
        if name == "zero":
            ok = float(g.norm()) <= rtol * rev_norm + atol
        else:
            ok = float((g - d).norm()) <= rtol * max(float(d.norm()), float(g.norm())) + atol
        if ok:
            out.append(name)
    return out


class ExactEngine:
    """Enumerate every sequence of ``policy`` and evaluate configurations exactly (see module docstring).

    Args:
        policy: the model whose parameters theta receive the gradient.
        ref: the reference pi_ref (its parameters are never differentiated).
        max_bytes: refuse enumerations whose estimated peak memory exceeds this (default 4 GiB or
            $BIASLAB_MAX_BYTES).
    """

    def __init__(self, policy: AutoregressiveModel, ref: AutoregressiveModel, max_bytes: int | None = None) -> None:
        if (policy.vocab_size, policy.length) != (ref.vocab_size, ref.length):
            raise ModelError(
                f"policy and reference disagree: policy V={policy.vocab_size}, T={policy.length}; "
                f"reference V={ref.vocab_size}, T={ref.length}"
            )
        policy.check_finite("policy")
        ref.check_finite("reference", reference=True)
        self.policy, self.ref = policy, ref
        self.V, self.T = policy.vocab_size, policy.length
        self.params = [p for p in policy.parameters() if p.requires_grad]
        if not self.params:
            raise ModelError("the policy has no parameters that require grad")
        n_params = 0 if policy.closed_form_grads else sum(p.numel() for p in self.params)
        check_enumerable(self.V, self.T, n_params, max_bytes)

        self.tokens = enumerate_sequences(self.V, self.T)  # (N, T)
        self.logp_full = policy.log_probs_enumerated(self.tokens)  # (N, T, V), graph kept for many backwards
        with torch.no_grad():
            self.logp_ref_full = ref.log_probs_enumerated(self.tokens)  # (N, T, V)
        index = self.tokens.unsqueeze(-1)  # (N, T, 1)
        self._logp_tok = self.logp_full.gather(-1, index).squeeze(-1)  # (N, T), differentiable
        self._logp_ref_tok = self.logp_ref_full.gather(-1, index).squeeze(-1)  # (N, T)
        self._logp_full_det = self.logp_full.detach()  # (N, T, V)
        self.batch = TokenBatch(self.tokens, self.logp_full, self.logp_ref_full, self._logp_tok, self._logp_ref_tok)
        self.logp_seq = self._logp_tok.sum(-1)  # (N,) log pi(y), differentiable
        self.logp_ref_seq = self._logp_ref_tok.sum(-1)  # (N,)
        self.weights = self.logp_seq.detach().exp()  # (N,) pi(y)
        self._truths: Truths | None = None
        self._tok_factor: Tensor | None = None
        self._level_probs: list[Tensor] | None = None
        self._value_grads: dict[tuple, Tensor] = {}

    # ------------------------------------------------------------------ helpers

    @property
    def n_sequences(self) -> int:
        return self.tokens.shape[0]

    def grad_of(self, scalar: Tensor) -> Tensor:
        """Flat gradient of ``scalar`` (built on this engine's forward pass) with respect to theta."""
        grads = torch.autograd.grad(scalar, self.params, retain_graph=True, allow_unused=True)
        return torch.cat(
            [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, self.params)]
        )

    def coefficients(self, config: KLConfig) -> Coefficients:
        """dS(y)/dlogp for every sequence (see ``placements.surrogate_coefficients``)."""
        return surrogate_coefficients(
            config, self.tokens, self._logp_full_det, self.logp_ref_full, self._logp_tok, self._logp_ref_tok
        )

    def per_sample_sq_norms(self, coef: Coefficients) -> Tensor:
        """(N,) ||g(y)||^2 for every sequence (closed form for tabular models, torch.func otherwise)."""
        if self.policy.closed_form_grads:
            if coef.full is None:
                if self._tok_factor is None:
                    self._tok_factor = self.policy.token_sq_norm_factor(self.tokens)  # (N, T)
                return (coef.tok**2 * self._tok_factor).sum(-1)
            return self.policy.per_sample_sq_norms(self.tokens, coef.tok, coef.full)
        from .persample import per_sample_sq_norms

        return per_sample_sq_norms(self.policy, self.tokens, coef.dense(self.tokens, self.V))

    # ------------------------------------------------------------------ truths

    def truths(self) -> Truths:
        """Exact KLs and the named gradient directions.

        Each gradient is written as sum_y of coefficients times grad log pi, using grad pi(y) = pi(y) grad log pi(y)
        (exact, not a sampling identity), and summed by ``weighted_grad``:

            grad KL(pi||pi_ref)  = sum_y pi(y) (log pi(y)/pi_ref(y) + 1) grad log pi(y)
            grad KL(pi_ref||pi)  = -sum_y pi_ref(y) grad log pi(y)
            forward_kl_token     = -sum_y pi(y) sum_t sum_v pi_ref(v|y_<t) grad log pi(v|y_<t)
            reverse_kl_token     = sum_y pi(y) sum_t sum_v pi(v|y_<t) (log pi(v|y_<t)/pi_ref(v|y_<t) + 1)
                                   * grad log pi(v|y_<t)

        (``truths_autograd`` differentiates the defining sums directly; the tests check both agree.)
        """
        if self._truths is not None:
            return self._truths
        w = self.weights  # (N,) pi(y)
        lp, lr = self.logp_seq.detach(), self.logp_ref_seq  # (N,)
        lp_full, lr_full = self._logp_full_det, self.logp_ref_full  # (N, T, V)
        ones = torch.ones_like(self._logp_ref_tok)  # (N, T)
        directions = {
            "reverse_kl": self.weighted_grad((w * (lp - lr + 1))[:, None] * ones, None),
            "forward_kl": self.weighted_grad(-lr.exp()[:, None] * ones, None),
            "forward_kl_token": self.weighted_grad(None, -w[:, None, None] * lr_full.exp()),
            "reverse_kl_token": self.weighted_grad(None, w[:, None, None] * lp_full.exp() * (lp_full - lr_full + 1)),
        }
        directions["zero"] = torch.zeros_like(directions["reverse_kl"])
        kl_rev = float((w * (lp - lr)).sum())
        kl_fwd = float((lr.exp() * (lr - lp)).sum())
        self._truths = Truths(kl_rev, kl_fwd, directions)
        return self._truths

    def truths_autograd(self) -> dict[str, Tensor]:
        """The four gradients by autograd of their defining sums (slower; a cross-check of ``truths``)."""
        w, lp, lr = self.weights, self.logp_seq, self.logp_ref_seq
        p_full, q_full = self.logp_full.exp(), self.logp_ref_full.exp()  # (N, T, V)
        return {
            "reverse_kl": self.grad_of((lp.exp() * (lp - lr)).sum()),
            "forward_kl": self.grad_of((lr.exp() * (lr - lp)).sum()),
            "forward_kl_token": self.grad_of(
                (w[:, None] * (q_full * (self.logp_ref_full - self.logp_full)).sum(-1)).sum()
            ),
            "reverse_kl_token": self.grad_of(
                (w[:, None] * (p_full * (self.logp_full - self.logp_ref_full)).sum(-1)).sum()
            ),
        }

    # ------------------------------------------------------------------ configurations

    def weighted_grad(self, wa_tok: Tensor | None, wc_full: Tensor | None) -> Tensor:
        """(P,) sum_n [sum_t wa[n,t] grad log pi(y_nt|y_<t) + sum_{t,v} wc[n,t,v] grad log pi(v|y_<t)].

        A reshape-sum for tabular models (closed form), one backward pass otherwise.
        """
        if self.policy.closed_form_grads:
            if self._level_probs is None:
                self._level_probs = self.policy.level_probs()
            return self.policy.enumerated_expected_grad(wa_tok, wc_full, self._level_probs)
        outputs, cotangents = [], []
        if wa_tok is not None:
            outputs.append(self.batch.logp)
            cotangents.append(wa_tok)
        if wc_full is not None:
            outputs.append(self.logp_full)
            cotangents.append(wc_full)
        grads = torch.autograd.grad(outputs, self.params, grad_outputs=cotangents, retain_graph=True)
        return self.policy.flat(grads)

    def expected_grad(self, config: KLConfig, coef: Coefficients | None = None) -> Tensor:
        """(P,) E_{y~pi}[g(y)] = sum_y pi(y) g(y)."""
        coef = self.coefficients(config) if coef is None else coef
        w = self.weights
        wc = None if coef.full is None else w[:, None, None] * coef.full  # (N, T, V)
        return self.weighted_grad(w[:, None] * coef.tok, wc)

    def expected_value_grad(self, config: KLConfig) -> Tensor:
        """(P,) grad_theta E_pi[K]: the full derivative of the estimator's expected value.

        Under enumeration the score-function identity is exact, so this is E[g] of the same estimator placed in
        reward + loss with full credit (tests check it against autograd of sum_y pi(y) K(y)).
        """
        key = (config.estimator.name, config.level)
        if key not in self._value_grads:
            both = KLConfig(config.estimator, Placement.BOTH, config.level, Credit.FULL)
            self._value_grads[key] = self.expected_grad(both)
        return self._value_grads[key]

    def evaluate(self, config: KLConfig) -> ExactResult:
        """Exact expected gradient, variance, bias, cosines, verdict and matched direction of ``config``."""
        tr = self.truths()
        coef = self.coefficients(config)  # (N, T, V)
        mean = self.expected_grad(config, coef)  # (P,)
        second = float((self.weights * self.per_sample_sq_norms(coef)).sum())
        variance = max(second - float(mean @ mean), 0.0)
        ref_norm = float(tr.grad_reverse.norm())
        bias = float((mean - tr.grad_reverse).norm())
        rel_bias = bias / ref_norm if ref_norm > 0 else (0.0 if bias == 0 else math.inf)
        directions = dict(tr.directions)
        zero = directions.pop("zero")
        directions["expected_value"] = self.expected_value_grad(config)
        directions["zero"] = zero
        matches = matched_directions(mean, directions)
        if "reverse_kl" in matches:
            verdict = "unbiased"  # (also when everything is zero: policy == reference)
        elif "zero" in matches:
            verdict = "zero"
        else:
            verdict = "biased"
        return ExactResult(
            config=config,
            expected_grad=mean.detach(),
            variance=variance,
            rel_bias=rel_bias,
            cos_reverse=math.nan if verdict == "zero" else _cos(mean, tr.grad_reverse),  # round-off has no direction
            cos_forward=math.nan if verdict == "zero" else _cos(mean, tr.grad_forward),
            verdict=verdict,
            matches=matches[0] if matches else "none",
            all_matches=matches,
        )

    def evaluate_all(self, configs: list[KLConfig], progress: bool = False) -> list[ExactResult]:
        from tqdm.auto import tqdm

        return [self.evaluate(c) for c in tqdm(configs, desc="exact", disable=not progress, leave=False)]
