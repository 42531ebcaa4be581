"""Statistics: exact merging of moments, and calibration of the bias test on Gaussian data.

Randomized tests are seeded; each states its failure rate (the probability that it fails for a correct
implementation, over the randomness of its seed choice)."""

import math

import pytest
import torch

from biaslab.stats import Moments, bias_test, binomial_bounds, mean_ci, mse_prediction, projection_matrix


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
    from biaslab.stats import _noncentrality_for_power

    P, n, reps, alpha = 4, 400, 300, 0.05
    scales = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)
    ref = torch.zeros(P, dtype=torch.float64)
    ref[0] = 1.0
    lam = _noncentrality_for_power(P, float(n - P), alpha, 0.9) * (n - 1) / (n - P)
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
