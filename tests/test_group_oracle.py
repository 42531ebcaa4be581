"""An independent oracle for groups of B responses: the expected update of "KL in reward with a group baseline,
optionally plus KL in loss", written here from the formulas (BACKGROUND sections 1-3, verl's advantage conventions)
with the policy's logits as plain tensors, every ordered group enumerated in a Python loop, and autograd of the
summed loss; nothing from biaslab's recipes, placements, aggregation or engine is called.

Compared with ``ExactEngine.evaluate(Recipe(...))`` on numbers (the KL part of E[g], to round-off) and on verdicts
(decided here from the definitions in BACKGROUND: unbiased / rescaled / zero / biased with its direction).
Catches: B instead of B - 1 (the RLOO baseline, through the variance; Bessel's std), GRPO's B = 1 convention
(A = S / (1 + eps)), a mean baseline's (1 - 1/B), a reward + loss pair judged against the sum of its coefficients,
a verdict that depends on beta.
"""

import itertools

import pytest
import torch

from biaslab import ExactEngine, make_pair
from biaslab.core.recipes import Recipe

KS = {"k1": lambda d: d, "k2": lambda d: 0.5 * d * d, "k3": lambda d: torch.exp(-d) - 1 + d}
TOL = 1.5e-8  # sqrt(float64 eps), the documented float64 tolerance


def _token_logp(levels, tokens, V, normalise):
    """(N, T) log pi(y_t | y_<t) of a tabular model given as its per-level logit tables (V**t, V)."""
    N, T = tokens.shape
    out = []
    for t in range(T):
        row = torch.zeros(N, dtype=torch.long)
        for s in range(t):
            row = row * V + tokens[:, s]
        table = torch.log_softmax(levels[t], -1) if normalise else levels[t]
        out.append(table[row, tokens[:, t]])
    return torch.stack(out, 1)


def oracle(policy, ref, task_reward, B, est_r, est_l, beta, baseline, eps):
    """(the KL part of E[g], its variance E||g - E g||^2, named directions): E over ordered groups of B i.i.d.
    responses of the gradient of
    loss = (1/B) sum_i [ -sg(A_i) log pi(y_i) + beta * sum_t k_l(delta_it) ],  S_i = R_i - beta * sum_t k_r(delta_it),
    A_i from S by the baseline (none; batch_mean S_i - mean S; rloo S_i - mean_{j != i} S_j; grpo (S_i - mean S) /
    (std S + eps) with Bessel's std, and S_i / (1 + eps) for a group of one)."""
    V, T = policy.vocab_size, policy.length
    theta = [lvl.detach().clone().requires_grad_(True) for lvl in policy.levels]
    ref_logp = [torch.log_softmax(lvl.detach(), -1) for lvl in ref.levels]
    tokens = torch.tensor(list(itertools.product(range(V), repeat=T)))
    N = tokens.shape[0]
    logp = _token_logp(theta, tokens, V, True)  # (N, T)
    logp_ref = _token_logp(ref_logp, tokens, V, False)  # (N, T)
    delta = logp - logp_ref
    prob = logp.sum(1).exp().detach()

    def flat_grad(scalar):
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(scalar, theta, retain_graph=True)])

    def group_loss(idx, with_kl):
        k_r = KS[est_r](delta[idx]).detach().sum(1) if (with_kl and est_r) else torch.zeros(B)
        S = task_reward[idx] - beta * k_r
        if baseline == "none":
            A = S
        elif B == 1:
            A = S / (1 + eps) if baseline == "grpo" else S
        elif baseline == "batch_mean":
            A = S - S.mean()
        elif baseline == "rloo":
            A = torch.stack([S[i] - (S.sum() - S[i]) / (B - 1) for i in range(B)])
        else:
            std = ((S - S.mean()) ** 2).sum().div(B - 1).sqrt()
            A = (S - S.mean()) / (std + eps)
        loss = -(A.detach() * logp[idx].sum(1)).mean()
        if with_kl and est_l:
            loss = loss + beta * KS[est_l](delta[idx]).sum(1).mean()
        return loss

    # the KL part of each group's update, g = grad(loss with the KL) - grad(loss without it), and its moments
    mean, second = 0.0, 0.0
    for group in itertools.product(range(N), repeat=B):
        idx = list(group)
        g = flat_grad(group_loss(idx, True) - group_loss(idx, False))
        w = float(torch.prod(prob[idx]))
        mean, second = mean + w * g, second + w * float(g @ g)
    kl_part, variance = mean, second - float(mean @ mean)
    p, q = logp.sum(1).exp(), logp_ref.sum(1).exp()
    directions = {
        "reverse_kl": flat_grad((p * (logp.sum(1) - logp_ref.sum(1))).sum()),
        "forward_kl": flat_grad(-(q * logp.sum(1)).sum()),
    }
    fwd_tok = 0.0
    for t in range(T):  # sum_t E_prefix KL(pi_ref(.|prefix) || pi(.|prefix)), prefix law held fixed
        row = torch.zeros(N, dtype=torch.long)
        for s in range(t):
            row = row * V + tokens[:, s]
        lp_t, lq_t = torch.log_softmax(theta[t], -1)[row], ref_logp[t][row]  # (N, V)
        fwd_tok = fwd_tok + (prob * (lq_t.exp() * (lq_t - lp_t)).sum(1)).sum()
    directions["forward_kl_token"] = flat_grad(fwd_tok)
    return kl_part, variance, directions


