"""Statistics: exact merging of moments, and calibration of the bias test on Gaussian data.

Randomized tests are seeded; each states its failure rate (the probability that it fails for a correct
implementation, over the randomness of its seed choice)."""

import math

import numpy as np
import pytest
import torch

from biaslab.engines.stats import (
    Moments,
    adjust_p_values,
    bias_test,
    binomial_bounds,
    detectable_bias,
    direction_tests,
    mean_ci,
    mse_prediction,
    projection_matrix,
)


def gaussian(n, P, seed, shift=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return shift + scale * torch.randn(n, P, generator=g, dtype=torch.float64)


def test_moments_merge_equals_single_pass():
    x = gaussian(1000, 7, 0, shift=3.0)
    whole = Moments.from_samples(x)
    parts = Moments.from_samples(x[:1]).merge(Moments.from_samples(x[1:400])).merge(Moments.from_samples(x[400:]))
    torch.testing.assert_close(parts.mean, whole.mean, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(parts.m2, whole.m2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(parts.comoment, whole.comoment, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(whole.cov, torch.cov(x.T), rtol=1e-12, atol=1e-12)
    assert whole.var_trace == pytest.approx(float(x.var(0).sum()), rel=1e-12)
    back = Moments.from_state(whole.state())
    assert back.n == 1000 and torch.equal(back.comoment, whole.comoment)


def test_projection_of_moments_is_exact():
    x = gaussian(500, 6, 1)
    q = projection_matrix(torch.ones(6, dtype=torch.float64), 3, seed=2)
    torch.testing.assert_close(q @ q.T, torch.eye(3, dtype=torch.float64))
    a, b = Moments.from_samples(x).project(q), Moments.from_samples(x @ q.T)
    torch.testing.assert_close(a.mean, b.mean)
    torch.testing.assert_close(a.comoment, b.comoment, rtol=1e-12, atol=1e-12)
    assert abs(abs(float(q[0] @ torch.ones(6, dtype=torch.float64))) - math.sqrt(6)) < 1e-12  # reference first


# Failure rate of each calibration test below: < 1e-3 (two-sided binomial bounds at 1e-3).
@pytest.mark.parametrize("P, k", [(3, None), (40, None), (40, 8)])
def test_false_positive_rate_is_alpha_on_gaussian_data(P, k):
    alpha, reps = 0.05, 300
    ref = torch.linspace(-1, 1, P, dtype=torch.float64)
    hits = sum(bias_test(gaussian(200, P, s, shift=ref), ref, alpha=alpha, n_projections=k, ridge=0).biased
               for s in range(reps))
    lo, hi = binomial_bounds(reps, alpha, 1e-3)
    assert lo <= hits <= hi


def test_confidence_interval_coverage_on_gaussian_data():
    reps, alpha = 300, 0.05
    ref = torch.ones(5, dtype=torch.float64)
    true_along = 0.1  # bias 0.1 * ref along the reference
    cover = 0
    for s in range(reps):
        t = bias_test(gaussian(100, 5, 1000 + s, shift=1.1, scale=2.0), ref, alpha=alpha)
        cover += t.ci_low <= true_along <= t.ci_high
    lo, hi = binomial_bounds(reps, 1 - alpha, 1e-3)
    assert lo <= cover <= hi


def test_detectable_bias_is_detected_with_power_point_nine():
    """At the population detectable size, in the worst direction (largest variance), the test's power is 0.9:
    the rejection count over 300 repeats lies within binomial bounds (failure rate 1e-3). The size reported from
    one sample agrees with the population value to within 10%."""
    from biaslab.engines.stats import _noncentrality_for_power

    P, n, reps, alpha = 4, 400, 300, 0.05
    scales = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)
    ref = torch.zeros(P, dtype=torch.float64)
    ref[0] = 1.0
    lam = _noncentrality_for_power(P, float(n - P), alpha, 0.9)  # of the F statistic: n b^T Sigma^-1 b
    d = (lam * 4.0 / n) ** 0.5  # largest per-sample variance 2.0**2, covariance of the mean / n
    probe = bias_test(gaussian(n, P, 0) * scales + ref, ref, alpha=alpha, ridge=0)
    assert abs(probe.detectable_bias / d - 1) < 0.1
    worst = torch.zeros(P, dtype=torch.float64)
    worst[1] = 1.0
    hits = sum(
        bias_test(gaussian(n, P, 10 + s) * scales + ref + d * worst, ref, alpha=alpha, ridge=0).biased
        for s in range(reps)
    )
    lo, hi = binomial_bounds(reps, 0.9, 1e-3)
    assert lo <= hits <= hi


def test_two_sample_test_and_errors():
    ref_samples = gaussian(500, 3, 3, shift=1.0)
    same = bias_test(gaussian(500, 3, 4, shift=1.0), reference_samples=ref_samples, alpha=1e-3)
    far = bias_test(gaussian(500, 3, 5, shift=1.5), reference_samples=ref_samples)
    assert same.n_ref == 500 and not same.biased  # H0 true: fails with probability 1e-3
    assert far.p_value < 1e-10
    with pytest.raises(ValueError, match="reference"):
        bias_test(gaussian(10, 3, 0))
    with pytest.raises(ValueError, match="coordinates"):
        bias_test(gaussian(10, 3, 0), torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        Moments.from_samples(torch.tensor([[float("nan")]]))


def test_mean_ci_and_mse_prediction():
    m, lo, hi = mean_ci(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert m == 2.5 and lo < 2.5 < hi
    assert mse_prediction(0.25, 2.0, 4) == 0.75


def test_streaming_moments_match_numpy_with_a_large_offset():
    """A long stream (200,000 rows, chunks of 1 to 5,000 rows) with a common offset of 1e9 and unit spread: the
    running merge agrees with the correctly rounded mean to a few ulp, and with numpy's two-pass variance and
    covariance to rounding, where accumulating raw sums of squares loses every digit."""
    rng = np.random.default_rng(0)
    x = 1e9 + rng.standard_normal((200_000, 3)) @ np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.2], [0.0, 0.0, 2.0]])
    sizes = rng.integers(1, 5000, size=200)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    bounds = bounds[bounds < len(x)].tolist() + [len(x)]
    chunks = (torch.from_numpy(x[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))
    m = Moments.accumulate(chunks)
    assert m.n == len(x)
    exact_mean = np.array([math.fsum(x[:, j]) / len(x) for j in range(3)])  # correctly rounded sums
    np.testing.assert_allclose(m.mean.numpy(), exact_mean, rtol=0, atol=4 * np.spacing(1e9))  # (numpy's: 1e-5 off)
    np.testing.assert_allclose(m.var.numpy(), x.var(0, ddof=1), rtol=1e-8)
    np.testing.assert_allclose(m.cov.numpy(), np.cov(x.T), rtol=1e-8, atol=1e-8)
    raw = (x * x).sum(0) - len(x) * x.mean(0) ** 2  # the textbook one-pass formula, for contrast
    assert np.abs(raw / (len(x) - 1) - x.var(0, ddof=1)).max() > 1e-2
    one = Moments.empty(3).update(torch.from_numpy(x[:10])).update(torch.from_numpy(x[10:20]))
    torch.testing.assert_close(one.m2, Moments.from_samples(torch.from_numpy(x[:20])).m2, rtol=1e-6, atol=0)


def test_detectable_bias_function_agrees_with_bias_test_and_scales():
    P, n = 4, 400
    scales = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)
    x = gaussian(n, P, 0) * scales
    t = bias_test(x, torch.zeros(P, dtype=torch.float64), ridge=0)
    cov = torch.cov(x.T)
    assert detectable_bias(n, cov) == pytest.approx(t.detectable_bias, rel=1e-9)
    pop = scales**2
    assert detectable_bias(4 * n, pop) == pytest.approx(detectable_bias(n, pop) / 2, rel=0.01)
    worst, best = detectable_bias(n, pop), detectable_bias(n, pop, direction=torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert worst / best == pytest.approx(4.0, rel=1e-9)  # stdev 2 against 0.5
    assert detectable_bias(n, 1.0, alpha=0.01) > detectable_bias(n, 1.0, alpha=0.05)
    two = detectable_bias(n, pop, n_ref=n, cov_ref=pop)  # an estimated reference doubles the variance
    assert two == pytest.approx(math.sqrt(2) * detectable_bias(n, pop), rel=0.05)
    assert detectable_bias(n, torch.zeros(2, 2)) == 0.0
    with pytest.raises(ValueError):
        detectable_bias(1, 1.0)


def test_detectable_bias_along_a_direction_has_power_point_nine():
    """Bias of the size ``detectable_bias(direction=u)`` along u (not the worst direction): rejections over 300
    seeded repeats lie within binomial bounds around 0.9. Failure rate 1e-3."""
    P, n, reps, alpha = 3, 200, 300, 0.05
    scales = torch.tensor([1.0, 3.0, 0.7], dtype=torch.float64)
    u = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64) / math.sqrt(2)
    d = detectable_bias(n, scales**2, alpha, 0.9, direction=u)
    ref = torch.zeros(P, dtype=torch.float64)
    hits = sum(bias_test(gaussian(n, P, 500 + s) * scales + d * u, ref, alpha=alpha, ridge=0).biased
               for s in range(reps))
    lo, hi = binomial_bounds(reps, 0.9, 1e-3)
    assert lo <= hits <= hi


def test_adjust_p_values():
    p = {"a": 0.01, "b": 0.04, "c": 0.03}
    assert adjust_p_values(p) == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    assert adjust_p_values(p, "bonferroni") == pytest.approx({"a": 0.03, "b": 0.12, "c": 0.09})
    with pytest.raises(ValueError, match="holm"):
        adjust_p_values(p, "sidak")


# Failure rate of each calibration test below: < 1e-3 (binomial bounds at 1e-3).
@pytest.mark.parametrize("correction, rate", [("holm", 0.05), ("bonferroni", 0.05 / 3)])
def test_direction_tests_false_alarm_rate(correction, rate):
    """E[g] is the direction "truth"; "far" and "zero" are always rejected. Holm then tests "truth" at the full
    alpha (its false-alarm rate is alpha), Bonferroni at alpha / 3."""
    reps, alpha, n, P = 300, 0.05, 200, 4
    truth = torch.tensor([1.0, -0.5, 0.3, 0.2], dtype=torch.float64)
    dirs = {"truth": truth, "far": -truth, "zero": torch.zeros(P, dtype=torch.float64)}
    alarms = 0
    for s in range(reps):
        res = direction_tests(gaussian(n, P, 2000 + s, shift=truth), dirs, alpha, correction=correction, ridge=0)
        assert res["far"].biased and res["zero"].biased
        alarms += res["truth"].biased
    lo, hi = binomial_bounds(reps, rate, 1e-3)
    assert lo <= alarms <= hi


def test_direction_tests_report():
    truth = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    near = truth + 0.001  # indistinguishable at n = 100
    samples = gaussian(100, 3, 7, shift=truth)
    ref_samples = gaussian(300, 3, 8, shift=truth)  # a sampled direction: two-sample test
    res = direction_tests(samples, {"zero": torch.zeros(3), "near": near, "truth": truth, "sampled": ref_samples})
    assert set(res.consistent) >= {"near", "truth", "sampled"} and "zero" not in res.consistent
    assert res.closest in ("near", "truth", "sampled")
    assert res["sampled"].n_ref == 300 and res["zero"].extra["p_adjusted"] >= res["zero"].p_value
    d = res.as_dict()
    assert d["consistent"] == res.consistent and d["tests"]["truth"]["p_adjusted"] <= 1.0
    with pytest.raises(ValueError):
        direction_tests(samples, {})


def test_samples_without_variance_make_an_exact_test():
    """Every sample equal (e.g. an estimator whose gradient is 0 for every response): the sample mean is E[g] itself,
    so the test is exact: p = 0 and biased when it differs from the reference, p = 1 when it equals it, nothing left
    to detect (it used to divide by the rank 0 of the covariance)."""
    x = torch.zeros(50, 6, dtype=torch.float64)
    ref = torch.arange(1.0, 7.0, dtype=torch.float64)
    off = bias_test(x, ref, alpha=0.01)
    assert off.biased and off.p_value == 0.0 and off.detectable_bias == 0.0 and off.rel_bias == pytest.approx(1.0)
    same = bias_test(x + ref, ref, alpha=0.01)
    assert not same.biased and same.p_value == pytest.approx(1.0) and same.detectable_rel_bias < 1e-12  # round-off
