"""Calibrated statistics of the real-LLM pass, computed from per-sample gradient rows.

Every quantity estimates something about grad KL(pi_theta || pi_ref) (reverse, sequence level), written r.

Inputs (all float64): ``rows[key]`` (n, P) per-sample gradients on the *main* samples y ~ pi_theta, with
``rows["reference"]`` the unbiased Rao-Blackwellized gradient g_ref(y); and *fixed directions* estimated from
independent samples (another random stream): r_dir (a separate estimate of r), ftok_dir (the token-level forward
KL direction that k3 in the loss follows) and f_dir (grad KL(pi_ref || pi), from samples of pi_ref). Because the
directions do not depend on the main samples, tests and intervals on the main samples are exact in the usual
sense (Hotelling T^2, Fieller), with no selection effect.

Per configuration c, with paired differences d(y) = g_c(y) - g_ref(y) (E[d] = E[g_c] - r = b, the bias):

* test: Hotelling T^2 of E[d] = 0 on k orthonormal directions spanning r_dir, ftok_dir - r_dir, f_dir - r_dir
  (+ seeded random ones), p-values Holm-adjusted over the configurations (family-wise level alpha);
* relative bias along the reference u = r_dir / |r_dir|: rho = (b . u) / (r . u), estimated by
  mean(d . u) / mean(g_ref . u) with a Fieller interval (the reference's own noise included; unbounded when
  mean(g_ref . u) is not significantly nonzero); k1 in the loss has rho = -1 exactly, for any u;
* relative bias along the expected bias direction w = (ftok_dir - r_dir) / |.|: (b . w) / (r . u), Fieller;
* |b| / |r| with the noise floor removed (|mean d|^2 - tr S_d / n) and a paired bootstrap percentile interval;
* the smallest relative bias the test detects with power 0.9 in its worst direction ("detectable").

``simulate`` replays the whole analysis on an enumerable model (rows of every response and their exact
probabilities), which measures false alarms and coverage against exact truths.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..engines.stats import EPS64, ROUNDOFF_COV, _noncentrality_for_power, adjust_p_values, mean_is_exact, whitened_sq

#: Smallest number of main samples at which the test and intervals were found calibrated by ``simulate`` on the
#: enumerable tiny GPT-2 (false alarms and Fieller coverage within binomial bounds of nominal; README, tests).
MIN_CALIBRATED_SAMPLES = 256
TEST_DIRECTIONS = 4
POWER = 0.9


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control over the list, any dependence)."""
    return list(adjust_p_values(dict(enumerate(pvalues))).values())


def fieller(a: Tensor, b: Tensor, alpha: float) -> tuple[float, float, float]:
    """(mean(a) / mean(b), low, high): Fieller's (1 - alpha) interval for the ratio of the means of paired samples
    a_i, b_i (Student t with n - 1 degrees of freedom). (-inf, inf) when mean(b) is not significantly nonzero; an
    exclusive (two-ray) set is also reported as (-inf, inf)."""
    n = a.shape[0]
    a, b = a.to(torch.float64), b.to(torch.float64)
    ma, mb = float(a.mean()), float(b.mean())
    saa, sbb = float(a.var()) / n, float(b.var()) / n
    sab = float(((a - ma) * (b - mb)).sum()) / (n - 1) / n
    ratio = ma / mb if mb != 0 else math.nan
    roots = _fieller_roots(ma, mb, saa, sbb, sab, _t2_quantile(1 - alpha / 2, n - 1))
    return (ratio, *roots) if roots is not None else (ratio, -math.inf, math.inf)


def _fieller_roots(ma: float, mb: float, saa: float, sbb: float, sab: float, q2: float) -> tuple[float, float] | None:
    """The two rho with (ma - rho mb)^2 = q2 (saa - 2 rho sab + rho^2 sbb), ascending; None when the set they bound
    is unbounded (mb not significantly nonzero, or an exclusive two-ray set)."""
    qa, qb, qc = mb * mb - q2 * sbb, ma * mb - q2 * sab, ma * ma - q2 * saa
    disc = qb * qb - qa * qc
    if qa <= 0 or disc < 0:
        return None
    root = math.sqrt(disc)
    return (qb - root) / qa, (qb + root) / qa


