"""Statistics of per-sample gradient estimates: mergeable moments, bias tests with confidence intervals,
the smallest bias a test can detect, binomial bounds and intervals, and the exact MSE prediction.

Notation: g_1..g_n are i.i.d. per-sample gradient estimates (vectors of P numbers) with mean m = E[g] and
covariance Sigma; r is the reference gradient (exact, or itself estimated from n_r samples of an unbiased
estimator). The bias is b = m - r.

* ``Moments``: n, the mean and centred second moments, merged exactly across processes (``Moments.merge``).
* ``bias_test``: Hotelling's T^2 test of H0: b = 0. With the per-sample covariance S (P x P) and bias estimate
  b_hat = mean - r, T^2 = b_hat^T (S/n)^+ b_hat and (n - p) / (p (n - 1)) T^2 ~ F(p, n - p) under H0 (p = rank,
  Gaussian approximation of the mean, which the CLT makes accurate at the sizes used). When P is large the test
  runs on k orthonormal projections (the reference direction first, then random directions from a seeded
  generator): the projected bias Q b is tested exactly the same way. A two-sample version (reference estimated)
  adds S_r / n_r and uses the chi-square limit.
  It also reports the relative bias along the reference direction, (b . r) / ||r||^2, with a normal confidence
  interval, and the smallest projected-bias norm the test detects with power 0.9 whatever its direction.
* ``detectable_bias``: the smallest bias norm a level-alpha test detects with a given power, from n and the
  covariance alone (before sampling: how many samples does a given bias need?).
* ``direction_tests``: E[g] = d for several named directions d, Holm- (or Bonferroni-) corrected.
* ``mse_prediction``: E||mean_N - r||^2 = ||b||^2 + tr(Sigma) / N.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

# scipy is imported inside the functions that use it: importing it costs ~0.6 s, which `biaslab --help`, the
# exact engine and the audit do not need.

FULL_COV_MAX = 2048  # keep the full comoment matrix up to this many coordinates
RIDGE = 1e-2  # eigenvalue floor of the whitening, relative to the largest (see bias_test)
#: the rank rule (``kept_eigen``): eigenvalues at or below RANK_RTOL x the largest, or ROUNDOFF_COV x eps x E||x||^2
#: (the round-off of a covariance of data of that size), count as zero variance
RANK_RTOL = 1e-10
ROUNDOFF_COV = 64.0
EPS64 = float(torch.finfo(torch.float64).eps)
N_PROJECTIONS = 4  # projections tested when the vector is larger than this


@dataclass
class Moments:
    """Sufficient statistics of n vectors: count, mean (P,), m2 = sum (x - mean)^2 (P,), comoment (P, P) or None."""

    n: int
    mean: Tensor
    m2: Tensor
    comoment: Tensor | None = None

    @classmethod
    def empty(cls, dim: int = 0) -> Moments:
        """Moments of no samples (the start of a running accumulation); merging adopts the other side."""
        z = torch.zeros(dim, dtype=torch.float64)
        return cls(0, z, z.clone(), torch.zeros(dim, dim, dtype=torch.float64) if dim <= FULL_COV_MAX else None)

    @classmethod
    def accumulate(cls, chunks: Iterable[Tensor]) -> Moments:
        """Running moments over an iterable of (n_i, P) chunks: only one chunk is held at a time."""
        m = cls.empty()
        for x in chunks:
            m = m.update(x)
        return m

    def update(self, x: Tensor) -> Moments:
        """These moments merged with those of the rows of ``x`` (n, P) (a new object; ``self`` is unchanged)."""
        return self.merge(Moments.from_samples(x))

    @classmethod
    def from_samples(cls, x: Tensor, full_cov: bool | None = None) -> Moments:
        """Moments of the rows of ``x`` (n, P); the full comoment is kept when P <= FULL_COV_MAX by default."""
        if x.dim() != 2:
            raise ValueError(f"samples must have shape (n, P); got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("samples contain NaN or inf")
        x = x.detach().to(torch.float64)
        full_cov = x.shape[1] <= FULL_COV_MAX if full_cov is None else full_cov
        mean = x.mean(0)  # (P,)
        d = x - mean  # (n, P)
        return cls(x.shape[0], mean, (d * d).sum(0), d.T @ d if full_cov else None)

    def merge(self, other: Moments) -> Moments:
        """Exact combination of two disjoint sets of samples (Chan, Golub, LeVeque's pairwise update).

        Each side holds centred sums (no raw sums of squares), and the cross term uses only the difference of the
        two means, so a large common offset of the data cancels before any square is taken: a long stream merged
        chunk by chunk agrees with a two-pass computation to rounding (tests/test_stats.py). The full comoment
        survives only when both sides keep it."""
        if self.n == 0:
            return other
        if other.n == 0:
            return self
        n = self.n + other.n
        delta = other.mean - self.mean  # (P,)
        f = self.n * other.n / n
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + delta * delta * f
        com = None
        if self.comoment is not None and other.comoment is not None:
            com = self.comoment + other.comoment + torch.outer(delta, delta) * f
        return Moments(n, mean, m2, com)

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    @property
    def var(self) -> Tensor:
        """(P,) unbiased per-coordinate variance of one sample."""
        return self.m2 / max(self.n - 1, 1)

    @property
    def var_trace(self) -> float:
        """tr(Sigma) = E||g - E g||^2, the per-sample variance (unbiased estimate)."""
        return float(self.var.sum())

    @property
    def size2(self) -> float:
        """E||x||^2, the mean squared size of the samples (the scale of the round-off in their covariance)."""
        return (float(self.m2.sum()) + self.n * float(self.mean @ self.mean)) / max(self.n, 1)

    @property
    def cov(self) -> Tensor:
        if self.comoment is None:
            raise ValueError("these moments keep no full covariance (P too large); project the samples first")
        return self.comoment / max(self.n - 1, 1)

    def project(self, q: Tensor) -> Moments:
        """Moments of Q x for a (k, P) matrix Q (exact: needs the full comoment)."""
        com = q @ self.cov @ q.T * max(self.n - 1, 1)  # (k, k)
        return Moments(self.n, q @ self.mean, torch.diagonal(com).clone(), com)

    def state(self) -> dict[str, Tensor]:
        """Tensors for sending between processes (``from_state`` inverts it)."""
        d = {"n": torch.tensor(float(self.n), dtype=torch.float64), "mean": self.mean, "m2": self.m2}
        if self.comoment is not None:
            d["comoment"] = self.comoment
        return d

    @classmethod
    def from_state(cls, d: dict[str, Tensor]) -> Moments:
        return cls(int(round(float(d["n"]))), d["mean"], d["m2"], d.get("comoment"))


def projection_matrix(reference: Tensor, k: int, seed: int = 0) -> Tensor:
    """(k, P) orthonormal rows: the reference direction first, then seeded random Gaussian directions."""
    P = reference.shape[0]
    k = min(k, P)
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(P, k, generator=g, dtype=torch.float64)
    if reference.norm() > 0:
        m[:, 0] = reference.to(torch.float64)
    q, _ = torch.linalg.qr(m)  # (P, k), first column parallel to the reference
    return q.T.contiguous()


@dataclass
class BiasTest:
    """Result of testing H0: E[g] = r.

    Attributes:
        n: samples of g (and ``n_ref`` of the reference, 0 when it is exact).
        bias: (P,) estimated bias b_hat = mean(g) - r (in the full space).
        bias_norm, rel_bias: ||b_hat|| and ||b_hat|| / ||r|| (noisy, biased upward by the noise).
        along, ci_low, ci_high: relative bias along the reference direction (b . r) / ||r||^2 and its
            (1 - alpha) confidence interval.
        statistic, p_value, dof: the test (Hotelling F, or chi-square when the reference is estimated).
        detectable_bias: smallest norm of the (projected) bias detected with power 0.9 at level alpha in the
            worst direction; ``detectable_rel_bias`` = that / ||r||.
        variance: tr(Sigma), the per-sample variance of g.
        biased: p_value < alpha.
        method: "hotelling" on all P coordinates or "projections(k)".
    """

    n: int
    n_ref: int
    bias: Tensor
    bias_norm: float
    rel_bias: float
    along: float
    ci_low: float
    ci_high: float
    statistic: float
    p_value: float
    dof: tuple[float, ...]
    detectable_bias: float
    detectable_rel_bias: float
    variance: float
    alpha: float
    biased: bool
    method: str
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """Every field but ``bias`` and ``extra``; ``along`` is named ``rel_bias_along_reference``."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("bias", "extra")}
        out["dof"] = list(self.dof)
        return {("rel_bias_along_reference" if k == "along" else k): v for k, v in out.items()}


def kept_eigen(cov: Tensor, size2: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
    """The kept eigenspace of a covariance: the one rank rule of every test biaslab runs (``bias_test``,
    ``detectable_bias``, the LLM path's Hotelling tests and their bootstrap resamples).

    An eigenvalue is kept when it exceeds both ``RANK_RTOL`` x the largest (numerical rank) and ``ROUNDOFF_COV`` x
    float64 eps x ``size2``, the mean squared size E||x||^2 of the data the covariance was computed from (the
    round-off a covariance of such data carries: n equal samples give ~1e-33, not 0). Everything at or below is
    treated as exactly zero variance, so the decision does not depend on how a CPU rounds.

    Args:
        cov: (..., k, k) symmetric covariance (per sample, or of the mean).
        size2: E||x||^2 on the same scale as ``cov`` (divided by n for the covariance of the mean); (...,) or a float.

    Returns:
        (evals (..., k), evecs (..., k, k), kept (..., k) bool); eigenvalues ascending, as ``torch.linalg.eigh``.
    """
    evals, evecs = torch.linalg.eigh(cov)
    size2 = torch.as_tensor(size2, dtype=evals.dtype)
    floor = torch.maximum(evals[..., -1:].clamp_min(0) * RANK_RTOL, (ROUNDOFF_COV * EPS64 * size2)[..., None])
    return evals, evecs, evals > floor


def _kept_eigen(s_b: Tensor, size2: float) -> tuple[Tensor, Tensor, float]:
    """Kept eigenvalues (p,), their eigenvectors (k, p) (``kept_eigen``) and the largest eigenvalue."""
    evals, evecs, keep = kept_eigen(s_b, size2)
    return evals[keep], evecs[:, keep], float(evals[keep].max()) if bool(keep.any()) else 0.0


def whitened_sq(b: Tensor, cov: Tensor, size2: Tensor | float, ridge: float = 0.0) -> tuple[Tensor, Tensor]:
    """b^T C^+ b on the kept eigenspace of C (``kept_eigen``), batched over leading dimensions.

    Directions outside the kept eigenspace carry no variance and are left out (a pseudo-inverse); kept eigenvalues
    below ``ridge`` x the largest are raised to it first (``bias_test``'s conservative floor; 0: none).

    Args:
        b: (..., k) vectors; cov: (..., k, k) covariances; size2: E||x||^2 of their data (``kept_eigen``).

    Returns:
        (b^T C^+ b (...,), rank (...,) the number of kept eigenvalues).
    """
    evals, evecs, keep = kept_eigen(cov, size2)
    top = evals[..., -1:].clamp_min(0)
    lam = torch.where(keep, evals.clamp_min(0).maximum(top * ridge), torch.full_like(evals, math.inf))
    z = (evecs.transpose(-1, -2) @ b.unsqueeze(-1)).squeeze(-1)  # (..., k) coordinates in the eigenbasis
    return (z * z / lam).sum(-1), keep.sum(-1)


def mean_is_exact(diff: Tensor, size: float) -> bool:
    """Two means of data of root-mean-square size ``size`` are equal to round-off: ||diff|| <= ROUNDOFF_COV x
    float64 eps x size (the test ``bias_test`` makes when the samples have no variance left)."""
    return float(diff.norm()) <= ROUNDOFF_COV * EPS64 * size


@functools.lru_cache(maxsize=256)
def _noncentrality_for_power(p: int, df2: float | None, alpha: float, power: float) -> float:
    """lambda such that the level-alpha test (F(p, df2) or chi2(p) when df2 is None) has the given power."""
    from scipy import optimize, stats

    if df2 is None:
        crit = stats.chi2.ppf(1 - alpha, p)
        f = lambda lam: stats.ncx2.sf(crit, p, lam) - power
    else:
        crit = stats.f.ppf(1 - alpha, p, df2)
        f = lambda lam: stats.ncf.sf(crit, p, df2, lam) - power
    hi = 1.0
    while f(hi) < 0:
        hi *= 2
    return float(optimize.brentq(f, 1e-9, hi, xtol=1e-8))


def bias_test(
    samples: Tensor | Moments,
    reference: Tensor | None = None,
    *,
    reference_samples: Tensor | Moments | None = None,
    alpha: float = 0.05,
    n_projections: int | None = None,
    seed: int = 0,
    ridge: float = RIDGE,
) -> BiasTest:
    """Test H0: E[g] = r against an exact ``reference`` r, or against the mean of ``reference_samples`` of an
    unbiased estimator (two-sample). ``n_projections`` (default: all coordinates when P <= N_PROJECTIONS, else
    N_PROJECTIONS) runs the test on that many orthonormal projections. See the module docstring for the formulas."""
    from scipy import stats

    if reference is None:
        if reference_samples is None:
            raise ValueError("give an exact reference or reference_samples")
        rs = reference_samples
        reference = rs.mean if isinstance(rs, Moments) else rs.detach().to(torch.float64).mean(0)
    reference = reference.detach().to(torch.float64)
    P = samples.dim if isinstance(samples, Moments) else samples.shape[-1]
    if reference.shape != (P,):
        raise ValueError(f"reference has shape {tuple(reference.shape)}, samples have {P} coordinates")
    k = n_projections if n_projections is not None else min(P, N_PROJECTIONS)
    q = projection_matrix(reference, k, seed) if k < P else None  # (k, P)

    def moments_in_test_space(x: Tensor | Moments) -> tuple[Moments, Moments | None]:
        """(moments in the full space when cheap, moments in the tested space)."""
        if isinstance(x, Moments):
            return x, (x if q is None else x.project(q))
        x = x.detach().to(torch.float64)
        if q is None:
            full = Moments.from_samples(x)
            return full, full
        return Moments.from_samples(x, full_cov=False), Moments.from_samples(x @ q.T)

    m, m_t = moments_in_test_space(samples)
    if m.n < 3:
        raise ValueError(f"need at least 3 samples, got {m.n}")
    mr = mr_t = None
    if reference_samples is not None:
        mr, mr_t = moments_in_test_space(reference_samples)
    bias = m.mean - reference  # (P,)
    ref_norm = float(reference.norm())
    ref_t = reference if q is None else q @ reference
    method = "hotelling" if q is None else f"projections({q.shape[0]})"
    b = m_t.mean - ref_t  # (k,)
    s_b = m_t.cov / m_t.n  # (k, k) covariance of the mean
    size2 = m_t.size2 / m_t.n  # the same scale: E||x||^2 / n
    if mr_t is not None:
        s_b = s_b + mr_t.cov / mr_t.n
        size2 += mr_t.size2 / mr_t.n
    evals, _, _ = _kept_eigen(s_b, size2)
    # Kept eigenvalues below ridge * the largest are raised to it: directions that only rare samples reach have
    # badly underestimated variances, which would make T^2 anti-conservative; the floor makes it conservative.
    t2, rank = whitened_sq(b, s_b, size2, ridge)
    t2, p = float(t2), int(rank)
    if p == 0:  # no variance in any tested direction: the sample mean is E[g] itself, the test is exact
        exact = mean_is_exact(b, max(float(ref_t.norm()), math.sqrt(m_t.size2)))  # equal up to round-off
        stat, p_value, dof, df2 = (0.0 if exact else math.inf), (1.0 if exact else 0.0), (0,), None
    elif mr_t is None and m.n > p + 1:
        df2 = float(m.n - p)
        stat = (m.n - p) / (p * (m.n - 1)) * t2
        p_value = float(stats.f.sf(stat, p, df2))
        dof: tuple[float, ...] = (p, df2)
    else:
        df2, stat = None, t2
        p_value = float(stats.chi2.sf(stat, p))
        dof = (p,)
    # worst-direction detectable bias: the noncentrality of the F (or chi-square) statistic is
    # lambda = b^T S_b^-1 b >= ||b||^2 / max eig(S_b)  (for Hotelling's F, n b^T Sigma^-1 b: no rescaling)
    if p == 0:
        detectable = 0.0  # nothing is left to detect: any bias is seen exactly
    else:
        lam = _noncentrality_for_power(p, df2, alpha, 0.9)
        detectable = math.sqrt(lam * float(evals.max()))  # worst direction: the largest variance

    # relative bias along the reference direction, with a normal CI
    zq = stats.norm.ppf(1 - alpha / 2)
    if ref_norm > 0:
        u = reference / ref_norm
        along = float(bias @ u) / ref_norm

        def var_along(full: Moments, tested: Moments) -> float:  # variance of u . mean (tested row 0 is along u)
            return (float(u @ full.cov @ u) if full.comoment is not None else float(tested.cov[0, 0])) / full.n

        var_u = var_along(m, m_t) + (var_along(mr, mr_t) if mr is not None else 0.0)
        half = zq * math.sqrt(max(var_u, 0.0)) / ref_norm
    else:
        along, half = math.nan, math.nan
    return BiasTest(
        n=m.n,
        n_ref=0 if mr is None else mr.n,
        bias=bias,
        bias_norm=float(bias.norm()),
        rel_bias=float(bias.norm()) / ref_norm if ref_norm > 0 else math.inf,
        along=along,
        ci_low=along - half,
        ci_high=along + half,
        statistic=float(stat),
        p_value=p_value,
        dof=dof,
        detectable_bias=detectable,
        detectable_rel_bias=detectable / ref_norm if ref_norm > 0 else math.inf,
        variance=m.var_trace,
        alpha=alpha,
        biased=p_value < alpha,
        method=method,
    )


def mean_ci(x: Tensor, alpha: float = 0.05) -> tuple[float, float, float]:
    """(mean, low, high) normal confidence interval for the mean of a 1-D sample."""
    from scipy import stats

    x = x.detach().to(torch.float64).reshape(-1)
    mu, se = float(x.mean()), float(x.std(unbiased=True)) / math.sqrt(x.numel())
    h = stats.norm.ppf(1 - alpha / 2) * se
    return mu, mu - h, mu + h


def mse_prediction(bias_norm_sq: float, variance: float, n: int | Tensor) -> float | Tensor:
    """E||mean of N samples - r||^2 = ||b||^2 + tr(Sigma) / N (exact for i.i.d. samples)."""
    return bias_norm_sq + variance / n


def binomial_bounds(n: int, p: float, failure_rate: float = 1e-3) -> tuple[int, int]:
    """Two-sided bounds [lo, hi] holding a Binomial(n, p) count with probability >= 1 - failure_rate."""
    from scipy import stats

    lo = int(stats.binom.ppf(failure_rate / 2, n, p))
    hi = int(stats.binom.isf(failure_rate / 2, n, p))
    return lo, hi


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact two-sided (1 - alpha) binomial confidence interval for k successes in n trials (beta quantiles)."""
    from scipy.stats import beta

    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def detectable_bias(
    n: int,
    cov: Tensor | float,
    alpha: float = 0.05,
    power: float = 0.9,
    *,
    direction: Tensor | None = None,
    n_ref: int = 0,
    cov_ref: Tensor | float | None = None,
) -> float:
    """Smallest bias norm ||b|| that ``bias_test`` at level ``alpha`` detects with probability ``power``.

    Args:
        n: samples of g.
        cov: per-sample covariance of g in the tested space: (k, k), or (k,) variances (diagonal), or a float
            (one coordinate).
        direction: (k,) the bias direction; default the worst one (the largest eigenvalue of the covariance of
            the mean), as ``BiasTest.detectable_bias`` reports.
        n_ref, cov_ref: samples and per-sample covariance of an estimated reference (two-sample test; chi-square).

    With S_b = cov / n (+ cov_ref / n_ref) and p = rank(S_b), the test has noncentrality lambda = b^T S_b^-1 b;
    lambda_p is the value giving the power (F(p, n - p), or chi2(p) for a two-sample test or n <= p + 1), and the
    answer is sqrt(lambda_p / (u^T S_b^+ u)) for the unit direction u (sqrt(lambda_p * max eig S_b) worst case).
    Scales as 1/sqrt(n): detectable_bias(4 n, ...) is about half of detectable_bias(n, ...).
    """

    def as_matrix(c: Tensor | float) -> Tensor:
        c = torch.as_tensor(c, dtype=torch.float64)
        return c.reshape(1, 1) if c.dim() == 0 else (torch.diag(c) if c.dim() == 1 else c)

    if n < 2:
        raise ValueError(f"need n >= 2, got {n}")
    s_b = as_matrix(cov) / n  # (k, k)
    if cov_ref is not None:
        if n_ref < 2:
            raise ValueError("give n_ref >= 2 with cov_ref")
        s_b = s_b + as_matrix(cov_ref) / n_ref
    evals, evecs, _ = _kept_eigen(s_b, 0.0)  # a given covariance: the rank rule alone (no data scale to use)
    p = evals.numel()
    if p == 0:
        return 0.0  # no noise: any bias is detected
    df2 = float(n - p) if cov_ref is None and n > p + 1 else None
    lam = _noncentrality_for_power(p, df2, alpha, power)
    if direction is None:
        return math.sqrt(lam * float(evals.max()))
    u = torch.as_tensor(direction, dtype=torch.float64).reshape(-1)
    u = u / u.norm()
    w = evecs.T @ u  # (p,)
    q = float((w * w / evals).sum())  # u^T S_b^+ u
    return math.sqrt(lam / q) if q > 0 else math.inf


@dataclass
class DirectionTests:
    """One test of H0: E[g] = d per named direction d, corrected for multiple testing.

    Attributes:
        tests: name -> ``BiasTest`` of E[g] = d. Its ``p_value`` is the raw one; ``biased`` is the corrected
            decision at family-wise level ``alpha``; ``extra["p_adjusted"]`` the adjusted p-value. CIs and the
            detectable bias use level alpha / m (Bonferroni, also valid as simultaneous intervals under Holm).
        consistent: names not rejected, in the given order (the directions the data cannot tell from E[g]).
        closest: the direction nearest the point estimate mean(g) in Euclidean norm (``distances``).
        alpha, correction: family-wise level and "holm" or "bonferroni".
    """

    tests: dict[str, BiasTest]
    consistent: list[str]
    closest: str
    distances: dict[str, float]
    alpha: float
    correction: str

    def __getitem__(self, name: str) -> BiasTest:
        return self.tests[name]

    def as_dict(self) -> dict:
        return {
            "alpha": self.alpha,
            "correction": self.correction,
            "consistent": list(self.consistent),
            "closest": self.closest,
            "tests": {
                k: {**t.as_dict(), "p_adjusted": t.extra["p_adjusted"], "distance": self.distances[k]}
                for k, t in self.tests.items()
            },
        }


def adjust_p_values(p_values: Mapping[str, float], correction: str = "holm") -> dict[str, float]:
    """Family-wise adjusted p-values: Holm's step-down, p_(i) -> max_{j <= i} min(1, (m - j + 1) p_(j)) for the
    sorted p-values, or Bonferroni's min(1, m p). Rejecting where adjusted < alpha controls the family-wise
    error rate at alpha for any dependence between the tests."""
    m = len(p_values)
    if correction == "bonferroni":
        return {k: min(1.0, m * p) for k, p in p_values.items()}
    if correction != "holm":
        raise ValueError(f"unknown correction {correction!r}; choose 'holm' or 'bonferroni'")
    out, running = {}, 0.0
    for i, (k, p) in enumerate(sorted(p_values.items(), key=lambda kv: kv[1])):
        running = max(running, min(1.0, (m - i) * p))
        out[k] = running
    return {k: out[k] for k in p_values}


def direction_tests(
    samples: Tensor | Moments,
    directions: Mapping[str, Tensor | Moments],
    alpha: float = 0.05,
    *,
    correction: str = "holm",
    n_projections: int | None = None,
    seed: int = 0,
    ridge: float = RIDGE,
) -> DirectionTests:
    """Test E[g] = d for every named direction at once, family-wise level ``alpha``.

    Args:
        samples: (n, k) per-sample gradients g, or their ``Moments``.
        directions: name -> a (k,) exact direction, or (n_r, k) samples / ``Moments`` of an unbiased estimator of
            it (then the two-sample test of ``bias_test``).
        correction: "holm" (default; uniformly more powerful) or "bonferroni".

    A direction is "consistent" when its corrected test does not reject; with probability >= 1 - alpha the true
    E[g] (if it is one of the directions) is among them. ``closest`` names the direction nearest the point
    estimate (reports print it beside the consistent set).
    """
    if not directions:
        raise ValueError("give at least one direction")
    level = alpha / len(directions)
    tests: dict[str, BiasTest] = {}
    for name, d in directions.items():
        exact = isinstance(d, Tensor) and d.dim() == 1
        tests[name] = bias_test(
            samples,
            d if exact else None,
            reference_samples=None if exact else d,
            alpha=level,
            n_projections=n_projections,
            seed=seed,
            ridge=ridge,
        )
    adjusted = adjust_p_values({k: t.p_value for k, t in tests.items()}, correction)
    for k, t in tests.items():
        t.alpha, t.biased = alpha, adjusted[k] < alpha
        t.extra["p_adjusted"] = adjusted[k]
        t.extra["correction"] = correction
    distances = {k: t.bias_norm for k, t in tests.items()}  # ||mean(g) - d|| (d's mean when sampled)
    return DirectionTests(
        tests=tests,
        consistent=[k for k, t in tests.items() if not t.biased],
        closest=min(distances, key=distances.get),
        distances=distances,
        alpha=alpha,
        correction=correction,
    )
