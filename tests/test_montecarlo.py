"""Monte Carlo engine: per-sample gradients agree with the exact engine; calibration of the statistics.

Failure rates: every randomized test here uses fixed seeds; the thresholds are binomial bounds at failure
rate 1e-3 (coverage, false positives) or z = 4 standard errors (two-sided, ~6e-5)."""

import pytest
import torch

from biaslab import ExactEngine, make_config, make_pair
from biaslab.engines.montecarlo import MonteCarloEngine
from biaslab.engines.stats import bias_test, binomial_bounds, mse_prediction, projection_matrix

CONFIGS = [("k1", "reward", "token", "rtg"), ("k3", "loss", "token", None), ("k2", "both", "sequence", "full"),
           ("rb", "both", "token", "rtg"), ("k3_st_k2", "loss", "token", None)]


@pytest.mark.parametrize("model", ["tabular", "neural"])
def test_per_sample_gradients_average_to_the_exact_expectation(model):
    """Exact identity: the pi-weighted mean of the MC engine's per-sample gradients over every sequence is E[g]."""
    policy, ref = make_pair(model, 3, 3, seed=4, kl_scale=0.8)
    engine, mc = ExactEngine(policy, ref), MonteCarloEngine(policy, ref)
    q = projection_matrix(engine.truths().grad_reverse, 5, seed=1)
    for spec in CONFIGS:
        cfg = make_config(*spec)
        g = mc.grads_for(cfg, engine.tokens)  # (N, P)
        r = engine.evaluate(cfg)
        torch.testing.assert_close(engine.weights @ g, r.expected_grad, rtol=1e-10, atol=1e-12)
        second = float(engine.weights @ (g * g).sum(1)) - float(r.expected_grad @ r.expected_grad)
        assert abs(second - r.variance) < 1e-10 * max(1, r.variance)
        torch.testing.assert_close(mc.grads_for(cfg, engine.tokens, q), g @ q.T, rtol=1e-10, atol=1e-12)


