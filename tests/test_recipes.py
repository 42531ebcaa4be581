"""Recipes in float64: EOS enumeration, aggregation identities, baselines, off-policy, and the vectorized group
engine against a slow per-group autograd loop. Every expectation is exact (enumeration), so tolerances are
round-off (1e-9 relative)."""

import itertools
import math

import pytest
import torch

from biaslab.core.aggregation import AggregationError, aggregate, nominal_token_weight
from biaslab.core.placements import make_config
from biaslab.core.recipes import Recipe, RecipeError, batch_loss
from biaslab.engines.exact import ExactEngine, count_complete, enumerate_complete
from biaslab.engines.montecarlo import sample_complete
from biaslab.engines.toy import make_pair

RecipeEngine = ExactEngine  # the one engine evaluates recipes too
TOL = 1e-9


def masked_token_logp(model, tokens, mask):
    """(N, T) log pi(y_t | y_<t) on response tokens, 0 on padding (written here, not taken from the engine)."""
    return model.log_probs(tokens).gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * mask


@pytest.fixture(scope="module")
def models():
    policy, ref = make_pair("tabular", 3, 3, seed=3, kl_scale=1.0)
    behaviour = policy.perturbed(0.5, seed=99)
    behaviour.requires_grad_(False)
    return policy, ref, behaviour


def close(a, b, tol=TOL):
    return float((a - b).norm()) <= tol * max(float(b.norm()), 1e-12)


# ---------------------------------------------------------------- variable lengths


@pytest.mark.parametrize("V,T", [(2, 1), (3, 3), (4, 3), (3, 4)])
def test_eos_enumeration_is_complete_and_sums_to_one(V, T):
    policy, _ = make_pair("tabular", V, T, seed=1)
    tokens, mask = enumerate_complete(V, T, eos=V - 1)
    assert tokens.shape[0] == count_complete(V, T, V - 1)
    assert len({tuple(r) for r in (tokens * mask.long()).tolist()}) == tokens.shape[0]
    with torch.no_grad():
        p = masked_token_logp(policy, tokens, mask).sum(-1).exp()
    assert abs(float(p.sum()) - 1) < 1e-12
    lengths = mask.sum(-1).long()
    for row, L in zip(tokens.tolist(), lengths.tolist()):
        assert all(tok != V - 1 for tok in row[: L - 1])  # no EOS before the end
        assert L == T or row[L - 1] == V - 1  # a short response ends with EOS


def test_sampled_lengths_match_enumerated_probabilities():
    """Monte Carlo check of the sampler against the exact length law; z = 4.5 per cell, failure rate < 1e-4."""
    policy, _ = make_pair("tabular", 3, 3, seed=2)
    tokens, mask = enumerate_complete(3, 3, eos=2)
    with torch.no_grad():
        p = masked_token_logp(policy, tokens, mask).sum(-1).exp()
    n = 20000
    _, m = sample_complete(policy, n, eos=2, generator=torch.Generator().manual_seed(0))
    for L in (1, 2, 3):
        exact = float(p[mask.sum(-1) == L].sum())
        freq = float((m.sum(-1) == L).double().mean())
        assert abs(freq - exact) < 4.5 * math.sqrt(exact * (1 - exact) / n)


def test_fixed_length_enumeration_is_all_sequences():
    tokens, mask = enumerate_complete(3, 2, eos=None)
    assert tokens.tolist() == [list(s) for s in itertools.product(range(3), repeat=2)]
    assert bool((mask == 1).all())


# ---------------------------------------------------------------- aggregation


def test_aggregation_modes_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    assert float(aggregate(loss, mask, "token-sum")) == 15.0
    assert float(aggregate(loss, mask, "token-mean")) == 3.0
    assert float(aggregate(loss, mask, "seq-mean-token-sum")) == 7.5
    assert float(aggregate(loss, mask, "seq-mean-token-mean")) == pytest.approx((2.0 + 4.5) / 2, abs=1e-15)
    assert float(aggregate(loss, mask, "seq-mean-token-sum-norm")) == pytest.approx(7.5 / 3, abs=1e-15)
    assert float(aggregate(loss, mask, "constant", horizon=5)) == pytest.approx(15 / (2 * 5), abs=1e-15)