def _ratio_root(ma: float, mb: float, saa: float, sbb: float, sab: float, q: float) -> float | None:
    """The rho with (ma - rho mb) / sqrt(saa - 2 rho sab + rho^2 sbb) = q, or None when that set is unbounded."""
    if q == 0:
        return ma / mb
    roots = _fieller_roots(ma, mb, saa, sbb, sab, q * q)
    return next((rho for rho in roots or () if (ma - rho * mb) * q > 0), None)


def fieller_bootstrap(a: Tensor, b: Tensor, alpha: float, w: Tensor) -> tuple[float, float, float]:
    """Fieller's interval with bootstrap-t quantiles: the pivot T(rho) = (mean a - rho mean b) / se(rho) is
    studentized in each paired resample (weights ``w`` (B, n)) at the estimate, and its alpha/2 and 1 - alpha/2
    quantiles replace -t and +t. Corrects the skewness of heavy-tailed gradient estimators (k3's ratios)."""
    n = a.shape[0]
    a, b = a.to(torch.float64), b.to(torch.float64)
    ma, mb = float(a.mean()), float(b.mean())
    ratio = ma / mb if mb != 0 else math.nan
    if not math.isfinite(ratio):
        return ratio, -math.inf, math.inf

    def moments(wt: Tensor) -> tuple[Tensor, ...]:  # wt (B, n): means and variances of the means
        mA, mB = wt @ a / n, wt @ b / n
        vA = (wt @ (a * a) / n - mA * mA) / (n - 1)
        vB = (wt @ (b * b) / n - mB * mB) / (n - 1)
        cAB = (wt @ (a * b) / n - mA * mB) / (n - 1)
        return mA, mB, vA, vB, cAB

    mA, mB, vA, vB, cAB = moments(w)
    t_boot = (mA - ratio * mB) / (vA - 2 * ratio * cAB + ratio**2 * vB).clamp_min(1e-300).sqrt()  # (B,)
    q_lo, q_hi = _quantiles(t_boot, alpha)
    one = torch.ones(1, n, dtype=torch.float64)
    m = [float(x[0]) for x in moments(one)]
    ends = [_ratio_root(m[0], m[1], m[2], m[3], m[4], q) for q in (q_lo, q_hi)]
    if any(e is None for e in ends):
        return ratio, -math.inf, math.inf
    return ratio, min(ends), max(ends)


def _t2(x: Tensor, size2: float | None = None) -> tuple[Tensor, Tensor, float, int, float]:
    """Mean (k,), covariance (k, k), Hotelling's T^2 = n m^T S^+ m on the kept eigenspace of S (the rank rule of
    ``biaslab.engines.stats.kept_eigen`` at data scale ``size2``, default E||x||^2 of the rows), its rank p, and the
    scale."""
    n, k = x.shape
    mean = x.mean(0)  # (k,)
    cov = torch.cov(x.T).reshape(k, k)  # (k, k)
    size2 = float((x * x).sum(1).mean()) if size2 is None else size2
    t2, rank = whitened_sq(mean, cov, size2)
    return mean, cov, n * float(t2), int(rank), size2


def hotelling(x: Tensor, size2: float | None = None) -> tuple[float, float, tuple[int, int], Tensor]:
    """Test H0: E[x] = 0 for n rows of k coordinates: (F statistic, p-value, (p, n - p), covariance (k, k)).

    ``size2``: E||.||^2 of the data the rows derive from, the scale of their round-off (default: the rows' own).
    Paired differences d = g_c - g_ref must pass the scale of g_c and g_ref: differences that are round-off of
    equal rows are then zero, not noise to test.

    The test runs on the p directions the rows vary in (``biaslab.engines.stats.kept_eigen``; p = k unless the rows are
    rank-deficient, e.g. fewer independent rows than coordinates). Rows with no variance at all make an exact test:
    p-value 1 when their mean is 0 to round-off (``biaslab.engines.stats.mean_is_exact``), else 0."""
    from scipy import stats

    n, k = x.shape
    mean, cov, t2, p, size2 = _t2(x, size2)
    if p == 0:
        exact = mean_is_exact(mean, math.sqrt(size2))
        return (0.0 if exact else math.inf), (1.0 if exact else 0.0), (0, n), cov
    stat = (n - p) / (p * (n - 1)) * t2
    return stat, float(stats.f.sf(stat, p, n - p)), (p, n - p), cov


