"""The exact engine in float64: finite differences, the known-results table, T = 1, permutation invariance,
and the vectorized engine against a slow per-sequence autograd loop."""

import itertools
import math

import pytest
import torch

from biaslab import ExactEngine, TabularAR, all_configs, make_config, make_pair
from biaslab.engines.exact import enumerate_sequences

TOL = 1e-9


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def set_flat(model, vec):
    i = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(vec[i : i + p.numel()].view_as(p))
            i += p.numel()


def kl_values(policy, ref):
    """(reverse, forward) KL by brute force over itertools.product, no engine code involved."""
    V, T = policy.vocab_size, policy.length
    seqs = torch.tensor(list(itertools.product(range(V), repeat=T)))
    with torch.no_grad():
        lp = policy.log_probs(seqs).gather(-1, seqs[..., None]).squeeze(-1).sum(-1)
        lr = ref.log_probs(seqs).gather(-1, seqs[..., None]).squeeze(-1).sum(-1)
    return float((lp.exp() * (lp - lr)).sum()), float((lr.exp() * (lr - lp)).sum())


def test_enumeration_order_and_count():
    seqs = enumerate_sequences(3, 4)
    assert seqs.shape == (81, 4)
    assert seqs.tolist() == [list(s) for s in itertools.product(range(3), repeat=4)]


def test_kl_values_and_gradients_match_central_finite_differences(pair):
    policy, ref = pair
    engine = ExactEngine(policy, ref)
    tr = engine.truths()
    rev, fwd = kl_values(policy, ref)
    assert abs(tr.kl_reverse - rev) < 1e-12 and abs(tr.kl_forward - fwd) < 1e-12
    theta = flat_params(policy)
    g = torch.Generator().manual_seed(0)
    h = 1e-5
    for _ in range(4):  # directional derivatives along random unit directions
        u = torch.randn(theta.shape, generator=g, dtype=torch.float64)
        u /= u.norm()
        set_flat(policy, theta + h * u)
        rp, fp = kl_values(policy, ref)
        set_flat(policy, theta - h * u)
        rm, fm = kl_values(policy, ref)
        set_flat(policy, theta)
        assert abs(float(tr.grad_reverse @ u) - (rp - rm) / (2 * h)) < TOL
        assert abs(float(tr.grad_forward @ u) - (fp - fm) / (2 * h)) < TOL


def test_truths_match_autograd_of_their_definitions(pair):
    policy, ref = pair
    engine = ExactEngine(policy, ref)
    tr = engine.truths()
    for name, g in engine.truths_autograd().items():
        torch.testing.assert_close(tr.directions[name], g, rtol=1e-10, atol=1e-13)


def check_known_table(engine, T):
    """Every row of BACKGROUND section 3 (on-policy), from computation."""
    res = {
        (c.estimator.name, c.placement.value, c.level.value, c.credit and c.credit.value): engine.evaluate(c)
        for c in all_configs(("k1", "k2", "k3"))
    }

    def rows(est, placement, level=None):
        return [r for (e, p, lv, _), r in res.items() if e == est and p == placement and (level is None or lv == level)]

    for r in rows("k1", "reward") + rows("k1", "both") + rows("k3", "both") + rows("k2", "loss", "sequence"):
        assert r.verdict == "unbiased", r.config.label
        assert r.rel_bias < TOL
    for r in rows("k1", "loss"):
        assert r.verdict == "zero" and r.expected_grad.norm() < TOL
    for r in rows("k2", "reward") + rows("k3", "reward") + rows("k2", "both"):
        assert r.verdict == "biased" and r.rel_bias > 1e-3, r.config.label
    for r in rows("k2", "both"):
        assert r.matches == "expected_value"  # the gradient of E[k2], a different divergence
    (k3_seq,) = rows("k3", "loss", "sequence")
    assert k3_seq.matches == "forward_kl" and k3_seq.rel_bias > 1e-3  # "Eq. 41"
    (k3_tok,) = rows("k3", "loss", "token")
    assert "forward_kl_token" in k3_tok.all_matches and k3_tok.verdict == "biased"
    (k2_tok,) = rows("k2", "loss", "token")
    assert "reverse_kl_token" in k2_tok.all_matches
    if T == 1:
        assert k2_tok.verdict == "unbiased"
    else:
        assert k2_tok.verdict == "biased" and k2_tok.rel_bias > 1e-4  # the partial gradient
        assert k3_tok.matches == "forward_kl_token"


def test_known_results_table(pair):
    policy, ref = pair
    check_known_table(ExactEngine(policy, ref), policy.length)