def test_aggregation_identities_on_random_batches():
    g = torch.Generator().manual_seed(0)
    loss = torch.randn(7, 4, 5, generator=g, dtype=torch.float64)
    mask = (torch.rand(7, 4, 5, generator=g) < 0.7).double()
    mask[..., 0] = 1
    # Dr. GRPO's constant normalizer is seq-mean-token-sum-norm
    assert torch.allclose(aggregate(loss, mask, "constant", 9), aggregate(loss, mask, "seq-mean-token-sum-norm", 9))
    # with equal lengths every mode is a multiple of the token sum
    full = torch.ones_like(mask)
    s = aggregate(loss, full, "token-sum")
    assert torch.allclose(aggregate(loss, full, "token-mean") * 4 * 5, s)
    assert torch.allclose(aggregate(loss, full, "seq-mean-token-mean") * 4 * 5, s)
    assert torch.allclose(aggregate(loss, full, "seq-mean-token-sum") * 4, s)
    assert nominal_token_weight("token-mean", 4, 5) == pytest.approx(1 / 20)
    with pytest.raises(AggregationError, match="choose one of"):
        aggregate(loss, mask, "mean-of-means")


# ---------------------------------------------------------------- agreement with the exact core


@pytest.mark.parametrize("estimator,placement", [("k1", "reward"), ("k3", "loss"), ("k2", "loss"), ("k3", "reward")])
def test_single_sample_recipe_equals_exact_engine(models, estimator, placement):
    """G = 1, on-policy, fixed length, REINFORCE form, token-sum: the recipe is the KLConfig of the exact core."""
    policy, ref, _ = models
    if placement == "reward":
        recipe = Recipe(reward_estimator=estimator, reward_coef=1.0, pg_ratio="none", pg_agg="token-sum")
    else:
        recipe = Recipe(loss_estimator=estimator, loss_coef=1.0, loss_agg="token-sum")
    res = RecipeEngine(policy, ref, group_size=1).evaluate(recipe)
    ex = ExactEngine(policy, ref).evaluate(make_config(estimator, placement, "token", "rtg"))
    assert close(res.expected_grad, ex.expected_grad)
    assert abs(res.variance - ex.variance) <= 1e-9 * ex.variance
    assert res.verdict == ex.verdict or (ex.verdict == "zero" and res.verdict == "zero")


def test_neural_model_shared_parameters():
    """The engine is not tied to the tabular parameterization: a GRU with shared weights, EOS, pairs."""
    policy, ref = make_pair("neural", 3, 3, seed=2, kl_scale=1.0)
    eng = RecipeEngine(policy, ref, eos=2, group_size=2)
    assert eng.evaluate(Recipe(reward_estimator="k1", reward_coef=1.0, baseline="rloo")).verdict == "unbiased"
    assert abs(eng.evaluate(Recipe(loss_estimator="k3", loss_coef=1.0)).all_matches["forward_kl_token"] - 1) < 1e-9


# ---------------------------------------------------------------- baselines


@pytest.fixture(scope="module")
def pair_engine(models):
    policy, ref, _ = models
    return RecipeEngine(policy, ref, group_size=2), RecipeEngine(policy, ref, group_size=3)


def test_rloo_keeps_k1_in_reward_unbiased(pair_engine):
    for eng in pair_engine:
        r = eng.evaluate(Recipe(reward_estimator="k1", reward_coef=1.0, baseline="rloo"))
        assert r.verdict == "unbiased" and r.rel_bias < TOL


@pytest.mark.parametrize("credit", ["full", "rtg"])
def test_batch_mean_scales_the_score_term_by_one_minus_one_over_n(pair_engine, credit):
    for eng in pair_engine:
        n = eng.B
        r = eng.evaluate(Recipe(reward_estimator="k1", reward_coef=1.0, reward_credit=credit, baseline="batch_mean"))
        target = (1 - 1 / n) * eng.truths()["reverse_kl"]
        assert close(r.expected_grad, target)
        assert r.verdict == "rescaled" and abs(r.all_matches["reverse_kl"] - (1 - 1 / n)) < 1e-9