def resampling_weights(n: int, n_boot: int, seed: int) -> Tensor:
    """(n_boot, n) float64 multinomial counts of a paired bootstrap (each row sums to n), seeded."""
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(n_boot, n, dtype=torch.float64)
    return w.scatter_add_(1, torch.randint(n, (n_boot, n), generator=g), torch.ones(n_boot, n, dtype=torch.float64))


def bootstrap_hotelling(x: Tensor, w: Tensor, size2: float | None = None) -> tuple[float, int]:
    """Bootstrap-t p-value of H0: E[x] = 0 for x (n, k), and the number of degenerate resamples.

    The p-value is the share of resamples whose Hotelling T^2 about the sample mean, n (m* - m)^T S*^+ (m* - m),
    reaches the observed n m^T S^+ m ((1 + count) / (1 + B)); unlike the F reference distribution it adapts to
    skewed, heavy-tailed per-sample gradients. Both use the kept eigenspace (``biaslab.engines.stats.kept_eigen``). A
    resample whose covariance keeps fewer directions than the observed one (few distinct rows: with few
    independent groups, many resamples) cannot be studentized in those directions; it counts as reaching the
    observed statistic, which makes the p-value conservative (never below (1 + degenerate) / (1 + B)). ``size2``
    as in ``hotelling`` (the resamples' scale is the same data's, reweighted)."""
    n, k = x.shape
    mean, _, t2, p, size2 = _t2(x, size2)
    if p == 0:  # no variance: the exact test of ``hotelling``
        return hotelling(x, size2)[1], 0
    m = w @ x / n  # (B, k)
    second = (w @ (x.unsqueeze(2) * x.unsqueeze(1)).reshape(n, k * k) / n).reshape(-1, k, k)  # (B, k, k)
    cov_b = (second - m.unsqueeze(2) * m.unsqueeze(1)) * n / (n - 1)  # (B, k, k)
    t2_b, rank_b = whitened_sq(m - mean, cov_b, size2)  # (B,), (B,)
    degenerate = rank_b < p
    t2_b = torch.where(degenerate, torch.full_like(t2_b, math.inf), n * t2_b)
    return float((1 + (t2_b >= t2).sum()) / (1 + w.shape[0])), int(degenerate.sum())


@functools.lru_cache(maxsize=256)
def _t2_quantile(p: float, df: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(p, df)) ** 2


def detectable_norm(n: int, cov: Tensor, alpha: float, power: float = POWER, rank: int | None = None) -> float:
    """Smallest bias norm (in the tested directions) the level-alpha Hotelling test detects with ``power`` in its
    worst direction: lambda = n b^T S^-1 b >= n |b|^2 / max eig(S), for the F(p, n - p) test on p = ``rank``
    (default k) directions; 0 when p = 0 (no noise: any bias is seen)."""
    p = cov.shape[0] if rank is None else rank
    if p == 0:
        return 0.0
    lam = _noncentrality_for_power(p, float(n - p), alpha, power)  # of F = (n-p)/(p(n-1)) T^2: n b^T S^-1 b
    return math.sqrt(lam * float(torch.linalg.eigvalsh(cov).max()) / n)