def test_sampling_is_seeded_and_matches_model_probabilities():
    policy, ref = make_pair("tabular", 2, 3, seed=0)
    mc = MonteCarloEngine(policy, ref)
    a = mc.sample(2000, torch.Generator().manual_seed(5))
    b = mc.sample(2000, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    engine = ExactEngine(policy, ref)
    n = 40_000
    y = mc.sample(n, torch.Generator().manual_seed(6))
    index = (y * torch.tensor([4, 2, 1])).sum(1)
    freq = torch.bincount(index, minlength=8).double() / n
    p = engine.weights
    assert ((freq - p).abs() <= 4 * (p * (1 - p) / n).sqrt()).all()  # z = 4 per cell


def _chunks(mc, cfg, reps, n, seed):
    x = mc.sample_grads(cfg, reps * n, torch.Generator().manual_seed(seed))
    return x.view(reps, n, -1)


def test_confidence_intervals_cover_the_exact_value():
    """95% CIs of the relative bias along grad KL cover the exact value within binomial bounds (200 repeats)."""
    policy, ref = make_pair("tabular", 3, 3, seed=0, kl_scale=1.0)
    engine, mc = ExactEngine(policy, ref), MonteCarloEngine(policy, ref)
    truth = engine.truths().grad_reverse
    reps = 200
    lo, hi = binomial_bounds(reps, 0.95, 1e-3)
    for spec in [("k1", "reward", "token", "rtg"), ("k3", "loss", "token", None)]:
        cfg = make_config(*spec)
        exact_along = float((engine.evaluate(cfg).expected_grad - truth) @ truth) / float(truth @ truth)
        xs = _chunks(mc, cfg, reps, 1000, seed=11)
        cover = sum(bias_test(x, truth, alpha=0.05).ci_low <= exact_along <= bias_test(x, truth).ci_high for x in xs)
        assert lo <= cover <= hi, (cfg.label, cover)


def test_false_positive_rate_on_unbiased_configurations():
    """H0 true (k1 in reward, k3 in reward + loss): rejections at alpha = 0.05 stay at or below alpha.

    The eigenvalue floor makes the test conservative, so the bound checked is the upper binomial bound
    (and the rate is not zero: the test is not vacuous)."""
    policy, ref = make_pair("tabular", 3, 3, seed=0, kl_scale=1.0)
    engine, mc = ExactEngine(policy, ref), MonteCarloEngine(policy, ref)
    truth = engine.truths().grad_reverse
    reps = 200
    _, hi = binomial_bounds(reps, 0.05, 1e-3)
    total = 0
    for spec in [("k1", "reward", "token", "rtg"), ("k3", "both", "token", "rtg")]:
        hits = sum(bias_test(x, truth, alpha=0.05).biased for x in _chunks(mc, make_config(*spec), reps, 1000, 21))
        assert hits <= hi, (spec, hits)
        total += hits
    assert total >= 1


def test_power_against_k3_in_loss():
    """k3 in loss (token) at N = 2000 samples on this toy (exact relative bias ~0.3): power >= 0.9."""
    policy, ref = make_pair("tabular", 3, 3, seed=0, kl_scale=1.0)
    engine, mc = ExactEngine(policy, ref), MonteCarloEngine(policy, ref)
    cfg = make_config("k3", "loss", "token")
    assert engine.evaluate(cfg).rel_bias > 0.1
    truth = engine.truths().grad_reverse
    reps = 100
    hits = sum(bias_test(x, truth, alpha=0.05).biased for x in _chunks(mc, cfg, reps, 2000, 31))
    lo, _ = binomial_bounds(reps, 0.9, 1e-3)
    assert hits >= lo and hits / reps >= 0.9


def test_mse_against_n_follows_the_exact_prediction():
    """E||mean_N - grad KL||^2 = ||b||^2 + tr Cov / N: checked within 4 standard errors over 300 repeats."""
    policy, ref = make_pair("tabular", 3, 3, seed=2, kl_scale=1.0)
    engine, mc = ExactEngine(policy, ref), MonteCarloEngine(policy, ref)
    truth = engine.truths().grad_reverse
    cfg = make_config("k3", "loss", "token")
    r = engine.evaluate(cfg)
    b2 = float((r.expected_grad - truth).norm() ** 2)
    for n in (10, 100):
        errs = ((_chunks(mc, cfg, 300, n, 41 + n).mean(1) - truth) ** 2).sum(1)  # (300,)
        pred = mse_prediction(b2, r.variance, n)
        assert abs(float(errs.mean()) - pred) < 4 * float(errs.std()) / 300**0.5


def test_large_toy_beyond_enumeration_against_the_rao_blackwell_reference():
    """V = 50, T = 20 (50**20 sequences): k1 in reward agrees with the unbiased RB reference; k3 in loss does not."""
    policy, ref = make_pair("neural", 50, 20, seed=0, kl_scale=0.5)
    mc = MonteCarloEngine(policy, ref)
    g = torch.Generator().manual_seed(0)
    q = projection_matrix(torch.ones(mc.n_params, dtype=torch.float64), 4, seed=3)
    rb = mc.reference_grads(3000, g, projection=q)  # (n, 4)
    k1 = mc.sample_grads(make_config("k1", "reward", "token", "rtg"), 3000, g, projection=q)
    k3 = mc.sample_grads(make_config("k3", "loss", "token"), 3000, g, projection=q)
    assert not bias_test(k1, reference_samples=rb, alpha=1e-3).biased  # false alarm rate <= 1e-3
    assert bias_test(k3, reference_samples=rb, alpha=1e-3).p_value < 1e-4


def test_behaviour_policy_with_importance_weights_is_unbiased():
    """E_mu[rho g] = E_pi[g]: k1 in reward (from the current log-probs) sampled from a stale policy, weighted by the
    detached sequence ratio rho = pi/mu; the plain on-policy formula sampled from mu is biased. Level 1e-4 each."""
    from biaslab.core.recipes import Recipe

    policy, ref = make_pair("tabular", 3, 3, seed=1, kl_scale=0.7)
    behaviour = policy.perturbed(0.3, seed=99)
    engine = ExactEngine(policy, ref)
    mc = MonteCarloEngine(policy, ref, behaviour=behaviour)
    weighted = Recipe(
        reward_estimator="k1", reward_coef=1.0, reward_kl_at="current", pg_ratio="sequence",
        pg_ratio_grad="detached", pg_agg="token-sum",
    )
    x = mc.sample_grads(weighted, 20_000, torch.Generator().manual_seed(8))
    assert not bias_test(x, engine.truths().grad_reverse, alpha=1e-4).biased
    x = mc.sample_grads(make_config("k1", "reward"), 20_000, torch.Generator().manual_seed(9))
    assert bias_test(x, engine.truths().grad_reverse, alpha=1e-4).biased