def test_grpo_std_division_removes_beta_and_is_biased(models):
    """Dividing by the group std makes the update invariant to beta: E g(beta=2) = E g(beta=1), not twice it."""
    policy, ref, _ = models
    reward = torch.linspace(-1, 1, 27, dtype=torch.float64)  # a fixed task reward per response
    eng = RecipeEngine(policy, ref, group_size=2)
    r1 = eng.evaluate(Recipe(reward_estimator="k1", reward_coef=1.0, baseline="grpo", grpo_eps=1e-300))
    r2 = eng.evaluate(Recipe(reward_estimator="k1", reward_coef=2.0, baseline="grpo", grpo_eps=1e-300))
    assert close(r2.expected_grad, r1.expected_grad)
    assert r1.verdict == "biased" and r2.verdict == "biased"
    # with a task reward, the KL part is divided by each group's std: still not a multiple of grad KL
    eng_r = RecipeEngine(policy, ref, group_size=2, task_reward=reward)
    assert eng_r.evaluate(Recipe(reward_estimator="k1", reward_coef=0.1, baseline="grpo")).verdict == "biased"
    assert eng_r.evaluate(Recipe(reward_estimator="k1", reward_coef=0.1, baseline="rloo")).verdict == "unbiased"


# ---------------------------------------------------------------- importance weights


def test_differentiable_ratio_times_k3_is_per_token_reverse_kl_on_policy(models):
    policy, ref, _ = models
    for eos in (None, 2):
        eng = RecipeEngine(policy, ref, eos=eos)
        for weight in ("ratio", "score"):
            r = eng.evaluate(Recipe(loss_estimator="k3", loss_coef=1.0, loss_weight=weight))
            assert "reverse_kl_token" in r.all_matches and abs(r.all_matches["reverse_kl_token"] - 1) < 1e-9
            assert r.verdict == "biased"  # partial across tokens for T > 1


def test_k3_in_loss_is_token_forward_kl_and_k1_in_reward_unbiased_with_eos(models):
    policy, ref, _ = models
    eng = RecipeEngine(policy, ref, eos=2)
    r = eng.evaluate(Recipe(loss_estimator="k3", loss_coef=1.0))
    assert abs(r.all_matches["forward_kl_token"] - 1) < 1e-9
    assert eng.evaluate(Recipe(reward_estimator="k1", reward_coef=1.0)).verdict == "unbiased"
    # token-mean's random normalizer adds a length bias to the same recipe
    assert eng.evaluate(Recipe(reward_estimator="k1", reward_coef=1.0, pg_agg="token-mean")).verdict == "biased"
    assert eng.evaluate(Recipe(reward_estimator="k1", reward_coef=1.0, pg_agg="constant")).verdict == "unbiased"


def test_off_policy_none_of_the_four_common_configs_is_unbiased(models):
    policy, ref, behaviour = models
    eng = RecipeEngine(policy, ref, behaviour=behaviour, group_size=1)
    common = [
        Recipe(reward_estimator="k1", reward_coef=1.0),
        Recipe(reward_estimator="k3", reward_coef=1.0),
        Recipe(loss_estimator="k1", loss_coef=1.0),
        Recipe(loss_estimator="k3", loss_coef=1.0),
    ]
    for r in common:
        assert eng.evaluate(r).verdict != "unbiased", r.describe()


def test_off_policy_sequence_weights_with_current_kl_are_unbiased(models):
    """Detached per-sequence rho = pi/mu times k1 computed at the current policy: importance sampling, exact."""
    policy, ref, behaviour = models
    eng = RecipeEngine(policy, ref, behaviour=behaviour, group_size=1)
    r = Recipe(
        reward_estimator="k1", reward_coef=1.0, reward_kl_at="current", pg_ratio="sequence", pg_ratio_grad="detached"
    )
    assert eng.evaluate(r).verdict == "unbiased"
    # per-token weights are not enough (they ignore the prefix law)
    r_tok = Recipe(
        reward_estimator="k1", reward_coef=1.0, reward_kl_at="current", pg_ratio="token", pg_ratio_grad="detached"
    )
    assert eng.evaluate(r_tok).verdict == "biased"