def fixed_directions(r_dir: Tensor, ftok_dir: Tensor, f_dir: Tensor | None, k: int, seed: int) -> Tensor:
    """(k', P) orthonormal rows: r_dir, the expected bias direction ftok_dir - r_dir, f_dir - r_dir, then seeded
    random directions, up to k (fewer when P < k or a direction is degenerate)."""
    P = r_dir.shape[0]
    cols = [r_dir, ftok_dir - r_dir] + ([] if f_dir is None else [f_dir - r_dir])
    basis: list[Tensor] = []
    g = torch.Generator().manual_seed(seed)
    extra = [torch.randn(P, generator=g, dtype=torch.float64) for _ in range(k)]
    for c in [c.to(torch.float64) for c in cols] + extra:
        if len(basis) >= min(k, P):
            break
        v = c.clone()
        for q in basis:
            v -= (q @ v) * q
        if float(v.norm()) > 1e-9 * max(float(c.norm()), 1e-300):
            basis.append(v / v.norm())
    return torch.stack(basis)  # (k', P)


def _unit(v: Tensor) -> Tensor:
    return v / v.norm().clamp_min(1e-300)


def bias_norm_ci(d: Tensor, ref: Tensor, alpha: float, n_boot: int, seed: int) -> tuple[float, float, float]:
    """(|b| / |r|, low, high). Squared norms are estimated without their noise floor, |b|^2 by |mean d|^2 - tr S_d / n
    and |r|^2 by |mean g_ref|^2 - tr S_ref / n (clamped at 0); the interval is a paired bootstrap percentile
    interval (d and g_ref resampled together) of the same statistic with the floor subtracted twice in each
    resample, once for the resampling noise and once for the original sample's, so it centres on the estimate."""
    n = d.shape[0]

    def sq_norm(x: Tensor, w: Tensor, floors: int) -> Tensor:  # x (n, P), w (B, n) weights summing to n
        m = w @ x / n  # (B, P)
        tr = (w @ (x * x).sum(1) / n - (m * m).sum(1)) * n / (n - 1)  # (B,) trace of the resample's covariance
        return ((m * m).sum(1) - floors * tr / n).clamp_min(0)

    def stat(w: Tensor, floors: int) -> Tensor:  # inf where |r|^2 is not distinguishable from its noise floor
        r2 = sq_norm(ref, w, floors)  # (B,); at or below the round-off of E||g_ref||^2 it is 0 (no scale to divide by)
        resolved = r2 > ROUNDOFF_COV * EPS64 * (w @ (ref * ref).sum(1) / n)
        return torch.where(resolved, sq_norm(d, w, floors) / r2.clamp_min(1e-300), torch.inf).sqrt()

    point = float(stat(torch.ones(1, n, dtype=d.dtype), 1)[0])
    if n_boot <= 0:
        return point, math.nan, math.nan
    return point, *_quantiles(stat(resampling_weights(n, n_boot, seed).to(d.dtype), 2), alpha)


def _unbounded(n: int, along: tuple[float, float], toward: tuple[float, float], norm: tuple[float, float]
               ) -> dict[str, str]:
    """Why an interval of ``analyze`` is unbounded (JSON writes its infinite ends as null): interval name -> reason."""
    out = {}
    fieller_why = (f"the reference's mean along its direction is not significantly nonzero at n={n} (Fieller's set is "
                   "the whole line, or two rays): more samples, or a policy farther from the reference")
    for name, ends in (("ci", along), ("toward_ci", toward)):
        if not all(math.isfinite(e) for e in ends):
            out[name] = fieller_why
    if any(math.isinf(e) for e in norm):
        out["rel_bias_norm_ci"] = (f"|grad KL|^2 is not distinguishable from its noise floor in some bootstrap "
                                   f"resamples at n={n}: |b| / |r| is unbounded there")
    return out


def _quantiles(x: Tensor, alpha: float) -> tuple[float, float]:
    """Nearest-rank alpha/2 and 1 - alpha/2 quantiles (infinite values allowed)."""
    s = torch.sort(x).values
    n = s.shape[0]
    lo = s[min(n - 1, max(0, math.ceil(alpha / 2 * n) - 1))]
    hi = s[min(n - 1, max(0, math.ceil((1 - alpha / 2) * n) - 1))]
    return float(lo), float(hi)


