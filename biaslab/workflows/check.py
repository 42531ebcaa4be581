"""Check any KL estimator for unbiasedness: exactly by enumeration, or with a calibrated Monte Carlo test.

    biaslab check my_estimators.py:k3 --placement both            # exit 0: unbiased
    biaslab check my_estimators.py:k3 --placement loss --mode mc  # exit 1: biased, follows the forward KL

``FUNCTION(logp, logp_ref)`` returns the per-token estimate of the reverse KL(pi || pi_ref) with the shape of its
inputs ((N, T) at token level, (N,) at sequence level), differentiable through logp. The check places it as asked,
evaluates the resulting gradient estimator on K random toy models (tabular and neural, float64) and compares its
expectation with grad KL(pi || pi_ref):

* exact mode: enumeration (``ExactEngine``), no noise; the verdict is a float64 identity test.
* mc mode: n samples per model, Hotelling's T^2 test of E[g] = grad KL (``stats.bias_test``) against the exact
  gradient when the toy is enumerable and otherwise against the unbiased Rao-Blackwellized reference estimated
  from n more samples; Bonferroni over the K models at level alpha. The report states the smallest relative bias
  the test could detect with power 0.9.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from ..core.estimators import Estimator, EstimatorError, get_estimator
from ..core.placements import KLConfig, make_config
from ..core.verdict import DIRECTIONS, format_factor, tolerance
from ..engines.exact import EnumerationTooLarge, ExactEngine, check_enumerable
from ..engines.stats import EPS64, ROUNDOFF_COV, Moments, bias_test, mean_is_exact
from ..engines.toy import AutoregressiveModel, TabularAR, make_pair
from .plugins import load_function  # noqa: F401  (re-exported: check's users import it here)

MODES = ("exact", "mc")
MODEL_KINDS = ("mixed", "tabular", "neural")


def as_estimator(fn: Callable | Estimator | str, name: str | None = None) -> Estimator:
    if isinstance(fn, (Estimator, str)):
        return get_estimator(fn)
    if not callable(fn):
        raise EstimatorError(f"{fn!r} is not callable")
    return Estimator(name or getattr(fn, "__name__", "user"), fn, (fn.__doc__ or "").strip().split("\n")[0])


@dataclass
class ModelCheck:
    """The check on one toy model."""

    model: str
    verdict: str  # exact: unbiased | rescaled | zero | biased | undefined; mc: biased | no bias detected
    matches: str  # exact: the matched named direction; mc: the direction the point estimate is closest to
    rel_bias: float  # exact when available (nan otherwise)
    variance: float
    variance_ratio: float  # variance / variance of k1 in reward (token, rtg)
    kl: float = math.nan  # KL(pi || pi_ref) of the toy (exact when enumerable, else estimated)
    factor: float = math.nan  # exact: the rescaling factor of a "rescaled" verdict
    dtype: str = "float64"  # exact: the precision the estimator computes in (sets the tolerance)
    nearest: str = "none"  # exact: the named direction with the largest cosine to E[g] (reported when biased)
    nearest_cos: float = math.nan  # exact: that cosine
    p_value: float = math.nan  # mc only
    ci_low: float = math.nan  # mc: CI of the relative bias along the exact bias (biased) or along grad KL
    ci_high: float = math.nan
    estimated_rel_bias: float = math.nan  # mc: relative bias along grad KL, point estimate
    detectable_rel_bias: float = math.nan  # mc: smallest relative bias detected with power 0.9
    consistent_with: list[str] = field(default_factory=list)  # mc: directions the test does not reject


@dataclass
class CheckReport:
    """Verdict of ``check_estimator`` over K models.

    Exact mode: ``unbiased`` only when every model's expected gradient equals grad KL(pi || pi_ref) to the dtype's
    tolerance; ``rescaled`` / ``zero`` / ``biased`` / ``undefined`` otherwise. Monte Carlo mode: ``biased`` when the
    test rejects on some model (Bonferroni over models at family-wise ``alpha``), otherwise ``no bias detected``
    with the smallest relative bias the test could detect at power 0.9: never "unbiased".
    """

    estimator: str
    placement: str
    level: str
    credit: str | None
    mode: str
    verdict: str
    matches: str
    worst_rel_bias: float
    variance_ratio: float
    p_value: float
    detectable_rel_bias: float
    alpha: float
    samples: int
    models: list[ModelCheck]

    @property
    def unbiased(self) -> bool:
        """Exact mode only: the estimator is unbiased on every model."""
        return self.verdict == "unbiased"

    @property
    def passed(self) -> bool:
        """Exit status 0: unbiased (exact) or no bias detected (mc)."""
        return self.verdict in ("unbiased", "no bias detected")

    @property
    def exit_code(self) -> int:
        """0 unbiased / no bias detected, 1 biased / rescaled / zero, 2 undefined (the toy's true gradient is 0)."""
        return 0 if self.passed else (2 if self.verdict == "undefined" else 1)

    def as_dict(self) -> dict:
        from ..core.io import jsonable

        return jsonable(asdict(self))

    def to_frame(self):
        """One row per model (pandas DataFrame), with the report's configuration repeated on each row."""
        import pandas as pd

        rows = [
            {"estimator": self.estimator, "placement": self.placement, "level": self.level, "credit": self.credit,
             "mode": self.mode, **{k: v for k, v in asdict(m).items() if k != "consistent_with"},
             "consistent_with": ",".join(m.consistent_with)}
            for m in self.models
        ]
        return pd.DataFrame(rows)

    def format_text(self) -> str:
        cfg = f"{self.estimator} in {self.placement} ({self.level}{', ' + self.credit if self.credit else ''})"
        head = self.verdict.upper()
        if self.mode == "mc" and self.verdict == "no bias detected":
            head += f" (smallest detectable relative bias {self.detectable_rel_bias:.3g} at power 0.9)"
        factors = {m.factor for m in self.models if m.verdict == "rescaled"}
        if self.verdict == "rescaled" and len(factors) == 1:
            head += f" x{format_factor(factors.pop())}"
        lines = [f"{cfg}: {head} ({self.mode} mode, {len(self.models)} models)"]
        if self.verdict == "undefined":
            lines.append("  grad KL(pi || pi_ref) is zero to round-off (the policy equals the reference) on "
                         + ", ".join(f"{m.model}" for m in self.models if m.verdict == "undefined")
                         + ": no relative bias, test or variance ratio is defined; use --kl-scale > 0")
            if all(m.verdict == "undefined" for m in self.models):
                return "\n".join(lines)
        if self.matches != "none":
            what = "expected gradient follows" if self.mode == "exact" else "point estimate closest to"
            lines.append(f"  {what}: {self.matches} = {DIRECTIONS.get(self.matches, '')}")
        lines.append(f"  worst relative bias: {self.worst_rel_bias:.3g}" + (" (exact)" if self.mode == "exact" else ""))
        lines.append(f"  variance relative to k1 in reward: {self.variance_ratio:.3g} (worst model)")
        if self.mode == "exact":
            dts = sorted({m.dtype for m in self.models})
            lines.append(f"  computed in {', '.join(dts)}: relative tolerance {tolerance(getattr(torch, dts[0])):.2g}")
        if self.mode == "mc":
            lines.append(
                f"  p-value (Bonferroni over models): {self.p_value:.3g} at alpha {self.alpha}; "
                f"detectable relative bias (power 0.9): {self.detectable_rel_bias:.3g} with {self.samples} samples"
            )
        for m in self.models:
            s = f"    {m.model} (KL {m.kl:.3g}): {m.verdict}, "
            if self.mode == "exact" and m.verdict == "biased" and m.matches == "none":
                s += f"no named direction, nearest {m.nearest} (cos {m.nearest_cos:.4f})"
            else:
                s += f"{'matches' if self.mode == 'exact' else 'closest'} {m.matches}"
            s += f", rel bias {m.rel_bias:.3g}, var ratio {m.variance_ratio:.3g}"
            if self.mode == "mc":
                s += (
                    f", estimated {m.estimated_rel_bias:.3g} CI [{m.ci_low:.3g}, {m.ci_high:.3g}],"
                    f" p {m.p_value:.3g}, not rejected: {', '.join(m.consistent_with) or 'none'}"
                )
            lines.append(s)
        return "\n".join(lines)


def _models(kind: str, k: int, vocab: int, length: int, seed: int, kl_scale: float):
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of: {', '.join(MODEL_KINDS)}")
    for i in range(k):
        m = kind if kind != "mixed" else ("tabular" if i % 2 == 0 else "neural")
        if m == "tabular" and TabularAR.max_logits < sum(vocab ** (t + 1) for t in range(length)):
            m = "neural"  # too large for a table: the shared-parameter model still works
        policy, ref = make_pair(m, vocab, length, seed=seed + i, kl_scale=kl_scale)
        yield f"{m}(V={vocab}, T={length}, seed={seed + i})", policy, ref


def _enumerable(policy: AutoregressiveModel) -> bool:
    n_params = 0 if policy.closed_form_grads else policy.n_params()
    try:
        check_enumerable(policy.vocab_size, policy.length, n_params)
        return True
    except EnumerationTooLarge:
        return False


def _variance_ratio(variance: float, base: float, base_size2: float) -> float:
    """variance / base, nan when the baseline's variance is round-off of its second moment ``base_size2`` (k1 in
    the reward has no variance when the policy equals the reference: there is no scale to compare with)."""
    return variance / base if base > ROUNDOFF_COV * EPS64 * base_size2 else math.nan


def _check_exact(config: KLConfig, baseline: KLConfig, label: str, policy, ref) -> ModelCheck:
    engine = ExactEngine(policy, ref)
    r, b = engine.evaluate(config), engine.evaluate(baseline)
    ratio = _variance_ratio(r.variance, b.variance, b.variance + float(b.expected_grad @ b.expected_grad))
    return ModelCheck(
        label, r.verdict, r.matches, r.rel_bias, r.variance, ratio, kl=engine.truths().kl_reverse,
        factor=r.factor, dtype=r.info.dtype, nearest=r.info.nearest, nearest_cos=r.info.nearest_cos,
    )


def _ci_along(m: Moments, u: Tensor, shift: float, scale: float, alpha: float) -> tuple[float, float, float]:
    """(mean, low, high): normal (1 - alpha) interval of E[(u . g - shift) / scale] from streamed moments."""
    from scipy import stats as st

    mean = (float(u @ m.mean) - shift) / scale
    se = math.sqrt(max(float(u @ m.cov @ u), 0.0) / m.n) / scale
    h = st.norm.ppf(1 - alpha / 2) * se
    return mean, mean - h, mean + h


def _check_mc(config: KLConfig, baseline: KLConfig, label: str, policy, ref, n: int, alpha: float, seed: int,
              progress: bool = False):
    """Monte Carlo check on one model at level ``alpha`` (already Bonferroni-corrected by the caller). Every
    sample set is streamed into ``Moments`` chunk by chunk: memory does not grow with n."""
    from ..engines.montecarlo import MonteCarloEngine

    mc = MonteCarloEngine(policy, ref)
    gen = torch.Generator().manual_seed(seed)
    x = mc.moments(config, n, gen, progress=progress)  # Moments of (n, P) samples
    base = mc.moments(baseline, min(n, 20_000), gen)
    along = None
    enumerable = _enumerable(policy)
    if enumerable:
        engine = ExactEngine(policy, ref)
        tr = engine.truths()
        kl, undefined = tr.kl_reverse, tr.undefined
        exact_result = engine.evaluate(config)
        rel_exact = exact_result.rel_bias
        refs = {name: (d, None) for name, d in tr.directions.items()}
        truth = tr.grad_reverse
        b = exact_result.expected_grad - truth
        if exact_result.verdict in ("biased", "rescaled", "zero"):  # a fixed bias direction: CI along it
            u = b / b.norm()
            along = _ci_along(x, u, float(truth @ u), float(truth.norm()), alpha)
    else:
        rel_exact = math.nan
        with torch.no_grad():
            y = mc.sample(min(n, 20_000), gen)  # (m, T) tokens; log-probabilities in slices of rows below
            lp, lp_ref = (
                torch.cat([m.log_probs(c).gather(-1, c[..., None]).squeeze(-1).sum(-1) for c in y.split(4096)])
                for m in (policy, ref)
            )  # (m,) log pi(y), log pi_ref(y)
        log_ratio = lp - lp_ref  # (m,)
        kl = float(log_ratio.mean())  # unbiased k1 estimate of the sequence KL
        # policy == reference on every sampled response (each log-ratio is round-off of its log-probabilities): the
        # true gradient is zero as far as the samples can tell
        undefined = mean_is_exact(log_ratio, float(lp_ref.norm()))
    if undefined:  # grad KL = 0: no relative bias, test or interval means anything
        return ModelCheck(label, "undefined", "none", math.nan, x.var_trace, math.nan, kl=kl)
    if not enumerable:
        refs = {name: (None, mc.direction_moments(name, n, gen))
                for name in ("reverse_kl", "forward_kl", "forward_kl_token", "reverse_kl_token")}
        refs["zero"] = (torch.zeros(x.dim, dtype=torch.float64), None)
    tests = {name: bias_test(x, d, reference_samples=s, alpha=alpha, seed=seed) for name, (d, s) in refs.items()}
    main = tests["reverse_kl"]
    consistent = [name for name, t in tests.items() if not t.biased]
    centres = {name: (d if d is not None else s.mean) for name, (d, s) in refs.items()}
    closest = min(centres, key=lambda name: float((x.mean - centres[name]).norm()))  # Euclidean, point estimate
    return ModelCheck(
        label,
        "biased" if main.biased else "no bias detected",
        closest,
        rel_exact,
        main.variance,
        _variance_ratio(main.variance, base.var_trace, base.size2),
        kl=kl,
        p_value=main.p_value,
        ci_low=main.ci_low if along is None else along[1],
        ci_high=main.ci_high if along is None else along[2],
        estimated_rel_bias=main.along if along is None else along[0],
        detectable_rel_bias=main.detectable_rel_bias,
        consistent_with=consistent,
    )


def check_estimator(
    estimator: Callable | Estimator | str,
    placement: str = "both",
    level: str = "token",
    credit: str | None = "rtg",
    *,
    mode: str = "exact",
    vocab: int = 3,
    length: int = 4,
    models: int = 3,
    samples: int = 20_000,
    seed: int = 0,
    model_kind: str = "mixed",
    kl_scale: float = 1.0,
    alpha: float = 0.01,
    name: str | None = None,
    progress: bool = False,
) -> CheckReport:
    """Is ``estimator`` placed this way an unbiased estimator of grad KL(pi || pi_ref)? See the module docstring.

    Returns a ``CheckReport``. In mc mode each model's test runs at level alpha / models (Bonferroni), so the
    chance of calling an unbiased estimator biased is at most alpha; a test that does not reject reports
    "no bias detected" with its smallest detectable relative bias.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    if models < 1 or samples < 10:
        raise ValueError("need models >= 1 and samples >= 10")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if vocab < 2 or length < 1:
        raise ValueError(f"need vocab >= 2 and length >= 1, got vocab {vocab}, length {length}")
    if not math.isfinite(kl_scale) or kl_scale < 0:
        raise ValueError(f"kl_scale must be a finite number >= 0, got {kl_scale}")
    from tqdm.auto import tqdm

    est = as_estimator(estimator, name)
    config = make_config(est, placement, level, credit)
    baseline = make_config("k1", "reward", "token", "rtg")
    checks = []
    toys = list(_models(model_kind, models, vocab, length, seed, kl_scale))
    for i, (label, policy, ref) in enumerate(tqdm(toys, desc="check", disable=not progress, leave=False)):
        if mode == "exact":
            checks.append(_check_exact(config, baseline, label, policy, ref))
        else:
            checks.append(
                _check_mc(config, baseline, label, policy, ref, samples, alpha / models, seed + 1000 * i, progress)
            )
    if mode == "exact":
        verdicts = {c.verdict for c in checks}
        verdict = verdicts.pop() if len(verdicts) == 1 else ("undefined" if "undefined" in verdicts else "biased")
        common = [d for d in DIRECTIONS if all(d == c.matches for c in checks)]
        p = detectable = math.nan
    else:
        verdict = next((v for v in ("undefined", "biased") if any(c.verdict == v for c in checks)), "no bias detected")
        # not rejected on every model; the one the point estimates are closest to most often first
        common = [d for d in DIRECTIONS if all(d in c.consistent_with for c in checks)]
        common.sort(key=lambda d: -sum(c.matches == d for c in checks))
        p = math.nan if verdict == "undefined" else min(min(c.p_value for c in checks) * models, 1.0)
        detectable = math.nan if verdict == "undefined" else max(c.detectable_rel_bias for c in checks)
    rel = [c.rel_bias for c in checks if not math.isnan(c.rel_bias)]
    return CheckReport(
        estimator=est.name,
        placement=config.placement.value,
        level=config.level.value,
        credit=config.credit.value if config.credit else None,
        mode=mode,
        verdict=verdict,
        matches=common[0] if common else "none",
        worst_rel_bias=max(rel) if rel else max((abs(c.estimated_rel_bias) for c in checks), default=math.nan),
        variance_ratio=max((c.variance_ratio for c in checks if not math.isnan(c.variance_ratio)), default=math.nan),
        p_value=p,
        detectable_rel_bias=detectable,
        alpha=alpha,
        samples=samples if mode == "mc" else 0,
        models=checks,
    )