def test_on_policy_ppo_clipping_changes_nothing(models):
    policy, ref, _ = models
    eng = RecipeEngine(policy, ref, group_size=1)
    plain = eng.evaluate(Recipe(reward_estimator="k1", reward_coef=1.0, pg_ratio="none"))
    ppo = eng.evaluate(Recipe(reward_estimator="k1", reward_coef=1.0, pg_clip=(0.2, 0.2), pg_dual_clip=3.0))
    assert close(ppo.expected_grad, plain.expected_grad)


# ---------------------------------------------------------------- slow cross-check


def slow_expected_grad(policy, ref, behaviour, recipe, eos, B):
    """Loop over every group, build the loss with the model's own forward pass, autograd into theta."""
    tokens, mask = enumerate_complete(policy.vocab_size, policy.length, eos)
    with torch.no_grad():
        lr = masked_token_logp(ref, tokens, mask)
        lmu = masked_token_logp(behaviour, tokens, mask)
    params = [p for p in policy.parameters()]
    total = [torch.zeros_like(p) for p in params]
    for idx in itertools.product(range(tokens.shape[0]), repeat=B):
        idx = list(idx)
        prob = float(lmu[idx].sum().exp())
        lp = masked_token_logp(policy, tokens[idx], mask[idx])  # (B, T)
        loss = batch_loss(recipe, lp[None], lmu[idx][None], lr[idx][None], mask[idx][None])
        if not loss.requires_grad:  # e.g. a group of identical responses: zero advantages, no KL loss
            continue
        grads = torch.autograd.grad(loss.sum(), params, allow_unused=True)
        for acc, gr in zip(total, grads):
            if gr is not None:
                acc += prob * gr
    return torch.cat([t.reshape(-1) for t in total])


@pytest.mark.parametrize(
    "recipe",
    [
        Recipe(
            reward_estimator="k3",
            reward_coef=0.7,
            baseline="grpo",
            pg_clip=(0.2, 0.3),
            pg_dual_clip=3.0,
            pg_agg="token-mean",
        ),
        Recipe(loss_estimator="k3_clamped", loss_coef=1.3, loss_weight="ratio", loss_agg="seq-mean-token-mean"),
        Recipe(
            reward_estimator="k1",
            reward_coef=1.0,
            baseline="rloo",
            reward_credit="rtg",
            baseline_on="task",
            pg_ratio="sequence",
            pg_ratio_grad="detached",
            pg_is_clamp=2.0,
            loss_estimator="k2",
            loss_coef=0.5,
            loss_weight="ratio_detached_grad",
            loss_weight_clamp=1.5,
        ),
    ],
    ids=["grpo-ppo", "ratio-k3-loss", "mixed"],
)
def test_vectorized_engine_matches_slow_per_group_loop(models, recipe):
    policy, ref = make_pair("tabular", 3, 2, seed=5)
    behaviour = policy.perturbed(0.4, seed=8)
    behaviour.requires_grad_(False)
    eng = RecipeEngine(policy, ref, behaviour=behaviour, eos=2, group_size=2)
    fast = eng.evaluate(recipe).expected_grad
    slow = slow_expected_grad(policy, ref, behaviour, recipe, eos=2, B=2)
    assert close(fast, slow, 1e-10)


def test_bad_recipes_and_engines_are_refused(models):
    policy, ref, _ = models
    with pytest.raises(RecipeError, match="choose one of"):
        Recipe(baseline="median")
    with pytest.raises(Exception, match="choose one of"):
        Recipe(pg_agg="mean")
    with pytest.raises(ValueError, match="groups"):
        RecipeEngine(policy, ref, group_size=9)
    with pytest.raises(ValueError, match="task_reward"):
        RecipeEngine(policy, ref, task_reward=torch.zeros(5))
    with pytest.raises(ValueError, match="non-finite"):  # 0/0 in a zero-variance group: an error, not NaN
        RecipeEngine(policy, ref, group_size=2).evaluate(
            Recipe(reward_estimator="k1", reward_coef=1.0, baseline="grpo", grpo_eps=0.0)
        )