def verdict_from_definitions(g, directions, c):
    """The verdict of BACKGROUND's definitions at the float64 tolerance: (verdict, direction or None)."""
    true = c * directions["reverse_kl"]
    if (g - true).norm() <= TOL * true.norm():
        return "unbiased", "reverse_kl"
    if g.norm() <= TOL * true.norm():
        return "zero", None
    for name, d in directions.items():
        s = (g @ d) / (d @ d)
        if s > 0 and (g - s * d).norm() <= TOL * g.norm():
            return ("rescaled" if name == "reverse_kl" else "biased"), name
    return "biased", "none"


CASES = [  # (est_r, est_l, beta, baseline, eps)
    ("k1", None, 1.0, "none", 1e-6),
    ("k1", None, 1e-3, "rloo", 1e-6),
    ("k1", None, 0.1, "batch_mean", 1e-6),
    ("k1", None, 0.1, "grpo", 0.5),
    ("k3", None, 0.1, "rloo", 1e-6),
    ("k3", "k3", 0.05, "rloo", 1e-6),
    ("k3", "k3", 1e-3, "none", 1e-6),
    (None, "k3", 1e-3, "rloo", 1e-6),
    (None, "k2", 0.3, "grpo", 1e-6),
]


@pytest.mark.parametrize("B", [1, 2, 3])
@pytest.mark.parametrize("V,T,seed,kl_scale", [(2, 2, 0, 0.6), (3, 1, 1, 0.8), (2, 2, 7, 0.02)])
def test_groups_agree_with_the_oracle_on_numbers_and_verdicts(V, T, seed, kl_scale, B):
    policy, ref = make_pair("tabular", V, T, seed=seed, kl_scale=kl_scale)
    task_reward = torch.randn(V**T, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    engine = ExactEngine(policy, ref, group_size=B, task_reward=task_reward)
    for est_r, est_l, beta, baseline, eps in CASES:
        if B == 1 and baseline == "rloo":
            continue
        recipe = Recipe(
            reward_estimator=est_r, reward_coef=beta if est_r else 0.0, reward_credit="full", baseline=baseline,
            grpo_eps=eps, pg_ratio="none", pg_agg="seq-mean-token-sum",
            loss_estimator=est_l, loss_coef=beta if est_l else 0.0, loss_agg="seq-mean-token-sum",
        )  # fmt: skip
        result = engine.evaluate(recipe)
        g, variance, directions = oracle(policy, ref, task_reward, B, est_r, est_l, beta, baseline, eps)
        case = f"{recipe.describe()} B={B}"
        scale = max(float(g.norm()), beta * float(directions["reverse_kl"].norm()))
        assert (result.expected_grad - g).norm() <= 1e-10 * scale, case
        assert result.variance == pytest.approx(variance, rel=1e-9, abs=1e-12 * scale**2), case
        assert result.nominal_scale == pytest.approx(beta, rel=1e-12), case
        verdict, direction = verdict_from_definitions(g, directions, beta)
        assert result.verdict == verdict, case
        if verdict == "biased" and direction != "none":
            assert result.matches == direction, case
        if verdict == "rescaled":
            assert result.factor == pytest.approx(float(g @ directions["reverse_kl"]) / (
                beta * float(directions["reverse_kl"] @ directions["reverse_kl"])), rel=1e-9), case