@pytest.mark.parametrize("model", ["tabular", "neural"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_known_results_table_T1(model, seed):
    policy, ref = make_pair(model, 5, 1, seed=seed, kl_scale=0.7)
    check_known_table(ExactEngine(policy, ref), 1)


def test_expected_value_direction_equals_autograd_of_expected_value(pair):
    """grad E_pi[K], computed through the score identity, equals autograd of sum_y pi(y) K(y)."""
    policy, ref = pair
    engine = ExactEngine(policy, ref)
    for cfg in all_configs(("k2", "abs", "rb"), placements=("loss",)):
        k = cfg.sequence_value(engine.batch)  # (N,) differentiable through the engine's forward pass
        direct = engine.grad_of((engine.logp_seq.exp() * k).sum())
        torch.testing.assert_close(engine.expected_value_grad(cfg), direct, rtol=1e-10, atol=1e-12)


VALUES = {  # BACKGROUND section 2, written here from the formulas (no biaslab code)
    "k1": lambda d: d,
    "k2": lambda d: 0.5 * d**2,
    "k3": lambda d: torch.exp(-d) - 1 + d,
    "abs": lambda d: d.abs(),
}

K3_CLAMPED = lambda d: VALUES["k3"](d.clamp(-20, 20)).clamp(-10, 10)  # noqa: E731


def formula_surrogate(name, placement, level, credit, lp, lr, lp_full, lr_full):
    """S(y) with grad S = g(y), from BACKGROUND section 3: per-token values k_t (or the sequence value K),
    reward = sum_t sg(c_t) logp_t with c_t the reward-to-go or the full return, loss = K, both = the sum."""
    if name == "rb":
        kt = (lp_full.exp() * (lp_full - lr_full)).sum(-1)  # (T,) exact next-token reverse KL
    elif name == "k3_st_k2":  # value of k3 with verl's clamps (delta in +-20, value in +-10), gradient of k2
        d = lp - lr
        kt = K3_CLAMPED(d).detach() + VALUES["k2"](d) - VALUES["k2"](d).detach()
    else:
        kt = VALUES[name](lp - lr)  # (T,)
    if level == "token":
        big_k = kt.sum()
        c = torch.flip(torch.cumsum(torch.flip(kt, [0]), 0), [0]) if credit == "rtg" else big_k.expand_as(kt)
    else:
        if name == "k3_st_k2":
            d = (lp - lr).sum()
            big_k = K3_CLAMPED(d).detach() + VALUES["k2"](d) - VALUES["k2"](d).detach()
        else:
            big_k = VALUES[name]((lp - lr).sum())
        c = big_k.expand_as(lp)
    reward = (c.detach() * lp).sum()
    return {"reward": reward, "loss": big_k, "both": reward + big_k}[placement]


def slow_loop(policy, ref, config):
    """E[g] and E||g - E g||^2 by a Python loop over sequences with one autograd call each, the surrogate written
    from the formulas (not the configuration's code)."""
    params = [p for p in policy.parameters() if p.requires_grad]
    V, T = policy.vocab_size, policy.length
    credit = config.credit.value if config.credit is not None else None
    mean, second = None, 0.0
    for seq in itertools.product(range(V), repeat=T):
        y = torch.tensor([seq])
        lp_full = policy.log_probs(y)[0]  # (T, V)
        with torch.no_grad():
            lr_full = ref.log_probs(y)[0]
        lp = lp_full.gather(-1, y[0, :, None]).squeeze(-1)  # (T,)
        lr = lr_full.gather(-1, y[0, :, None]).squeeze(-1)
        s = formula_surrogate(
            config.estimator.name, config.placement.value, config.level.value, credit, lp, lr, lp_full, lr_full
        )
        g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(s, params, allow_unused=False)])
        w = float(lp.detach().sum().exp())
        mean = w * g if mean is None else mean + w * g
        second += w * float(g @ g)
    return mean, second - float(mean @ mean)


@pytest.mark.parametrize("model", ["tabular", "neural"])
def test_vectorized_engine_matches_slow_loop(model):
    policy, ref = make_pair(model, 3, 3, seed=5, kl_scale=1.0)
    engine = ExactEngine(policy, ref)
    for cfg in all_configs(("k1", "k2", "k3", "abs", "rb", "k3_st_k2")):
        r = engine.evaluate(cfg)
        mean, var = slow_loop(policy, ref, cfg)
        torch.testing.assert_close(r.expected_grad, mean, rtol=1e-10, atol=1e-12)
        assert abs(r.variance - var) <= 1e-10 * max(1.0, var), cfg.label


def permuted_tabular(model: TabularAR, perm: list[int]) -> TabularAR:
    """The same distribution with token v renamed perm[v]."""
    V = model.vocab_size
    inv = torch.argsort(torch.tensor(perm))
    levels = []
    for t, lvl in enumerate(model.levels):
        new = torch.empty_like(lvl.detach())
        for prefix in itertools.product(range(V), repeat=t):
            old_row = sum(y * V ** (t - 1 - s) for s, y in enumerate(prefix))
            new_row = sum(perm[y] * V ** (t - 1 - s) for s, y in enumerate(prefix))
            new[new_row] = lvl.detach()[old_row][inv]
        levels.append(new)
    return TabularAR(levels)


