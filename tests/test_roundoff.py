"""Degenerate cases are decided by stated tolerances, never by exact zeros or by whether a solve raises.

Each case is run on exact data and on the same data perturbed by round-off (1e-15 relative noise, another
summation order); the verdict must not change. The rules under test: ``stats.kept_eigen`` (eigenvalues at or below
64 eps E||x||^2 or 1e-10 x the largest are zero variance), ``stats.mean_is_exact`` (means equal to 64 eps x the
data's size), ``verdict.true_gradient_is_zero`` (policy == reference) and the named directions of round-off size.
Every test here failed (wrong verdict or a traceback) before those rules were stated, on at least one CPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from biaslab import ExactEngine, make_config, make_pair
from biaslab.engines.stats import bias_test, kept_eigen
from biaslab.llm.calibration import bootstrap_hotelling, hotelling, resampling_weights
from biaslab.workflows.check import check_estimator
from biaslab.workflows.table import exact_table

D = torch.float64


def roundoff(x: torch.Tensor, seed: int, rel: float = 1e-15) -> torch.Tensor:
    """x with independent relative noise of size ``rel`` on every element."""
    g = torch.Generator().manual_seed(seed)
    return x * (1 + rel * torch.randn(x.shape, generator=g, dtype=D))


def variants(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same samples as stored, with round-off noise, in reversed and in shuffled row order (summation order)."""
    g = torch.Generator().manual_seed(3)
    return {"exact": x, "noise": roundoff(x, 1), "reversed": x.flip(0), "shuffled": x[torch.randperm(x.shape[0],
                                                                                                       generator=g)]}


def test_the_rank_rule_scales_with_the_data():
    """A covariance of constant data is round-off (~1e-33 for unit data, its sign and size set by the CPU): nothing
    is kept, whatever the data's scale; a real variance 1e-12 of unit data is kept."""
    for scale in (1e-30, 1.0, 1e30):
        x = roundoff(torch.full((50, 3), scale, dtype=D), 0)
        cov = torch.cov(x.T)
        _, _, keep = kept_eigen(cov, float((x * x).sum(1).mean()))
        assert not keep.any(), scale
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0), dtype=D) * 1e-6 + 1.0
    _, _, keep = kept_eigen(torch.cov(x.T), float((x * x).sum(1).mean()))
    assert keep.all()


@pytest.mark.parametrize("P", [3, 6])  # full Hotelling, and projections
def test_no_variance_equal_to_the_reference_is_an_exact_pass(P):
    ref = torch.arange(1.0, P + 1.0, dtype=D)
    for name, x in variants(torch.zeros(40, P, dtype=D) + ref).items():
        t = bias_test(x, ref, alpha=0.01)
        assert not t.biased and t.p_value == 1.0 and t.detectable_bias == 0.0, name


@pytest.mark.parametrize("P", [3, 6])
def test_no_variance_away_from_the_reference_is_an_exact_rejection(P):
    ref = torch.arange(1.0, P + 1.0, dtype=D)
    for name, x in variants(torch.zeros(40, P, dtype=D) + 1.001 * ref).items():
        t = bias_test(x, ref, alpha=0.01)
        assert t.biased and t.p_value == 0.0 and t.rel_bias == pytest.approx(1e-3, rel=1e-6), name


def test_rank_deficient_samples_test_the_directions_they_vary_in():
    """Samples varying in 2 of 4 coordinates (the others constant): the test runs on those 2 whether the constant
    coordinates are exact or carry round-off, with the same p-value."""
    g = torch.Generator().manual_seed(5)
    x = torch.zeros(200, 4, dtype=D)
    x[:, :2] = torch.randn(200, 2, generator=g, dtype=D) + 0.3
    x[:, 2:] = 2.0
    ref = torch.tensor([0.3, 0.3, 2.0, 2.0], dtype=D)
    results = {name: bias_test(v, ref, alpha=0.01) for name, v in variants(x).items()}
    for name, t in results.items():
        assert t.dof[0] == 2, name
        assert t.p_value == pytest.approx(results["exact"].p_value, rel=1e-6), name
        assert t.biased == results["exact"].biased


def rows_of_few_groups(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g, dtype=D) + 0.1


def test_bootstrap_of_few_groups_counts_degenerate_resamples_conservatively():
    """8 independent rows in 4 directions: many bootstrap resamples hold 4 or fewer distinct rows and have a singular
    covariance (a LAPACK-dependent crash before). They count as reaching the observed statistic, so the p-value
    never falls below (1 + degenerate) / (1 + B); round-off in the rows changes nothing."""
    x = rows_of_few_groups(8, 4, 0)
    w = resampling_weights(8, 999, 1)
    distinct = (w > 0).sum(1)
    p, degenerate = bootstrap_hotelling(x, w)
    assert degenerate >= int((distinct <= 4).sum()) > 0  # at most 4 distinct rows: rank <= 3 < 4
    assert p >= (1 + degenerate) / 1000
    for name, v in variants(x).items():
        if name in ("exact", "noise"):  # the weights pair with the rows' order
            assert bootstrap_hotelling(v, w) == (p, degenerate), name


