"""Stochastic training (``biaslab.workflows.train.MonteCarloTrainer``), seeded.

* The Monte Carlo update is unbiased for the exact expected update (``expected_update``, enumeration): a z-test on
  four projections per configuration (the exact direction and three seeded random ones), two-sided, Bonferroni over
  every comparison in the test at a family-wise failure rate of 1e-3 when the code is right.
* Collapse fractions: one-sided two-proportion z-tests (pooled standard error) at level 1e-3 that k3 in the reward
  collapses more often than k1 in the reward at beta = 2 and than itself at beta = 0.3, and that k1 in the loss with
  an async lag of 10 collapses more often than no KL at all. Seeds are fixed, so each test is deterministic; the
  level says how unlikely the observed difference would be if the two configurations collapsed equally often.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from biaslab import make_pair
from biaslab.workflows.train import (
    MonteCarloTrainer,
    TabularProblem,
    clopper_pearson,
    expected_update,
    parse_config,
    parse_reward,
)

torch.set_num_threads(1)
FAILURE_RATE = 1e-3

UPDATE_CASES = [  # (config, lag behaviour noise, clip)
    ("k1:reward", 0.0, None),
    ("k3:loss", 0.0, None),
    ("k3:both", 0.4, None),
    ("k2:loss", 0.4, 0.2),
    ("k3:reward", 0.4, 0.2),
    ("none", 0.4, 0.2),
]
PROJECTIONS = 4


def toy(V=3, T=3, seed=2, reward="binary:6", kl_scale=0.5):
    policy, ref = make_pair("tabular", V, T, seed=seed, kl_scale=kl_scale)
    pb = TabularProblem(ref, parse_reward(reward, V, T, seed=seed))
    return pb, pb.stack([lvl.detach() for lvl in policy.levels])


def test_mc_mean_update_equals_the_exact_expected_update():
    pb, start = toy()
    z_crit = float(stats.norm.isf(FAILURE_RATE / (2 * len(UPDATE_CASES) * PROJECTIONS)))
    M, beta = 20_000, 0.7
    g = torch.Generator().manual_seed(0)
    for spec, noise, clip in UPDATE_CASES:
        behaviour = start + noise * torch.randn(start.shape, generator=g, dtype=torch.float64)
        config = parse_config(spec)
        exact = expected_update(pb, start, behaviour, config, beta, clip).reshape(-1)  # (P*V,)
        trainer = MonteCarloTrainer(pb, config, beta, samples=1, seeds=M, baseline="none", clip=clip)
        draws = trainer.directions(
            start.expand(M, -1, -1), behaviour.expand(M, -1, -1), torch.Generator().manual_seed(1)
        ).reshape(M, -1)  # (M, P*V): one single-sample update per row
        dirs = torch.randn(PROJECTIONS - 1, exact.numel(), generator=g, dtype=torch.float64)
        dirs = torch.cat([exact.unsqueeze(0), dirs])
        dirs = dirs / dirs.norm(dim=1, keepdim=True)  # (K, P*V)
        x = draws @ dirs.T  # (M, K)
        z = (x.mean(0) - dirs @ exact) / (x.std(0) / math.sqrt(M))
        assert z.abs().max() < z_crit, (spec, z.tolist(), z_crit)


def collapses(config: str, beta: float, **kw) -> int:
    policy, ref = make_pair("tabular", 3, 4, seed=0, kl_scale=1.0)
    pb = TabularProblem(ref, parse_reward("binary:10", 3, 4, seed=0))
    start = pb.stack([lvl.detach() for lvl in policy.levels])
    trainer = MonteCarloTrainer(pb, parse_config(config), beta, samples=8, seeds=64, lr=0.1, seed=0, **kw)
    run = trainer.run(start, steps=300)
    lo, hi = run.mc["collapse_ci95"]
    k = run.mc["collapsed"]
    assert lo <= k / 64 <= hi and (lo, hi) == pytest.approx(clopper_pearson(k, 64))
    return k


def one_sided_more(k1: int, k0: int, n: int) -> tuple[float, float]:
    """(z, critical value) of the pooled two-proportion z-test that k1/n > k0/n."""
    p = (k1 + k0) / (2 * n)
    se = math.sqrt(max(p * (1 - p) * 2 / n, 1e-300))
    return (k1 - k0) / n / se, float(stats.norm.isf(FAILURE_RATE))


def test_k3_in_reward_collapses_more_than_k1_in_reward():
    k3 = collapses("k3:reward", 2.0, baseline="rloo")
    k1 = collapses("k1:reward", 2.0, baseline="rloo")
    z, crit = one_sided_more(k3, k1, 64)
    assert z > crit, (k3, k1, z)
    small = collapses("k3:reward", 0.3, baseline="rloo")  # small beta: the task reward dominates (0/64 seen)
    z, crit = one_sided_more(k3, small, 64)
    assert z > crit, (k3, small, z)


def test_lagged_k1_in_loss_collapses_more_than_no_kl():
    k1_loss = collapses("k1:loss", 1.0, baseline="mean", lag=10, clip=0.2)
    none = collapses("none", 1.0, baseline="mean", lag=10, clip=0.2)
    z, crit = one_sided_more(k1_loss, none, 64)
    assert z > crit, (k1_loss, none, z)