def test_invariance_under_vocabulary_permutation():
    policy, ref = make_pair("tabular", 3, 3, seed=7, kl_scale=1.0)
    perm = [2, 0, 1]
    a = ExactEngine(policy, ref)
    b = ExactEngine(permuted_tabular(policy, perm), permuted_tabular(ref, perm).requires_grad_(False))
    assert abs(a.truths().kl_reverse - b.truths().kl_reverse) < 1e-12
    assert abs(a.truths().grad_reverse.norm() - b.truths().grad_reverse.norm()) < 1e-12
    for cfg in all_configs(("k1", "k2", "k3", "abs")):
        ra, rb = a.evaluate(cfg), b.evaluate(cfg)
        assert abs(ra.rel_bias - rb.rel_bias) < 1e-10 and abs(ra.variance - rb.variance) < 1e-10
        assert ra.verdict == rb.verdict and ra.matches == rb.matches
        if ra.verdict != "zero":
            assert abs(ra.cos_forward - rb.cos_forward) < 1e-10


def test_token_level_equals_sequence_level_for_k1_reward():
    """Same per-sample gradient: k1 is linear, so k(sum delta) = sum k(delta) with full credit."""
    policy, ref = make_pair("tabular", 2, 3, seed=0, kl_scale=1.0)
    e = ExactEngine(policy, ref)
    a = e.evaluate(make_config("k1", "reward", "token", "full"))
    b = e.evaluate(make_config("k1", "reward", "sequence", "full"))
    torch.testing.assert_close(a.expected_grad, b.expected_grad)
    assert abs(a.variance - b.variance) < 1e-12


def test_reward_to_go_keeps_the_mean_and_lowers_variance():
    policy, ref = make_pair("tabular", 3, 4, seed=2, kl_scale=1.0)
    e = ExactEngine(policy, ref)
    full = e.evaluate(make_config("k1", "reward", "token", "full"))
    rtg = e.evaluate(make_config("k1", "reward", "token", "rtg"))
    torch.testing.assert_close(full.expected_grad, rtg.expected_grad, rtol=1e-10, atol=1e-12)
    assert rtg.variance < full.variance


def test_policy_equal_to_reference_gives_zero_gradients():
    ref = TabularAR.random(2, 3, seed=0)
    policy = TabularAR([x.detach() for x in ref.levels])
    e = ExactEngine(policy, ref.requires_grad_(False))
    assert e.truths().kl_reverse == pytest.approx(0, abs=1e-15)
    for cfg in all_configs(("k1", "k3")):
        r = e.evaluate(cfg)  # the true gradient is zero: no ratio, cosine or direction is meaningful
        assert r.verdict == "undefined" and math.isnan(r.rel_bias) and r.matches == "none", cfg.label


def test_config_label_and_credit_collapse():
    cfg = make_config("k3", "loss", "token", "full")
    assert cfg.credit is None and cfg.label == "k3 in loss (token)"
    assert len(all_configs(("k1",))) == 10


@pytest.mark.parametrize("model", ["tabular", "neural"])
def test_plain_surrogate_equals_the_general_update_rule(model):
    """make_config's fast per-sample surrogate and the general Recipe.batch_loss give the same coefficients."""
    from biaslab.core.placements import surrogate_coefficients

    policy, ref = make_pair(model, 3, 3, seed=8, kl_scale=0.9)
    e = ExactEngine(policy, ref)
    for cfg in all_configs(("k1", "k2", "k3", "abs", "rb", "k3_st_k2")):
        assert cfg.is_plain
        fast = surrogate_coefficients(cfg, e.tokens, e._logp_full_det, e.logp_ref_full)
        a, c = e.coefficients(cfg, torch.arange(e.N)[:, None])  # explicit groups of one: through batch_loss
        torch.testing.assert_close(fast.tok, a[:, 0], rtol=1e-12, atol=1e-13)
        if c is not None:
            torch.testing.assert_close(fast.full, c[:, 0], rtol=1e-12, atol=1e-13)


def test_chunked_enumeration_equals_the_whole_one():
    """An enumeration processed in chunks (forced by a small memory budget) gives the in-memory engine's numbers
    and verdicts: the weighted gradients, KLs and second moments are sums over sequences."""
    from biaslab.core.recipes import Recipe

    policy, ref = make_pair("tabular", 3, 5, seed=2, kl_scale=0.8)
    whole, chunked = ExactEngine(policy, ref), ExactEngine(policy, ref, max_bytes=200_000)
    assert whole.chunk_size is None and chunked.chunk_size is not None and chunked.chunk_size < chunked.N
    assert abs(whole.truths().kl_reverse - chunked.truths().kl_reverse) < 1e-13
    configs = all_configs(("k1", "k3", "rb", "k3_st_k2")) + [
        Recipe(reward_estimator="k1", reward_coef=0.3, baseline="grpo", pg_ratio="none", pg_agg="token-sum")
    ]
    for cfg in configs:
        a, b = whole.evaluate(cfg), chunked.evaluate(cfg)
        assert float((a.expected_grad - b.expected_grad).norm()) <= 1e-12 * max(1.0, float(a.expected_grad.norm()))
        assert abs(a.variance - b.variance) <= 1e-12 * a.variance
        assert (a.verdict, a.matches) == (b.verdict, b.matches), cfg.label