@dataclass
class Directions:
    """Fixed directions from samples independent of the main ones (all (P,) float64)."""

    r_dir: Tensor  # an independent estimate of grad KL(pi || pi_ref)
    ftok_dir: Tensor  # token-level forward KL direction (prefix law of pi held fixed)
    f_dir: Tensor | None = None  # grad KL(pi_ref || pi)


def analyze(
    rows: dict[str, Tensor],
    keys: list[str],
    directions: Directions,
    *,
    alpha: float = 0.05,
    k: int = TEST_DIRECTIONS,
    seed: int = 0,
    n_boot: int = 2000,
    norm_ci: bool = True,
    references: dict[str, str] | None = None,
) -> list[dict]:
    """One dict per configuration key (see the module docstring); ``rows["reference"]`` is g_ref on the same
    samples, or ``rows[references[key]]`` for a key whose rows are per group (a group's mean of g_ref: the rows of
    a framework recipe on groups of B responses). Verdicts are at family-wise level ``alpha`` over ``keys``
    (Holm)."""
    q = fixed_directions(directions.r_dir, directions.ftok_dir, directions.f_dir, k, seed)  # (k', P)
    u = _unit(directions.r_dir.to(torch.float64))  # (P,)
    w = _unit((directions.ftok_dir - directions.r_dir).to(torch.float64))  # (P,)
    if n_boot > 0:  # enough resamples that Holm's smallest threshold alpha / m is reachable: p >= 1 / (B + 1)
        n_boot = max(n_boot, math.ceil(4 * len(keys) / alpha))
    boots: dict[int, Tensor | None] = {}
    out = []
    for key in keys:
        ref = rows[(references or {}).get(key, "reference")].to(torch.float64)  # (n, P)
        n = ref.shape[0]
        ref_u = ref @ u  # (n,)
        r_norm = float(ref.mean(0).norm())
        if n not in boots:
            boots[n] = resampling_weights(n, n_boot, seed) if n_boot > 0 else None
        w_boot = boots[n]
        d = rows[key].to(torch.float64) - ref  # (n, P) paired differences
        dq = d @ q.T  # (n, k)
        size2 = max(float(((x @ q.T) ** 2).sum(1).mean()) for x in (rows[key].to(torch.float64), ref))
        stat, p, dof, cov = hotelling(dq, size2)  # round-off of equal rows is judged at the rows' own scale
        ratio_ci = fieller if w_boot is None else functools.partial(fieller_bootstrap, w=w_boot)
        degenerate = 0
        if w_boot is not None:
            p, degenerate = bootstrap_hotelling(dq, w_boot, size2)
        rho, lo, hi = ratio_ci(d @ u, ref_u, alpha)
        tw, tlo, thi = ratio_ci(d @ w, ref_u, alpha)
        bn, blo, bhi = bias_norm_ci(d, ref, alpha, n_boot if norm_ci else 0, seed)
        out.append({
            "config": key,
            "n": n,
            "p_value_raw": p,
            "statistic": stat,
            "dof": list(dof),
            "rel_bias_along_reference": rho,
            "ci_low": lo,
            "ci_high": hi,
            "rel_bias_toward_forward_token": tw,
            "toward_ci_low": tlo,
            "toward_ci_high": thi,
            "rel_bias_norm": bn,
            "rel_bias_norm_ci_low": blo,
            "rel_bias_norm_ci_high": bhi,
            "detectable_rel_bias": detectable_norm(n, cov, alpha / len(keys), rank=dof[0]) / max(r_norm, 1e-300),
            "tested_directions": dof[0],
            "bootstrap_resamples": n_boot,
            "bootstrap_degenerate": degenerate,  # resamples that count as reaching the statistic (conservative)
            "unbounded": _unbounded(n, (lo, hi), (tlo, thi), (blo, bhi)),
            "_cov": cov,
        })
    adjusted = holm([row["p_value_raw"] for row in out])
    for row, p in zip(out, adjusted):
        row.pop("_cov")
        row["p_value"] = p
        row["biased"] = p < alpha
        detectable = row["detectable_rel_bias"]
        row["verdict"] = "biased" if row["biased"] else f"no bias detected (detectable >= {detectable:.2g})"
        row["test_method"] = (f"paired Hotelling T^2 on {q.shape[0]} fixed directions (reverse, forward-token, forward,"
                              f" random; from independent samples), "
                              + (f"bootstrap-t p-value ({n_boot} resamples)" if n_boot > 0 else "F p-value")
                              + f", Holm over {len(keys)} configurations")
    return out


