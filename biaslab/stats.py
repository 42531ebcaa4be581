"""Statistics of per-sample gradient estimates: mergeable moments, bias tests with confidence intervals,
the smallest bias a test can detect, and the exact MSE prediction.

Notation: g_1..g_n are i.i.d. per-sample gradient estimates (vectors of P numbers) with mean m = E[g] and
covariance Sigma; r is the reference gradient (exact, or itself estimated from n_r samples of an unbiased
estimator). The bias is b = m - r.

* ``Moments``: n, the mean and centred second moments, merged exactly (Chan et al.) so that statistics gathered
  on several processes combine into the ones a single process would have computed.
* ``bias_test``: Hotelling's T^2 test of H0: b = 0. With the per-sample covariance S (P x P) and bias estimate
  b_hat = mean - r, T^2 = b_hat^T (S/n)^+ b_hat and (n - p) / (p (n - 1)) T^2 ~ F(p, n - p) under H0 (p = rank,
  Gaussian approximation of the mean, which the CLT makes accurate at the sizes used). When P is large the test
  runs on k orthonormal projections (the reference direction first, then random directions from a seeded
  generator): the projected bias Q b is tested exactly the same way. A two-sample version (reference estimated)
  adds S_r / n_r and uses the chi-square limit.
  It also reports the relative bias along the reference direction, (b . r) / ||r||^2, with a normal confidence
  interval, and the smallest projected-bias norm the test detects with power 0.9 whatever its direction.
* ``mse_prediction``: E||mean_N - r||^2 = ||b||^2 + tr(Sigma) / N.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
from scipy import optimize, stats
from torch import Tensor

FULL_COV_MAX = 2048  # keep the full comoment matrix up to this many coordinates
RIDGE = 1e-2  # eigenvalue floor of the whitening, relative to the largest (see bias_test)
N_PROJECTIONS = 4  # projections tested when the vector is larger than this


@dataclass
class Moments:
    """Sufficient statistics of n vectors: count, mean (P,), m2 = sum (x - mean)^2 (P,), comoment (P, P) or None."""

    n: int
    mean: Tensor
    m2: Tensor
    comoment: Tensor | None = None

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
        """Exact combination of two disjoint sets of samples (Chan, Golub, LeVeque)."""
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
    def cov(self) -> Tensor:
        if self.comoment is None:
            raise ValueError("these moments keep no full covariance (P too large); project the samples first")
        return self.comoment / max(self.n - 1, 1)

    @property
    def se(self) -> Tensor:
        """(P,) standard error of each coordinate of the mean."""
        return (self.var / self.n).sqrt()

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
        return {
            "n": self.n,
            "n_ref": self.n_ref,
            "bias_norm": self.bias_norm,
            "rel_bias": self.rel_bias,
            "rel_bias_along_reference": self.along,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "statistic": self.statistic,
            "p_value": self.p_value,
            "dof": list(self.dof),
            "detectable_bias": self.detectable_bias,
            "detectable_rel_bias": self.detectable_rel_bias,
            "variance": self.variance,
            "alpha": self.alpha,
            "biased": self.biased,
            "method": self.method,
        }


def _as_moments(x: Tensor | Moments) -> Moments:
    return x if isinstance(x, Moments) else Moments.from_samples(x)


@functools.lru_cache(maxsize=256)
def _noncentrality_for_power(p: int, df2: float | None, alpha: float, power: float) -> float:
    """lambda such that the level-alpha test (F(p, df2) or chi2(p) when df2 is None) has the given power."""
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
    power: float = 0.9,
    ridge: float = RIDGE,
) -> BiasTest:
    """Test H0: E[g] = r against an exact ``reference`` r, or against the mean of ``reference_samples`` of an
    unbiased estimator (two-sample). ``n_projections`` (default: all coordinates when P <= 64, else 16) runs the
    test on that many orthonormal projections. See the module docstring for the formulas."""
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
    if mr_t is not None:
        s_b = s_b + mr_t.cov / mr_t.n
    evals, evecs = torch.linalg.eigh(s_b)
    keep = evals > evals.max().clamp_min(1e-300) * 1e-10
    p = int(keep.sum())
    # Eigenvalues below ridge * the largest are raised to it: directions that only rare samples reach have
    # badly underestimated variances, which would make T^2 anti-conservative; the floor makes it conservative.
    floor = evals[keep].clamp_min(float(evals.max()) * ridge)
    z = evecs[:, keep].T @ b / floor.sqrt()  # whitened bias, (p,)
    t2 = float(z @ z)
    if mr_t is None and m.n > p + 1:
        df2 = float(m.n - p)
        stat = (m.n - p) / (p * (m.n - 1)) * t2
        p_value = float(stats.f.sf(stat, p, df2))
        dof: tuple[float, ...] = (p, df2)
    else:
        df2, stat = None, t2
        p_value = float(stats.chi2.sf(stat, p))
        dof = (p,)
    # worst-direction detectable bias: lambda = b^T S_b^-1 b >= ||b||^2 / max eig(S_b)
    lam = _noncentrality_for_power(p, df2, alpha, power)
    if df2 is not None:
        lam *= (m.n - 1) / (m.n - p)  # F statistic scale -> T^2 scale
    detectable = math.sqrt(lam * float(evals[keep].max()))  # worst direction: the largest variance

    # relative bias along the reference direction, with a normal CI
    zq = stats.norm.ppf(1 - alpha / 2)
    if ref_norm > 0:
        u = reference / ref_norm
        along = float(bias @ u) / ref_norm
        var_u = float(u @ m.cov @ u) / m.n if m.comoment is not None else float(m_t.cov[0, 0]) / m.n
        if mr is not None:
            var_u += float(u @ mr.cov @ u) / mr.n if mr.comoment is not None else float(mr_t.cov[0, 0]) / mr.n
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
    x = x.detach().to(torch.float64).reshape(-1)
    mu, se = float(x.mean()), float(x.std(unbiased=True)) / math.sqrt(x.numel())
    h = stats.norm.ppf(1 - alpha / 2) * se
    return mu, mu - h, mu + h


def mse_prediction(bias_norm_sq: float, variance: float, n: int | Tensor) -> float | Tensor:
    """E||mean of N samples - r||^2 = ||b||^2 + tr(Sigma) / N (exact for i.i.d. samples)."""
    return bias_norm_sq + variance / n


def binomial_bounds(n: int, p: float, failure_rate: float = 1e-3) -> tuple[int, int]:
    """Two-sided bounds [lo, hi] holding a Binomial(n, p) count with probability >= 1 - failure_rate."""
    lo = int(stats.binom.ppf(failure_rate / 2, n, p))
    hi = int(stats.binom.isf(failure_rate / 2, n, p))
    return lo, hi
