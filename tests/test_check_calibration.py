"""`check --mode mc` as a statistical test: its family-wise false-alarm rate over models (Bonferroni) and its
direction reports on a toy too large to enumerate, where every reference direction is itself sampled."""

import pytest

from biaslab.engines.stats import binomial_bounds
from biaslab.workflows.check import check_estimator

FAILURE_RATE = 1e-3  # each binomial-bound assertion fails by chance with probability <= 1e-3


@pytest.mark.slow
def test_family_wise_false_alarm_rate_is_alpha_over_models():
    """An unbiased configuration (k1 in the reward) checked on 4 models at family-wise alpha = 0.2, 120 times:
    the rejection rate stays within the binomial bounds of 0.2. Without the Bonferroni correction each model
    would be tested at 0.2 and the family-wise rate would be about 1 - 0.8**4 = 0.59."""
    alpha, repeats = 0.2, 120
    rejections = sum(
        check_estimator(
            "k1", "reward", mode="mc", samples=1000, models=4, seed=1000 + 10 * i, model_kind="tabular",
            vocab=3, length=3, alpha=alpha,
        ).verdict == "biased"
        for i in range(repeats)
    )
    lo, hi = binomial_bounds(repeats, alpha, FAILURE_RATE)
    assert rejections <= hi, (rejections, hi)
    assert rejections >= 1  # non-vacuous: the test does reject sometimes


@pytest.mark.slow
def test_direction_reports_on_a_toy_too_large_to_enumerate():
    """V = 12, T = 8 (4e8 sequences): the references are sampled (RB reference for grad KL, samples of the
    reference for the forward KL, per-prefix expectations for the token-level ones). k3 in a token-level loss is
    biased and its point estimate is closest to forward_kl_token, the one direction not rejected; swapping the
    forward/reverse token-level labels, or matching the sequence-level forward KL, would fail here."""
    rep = check_estimator(
        "k3", "loss", "token", mode="mc", samples=3000, models=1, seed=0, model_kind="neural", vocab=12, length=8,
    )
    m = rep.models[0]
    assert rep.verdict == "biased" and rep.matches == "forward_kl_token" == m.matches
    assert m.consistent_with == ["forward_kl_token"]
    ok = check_estimator(
        "k3", "both", mode="mc", samples=3000, models=1, seed=0, model_kind="neural", vocab=12, length=8,
    )
    assert ok.verdict == "no bias detected" and ok.matches == "reverse_kl"
    assert 0 < ok.detectable_rel_bias < 0.5