# ---------------------------------------------------------------------------------------------- simulation


@dataclass
class Enumerated:
    """Every response of an enumerable model: per-key gradient rows (N, P), forward rows -grad log pi(y) (N, P),
    probabilities under pi and pi_ref (N,)."""

    rows: dict[str, Tensor]
    forward_rows: Tensor
    pi: Tensor
    pi_ref: Tensor

    def expected(self, key: str) -> Tensor:
        return self.pi @ self.rows[key]


def simulate(
    enum: Enumerated,
    keys: list[str],
    *,
    n: int,
    n_dir: int,
    reps: int,
    alpha: float = 0.05,
    seed: int = 0,
    n_boot: int = 1000,
) -> dict[str, dict[str, float]]:
    """Replay ``analyze`` ``reps`` times on samples drawn from the exact response distributions; per key the
    rejection rate (``reject``) and the coverage of the along-reference and toward-forward Fieller intervals
    (``cover``, ``cover_toward``) against the exact values given each replicate's directions, plus the exact
    relative bias of the first replicate (``truth``). ``any_null_reject``: replicates where some configuration
    with zero exact bias was rejected (the family-wise false alarm rate)."""
    g = torch.Generator().manual_seed(seed)
    r = enum.expected("reference")
    truth_b = {key: enum.expected(key) - r for key in keys}
    null = [key for key in keys if float(truth_b[key].norm()) <= 1e-9 * float(r.norm())]
    counts = {key: {"reject": 0.0, "reject_raw": 0.0, "reject_raw_bonf": 0.0, "cover": 0.0, "cover_toward": 0.0}
              for key in keys}
    any_null = 0
    for _ in range(reps):
        i_dir = torch.multinomial(enum.pi, n_dir, replacement=True, generator=g)
        i_fwd = torch.multinomial(enum.pi_ref, n_dir, replacement=True, generator=g)
        i_main = torch.multinomial(enum.pi, n, replacement=True, generator=g)
        dirs = Directions(enum.rows["reference"][i_dir].mean(0), enum.rows["forward_kl_token"][i_dir].mean(0),
                          enum.forward_rows[i_fwd].mean(0))
        res = analyze({key: enum.rows[key][i_main] for key in [*keys, "reference"]}, keys, dirs, alpha=alpha,
                      seed=int(torch.randint(2**31, (1,), generator=g)), n_boot=n_boot, norm_ci=False)
        u = _unit(dirs.r_dir)
        w = _unit(dirs.ftok_dir - dirs.r_dir)
        rejected_null = False
        for row in res:
            key = row["config"]
            rho = float(truth_b[key] @ u) / float(r @ u)
            tw = float(truth_b[key] @ w) / float(r @ u)
            c = counts[key]
            c["reject"] += row["biased"]
            c["reject_raw"] += row["p_value_raw"] < alpha
            c["reject_raw_bonf"] += row["p_value_raw"] < alpha / len(keys)
            c["cover"] += row["ci_low"] <= rho <= row["ci_high"]
            c["cover_toward"] += row["toward_ci_low"] <= tw <= row["toward_ci_high"]
            rejected_null |= row["biased"] and key in null
        any_null += rejected_null
    out = {key: {m: v / reps for m, v in c.items()} for key, c in counts.items()}
    for key in keys:
        out[key]["null"] = float(key in null)
    out["_family"] = {"any_null_reject": any_null / reps, "reps": float(reps), "n": float(n)}
    return out


__all__ = ["MIN_CALIBRATED_SAMPLES", "Directions", "Enumerated", "analyze", "bias_norm_ci", "detectable_norm",
           "fieller", "fieller_bootstrap", "holm", "hotelling", "simulate", "fixed_directions"]