# ---------------------------------------------------------------- Monte Carlo over groups (too many to enumerate)

FAILURE_RATE = 1e-3  # Bonferroni over coordinates: each consistency check fails by chance with probability <= 1e-3


def consistent(moments, reference, failure_rate=FAILURE_RATE):
    """Every coordinate of the Monte Carlo mean within its Bonferroni-corrected normal interval of ``reference``."""
    from statistics import NormalDist

    se = (moments.var / moments.n).sqrt()
    keep = se > 0
    z = (moments.mean - reference)[keep] / se[keep]
    return bool(z.abs().max() <= NormalDist().inv_cdf(1 - failure_rate / (2 * z.numel())))


def test_group_monte_carlo_agrees_with_enumeration_and_detects_the_batch_mean_bias():
    from biaslab.engines.montecarlo import MonteCarloEngine

    policy, ref = make_pair("tabular", 3, 3, seed=3, kl_scale=1.0)
    rloo = Recipe(reward_estimator="k1", reward_coef=1.0, baseline="rloo")
    mean = Recipe(reward_estimator="k1", reward_coef=1.0, baseline="batch_mean")
    # B = 2: the Monte Carlo mean is consistent with the exact expectation
    exact = RecipeEngine(policy, ref, eos=2, group_size=2).evaluate(mean).expected_grad
    mc = MonteCarloEngine(policy, ref, eos=2, group_size=2).moments(mean, 8000, torch.Generator().manual_seed(0))
    assert consistent(mc, exact)
    # B = 5 (15**5 groups, not enumerated): RLOO is consistent with grad KL; the batch mean is not, and is
    # consistent with the exact (1 - 1/5) scaling instead: the bias lies outside the confidence interval
    truth = RecipeEngine(policy, ref, eos=2).truths()["reverse_kl"]
    five = MonteCarloEngine(policy, ref, eos=2, group_size=5)
    nominal = rloo.nominal_scale(5, 3)
    mc_rloo = five.moments(rloo, 8000, torch.Generator().manual_seed(1))
    assert consistent(mc_rloo, nominal * truth)
    mc_mean = five.moments(mean, 8000, torch.Generator().manual_seed(2))
    assert not consistent(mc_mean, nominal * truth)
    assert consistent(mc_mean, (1 - 1 / 5) * nominal * truth)


# ---------------------------------------------------------------- the policy k updates ago


def test_stale_pair_k_updates_ago():
    from biaslab.engines.offpolicy import exact_loss_grad, stale_pair

    model, ref = make_pair("tabular", 3, 2, seed=4, kl_scale=1.0)
    reward = torch.linspace(0, 1, 9, dtype=torch.float64)
    # one step lowers the regularized loss (gradient descent on beta KL - E[R], exact gradient)
    policy, behaviour = stale_pair(model, ref, 1, 0.05, task_reward=reward)
    g = exact_loss_grad(model, ref, task_reward=reward)
    step = torch.cat([(p - q).detach().reshape(-1) for p, q in zip(policy.parameters(), behaviour.parameters())])
    assert close(step, -0.05 * g, 1e-12)
    # k = 0: on-policy, every common configuration keeps its on-policy verdict; k = 2: none is unbiased
    same, _ = stale_pair(model, ref, 0, 0.05)
    on = RecipeEngine(same, ref, behaviour=model)
    assert on.evaluate(Recipe(reward_estimator="k1", reward_coef=1.0)).verdict == "unbiased"
    policy, behaviour = stale_pair(model, ref, 2, 0.5, task_reward=reward)
    eng = RecipeEngine(policy, ref, behaviour=behaviour)
    for r in (Recipe(reward_estimator="k1", reward_coef=1.0), Recipe(loss_estimator="k3", loss_coef=1.0)):
        assert eng.evaluate(r).verdict == "biased"