def test_fewer_independent_rows_than_directions_test_the_span_they_have():
    """3 rows in 4 directions: the covariance has rank 2 (a singular solve before). Hotelling's test runs on the 2
    directions the rows vary in, F(2, 1), exactly or with round-off."""
    x = rows_of_few_groups(3, 4, 2)
    stat, p, dof, _ = hotelling(x)
    assert dof == (2, 1) and 0 < p < 1
    for name, v in variants(x).items():
        s2, p2, d2, _ = hotelling(v)
        assert d2 == dof and p2 == pytest.approx(p, rel=1e-9), name


def test_rows_without_variance_make_the_llm_test_exact():
    ref = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=D)
    for name, x in variants(torch.zeros(16, 4, dtype=D) + ref).items():
        size2 = float(ref @ ref)  # differences of rows of this size: their round-off is zero, not noise to test
        assert hotelling(x)[1] == 0.0 and hotelling(x - ref, size2)[1] == 1.0, name
        assert bootstrap_hotelling(x - ref, resampling_weights(16, 99, 0), size2)[0] == 1.0, name


def perturbed_pair(model: str, rel: float):
    """policy == reference, the policy's parameters then moved by ``rel`` relative noise (0: exactly equal)."""
    policy, ref = make_pair(model, vocab_size=2, length=3, seed=4, kl_scale=0.0)
    with torch.no_grad():
        for i, prm in enumerate(policy.parameters()):
            prm.copy_(roundoff(prm, 10 + i, rel) if rel else prm)
    return policy, ref


@pytest.mark.parametrize("model", ["tabular", "neural"])
def test_policy_equal_to_the_reference_is_undefined_to_round_off(model):
    """Every configuration of the table is ``undefined`` when the policy equals the reference, exactly or to
    round-off (1e-15 relative noise on its parameters): no verdict rests on a ratio of round-offs."""
    for rel in (0.0, 1e-15):
        _, rows = exact_table(*perturbed_pair(model, rel), ["k1", "k2", "k3"])
        assert {r.verdict for r in rows} == {"undefined"}, (model, rel)
    policy, ref = perturbed_pair(model, 1e-6)  # a real (tiny) distance: every verdict is defined again
    _, rows = exact_table(policy, ref, ["k1", "k3"])
    assert "undefined" not in {r.verdict for r in rows}
    assert {(r.config.label, r.verdict) for r in rows} >= {("k1 in reward (token, rtg)", "unbiased")}


@pytest.mark.parametrize("mode", ["exact", "mc"])
def test_check_with_policy_equal_to_the_reference_says_undefined(mode):
    """``check --kl-scale 0`` used to raise ZeroDivisionError (k1 in the reward has no variance to compare with)."""
    kw = {"samples": 200} if mode == "mc" else {}
    report = check_estimator("k3", placement="loss", mode=mode, models=2, kl_scale=0.0, **kw)
    assert report.verdict == "undefined" and report.exit_code == 2
    assert all(math.isnan(m.variance_ratio) for m in report.models)
    assert "equals the reference" in report.format_text()


def test_named_directions_of_round_off_size_never_match():
    """T = 1: the token-level and sequence-level directions coincide, and with a policy a hair from the reference
    the *differences* between directions are round-off; the verdicts and matches are those of a clear distance,
    exactly or with the policy perturbed by 1e-15 relative (no direction is matched by round-off)."""
    def verdicts(rel):
        policy, ref = make_pair("tabular", vocab_size=3, length=1, seed=1, kl_scale=0.3)
        with torch.no_grad():
            for i, prm in enumerate(policy.parameters()):
                prm.copy_(roundoff(prm, 20 + i, rel) if rel else prm)
        engine = ExactEngine(policy, ref)
        return [(r.verdict, r.matches) for r in (engine.evaluate(make_config(e, pl)) for e in ("k1", "k2", "k3")
                                                  for pl in ("reward", "loss", "both"))]

    assert verdicts(0.0) == verdicts(1e-15)


def test_constant_task_rewards_do_not_move_a_verdict():
    """A GRPO group recipe with a constant task reward (std 0 within every group: R - mean is round-off, not 0, for
    R = 0.1) gives the verdicts of a zero task reward, and so does the same reward with 1e-15 relative noise."""
    from biaslab.core.recipes import Recipe

    policy, ref = make_pair("tabular", vocab_size=2, length=2, seed=0, kl_scale=1.0)
    rules = [Recipe(baseline="grpo", loss_estimator="k3", loss_coef=0.1, pg_agg="seq-mean-token-mean",
                    loss_agg="seq-mean-token-mean"),
             Recipe(baseline="rloo", reward_estimator="k1", reward_coef=0.1)]
    n = 2**2

    def verdicts(reward):
        engine = ExactEngine(policy, ref, group_size=2, task_reward=reward)
        return [engine.evaluate(r).info.describe() for r in rules]

    base = verdicts(None)
    for reward in (torch.full((n,), 0.1, dtype=D), roundoff(torch.full((n,), 0.1, dtype=D), 7)):
        assert verdicts(reward) == base
