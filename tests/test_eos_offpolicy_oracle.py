"""An independent oracle for complete responses ending at EOS and for a stale behaviour policy (B = 1), written here
from the formulas (BACKGROUND sections 1-3) response by response in a Python loop: the tabular policy's logits as
plain tensors, the prefix of each token found by walking the response, plain autograd. Nothing from biaslab's
placements, recipes, estimators or engine is called; ``ExactEngine.evaluate`` must agree on E[g] (to round-off) and
on the verdict and its direction.

Catches: an EOS off-by-one (the EOS token's own log-probability dropped or a token after it counted), responses
that never end counted or complete ones missed, reward-to-go credit shifted by a token, the sequence-level value
taken per token, KL-in-reward values computed at the current policy where trainers use the behaviour one (and back),
a detached importance ratio in the loss.
"""

import itertools

import pytest
import torch
from test_group_oracle import KS, verdict_from_definitions  # the values and the verdict rule, from the definitions

from biaslab import ExactEngine, make_config, make_pair
from biaslab.core.recipes import Recipe


def complete_responses(V, T, eos):
    """Every response: stops at its first EOS, or has T tokens (exactly T when there is no EOS)."""
    out = []
    for L in range(1, T + 1):
        for y in itertools.product(range(V), repeat=L):
            ends_at_eos = eos is not None and y[-1] == eos
            if (eos is not None and eos in y[:-1]) or (L < T and not ends_at_eos):
                continue
            out.append(y)
    return out


def next_logp(levels, y, V, normalise=True):
    """[(V,) log-probabilities of the next token at each prefix y_<t], t = 0 .. len(y) - 1."""
    row, out = 0, []
    for t, token in enumerate(y):
        out.append(torch.log_softmax(levels[t][row], -1) if normalise else levels[t][row])
        row = row * V + token
    return out


def directions(theta, ref_logp, V, T, eos):
    """grad KL(pi||pi_ref), grad KL(pi_ref||pi) and the token-level forward KL (prefix law held fixed)."""
    rev = fwd = fwd_tok = 0.0
    for y in complete_responses(V, T, eos):
        P, Q = next_logp(theta, y, V), next_logp(ref_logp, y, V, False)
        lp = sum(P[t][y[t]] for t in range(len(y)))
        lq = sum(Q[t][y[t]] for t in range(len(y)))
        rev = rev + lp.exp() * (lp - lq)
        fwd = fwd - lq.exp() * lp
        fwd_tok = fwd_tok + lp.exp().detach() * sum((Q[t].exp() * (Q[t] - P[t])).sum() for t in range(len(y)))
    return {name: _grad(x, theta) for name, x in
            (("reverse_kl", rev), ("forward_kl", fwd), ("forward_kl_token", fwd_tok))}


def _grad(scalar, theta):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(scalar, theta, retain_graph=True)])


@pytest.mark.parametrize("V,T,seed,kl_scale,eos", [(3, 3, 0, 0.7, 0), (2, 4, 1, 0.5, 1)])
def test_complete_responses_with_eos_agree_with_the_oracle(V, T, seed, kl_scale, eos):
    """B = 1, on-policy: g(y) = sum_t grad log pi(y_t|y_<t) * c_t (reward; c_t = sum_{s>=t} k_s for rtg, sum_s k_s for
    full, k(sum_s delta_s) at sequence level) and/or grad K(y) (loss), over complete responses."""
    policy, ref = make_pair("tabular", V, T, seed=seed, kl_scale=kl_scale)
    engine = ExactEngine(policy, ref, eos=eos)
    theta = [lvl.detach().clone().requires_grad_(True) for lvl in policy.levels]
    ref_logp = [torch.log_softmax(lvl.detach(), -1) for lvl in ref.levels]
    dirs = directions(theta, ref_logp, V, T, eos)
    for est, placement, level, credit in itertools.product(KS, ("reward", "loss", "both"), ("token", "sequence"),
                                                           ("full", "rtg")):
        if placement == "loss" and credit == "rtg":
            continue
        k, total = KS[est], 0.0
        for y in complete_responses(V, T, eos):
            P, Q = next_logp(theta, y, V), next_logp(ref_logp, y, V, False)
            lp = torch.stack([P[t][y[t]] for t in range(len(y))])  # (L,) the EOS token's own log-prob included
            delta = lp - torch.stack([Q[t][y[t]] for t in range(len(y))])
            value = k(delta).sum() if level == "token" else k(delta.sum())
            if placement in ("reward", "both"):
                kd = k(delta).detach()
                if level == "sequence":
                    c = value.detach().expand(len(y))
                else:
                    c = kd.flip(0).cumsum(0).flip(0) if credit == "rtg" else kd.sum().expand(len(y))
                total = total + lp.sum().exp().detach() * (c * lp).sum()
            if placement in ("loss", "both"):
                total = total + lp.sum().exp().detach() * value
        g = _grad(total, theta)
        result = engine.evaluate(make_config(est, placement, level, credit))
        case = result.config.label
        assert (result.expected_grad - g).norm() <= 1e-10 * max(g.norm(), dirs["reverse_kl"].norm()), case
        verdict, direction = verdict_from_definitions(g, dirs, 1.0)
        assert result.verdict == verdict, case
        if verdict == "biased" and direction != "none":
            assert result.matches == direction, case


@pytest.mark.parametrize("V,T,seed", [(3, 2, 3), (2, 3, 4)])
def test_a_stale_behaviour_policy_agrees_with_the_oracle(V, T, seed):
    """Samples from mu != pi: (a) k1 in the reward computed at the current policy with a detached sequence ratio
    rho = pi(y)/mu(y) is unbiased; (b) the same with k1 at the behaviour policy (as trainers compute it) is biased;
    (c) k3 in the loss times a differentiable per-token ratio pi/mu is biased. E over mu written here."""
    policy, ref = make_pair("tabular", V, T, seed=seed, kl_scale=0.6)
    mu = policy.perturbed(0.4, seed=9)
    mu.requires_grad_(False)
    engine = ExactEngine(policy, ref, behaviour=mu)
    theta = [lvl.detach().clone().requires_grad_(True) for lvl in policy.levels]
    ref_logp = [torch.log_softmax(lvl.detach(), -1) for lvl in ref.levels]
    mu_logp = [torch.log_softmax(lvl.detach(), -1) for lvl in mu.levels]
    dirs = directions(theta, ref_logp, V, T, None)
    cases = {
        "k1 at pi, sequence ratio": (Recipe(reward_estimator="k1", reward_coef=1.0, reward_credit="full",
                                            reward_kl_at="current", pg_ratio="sequence", pg_ratio_grad="detached",
                                            pg_agg="token-sum"), "unbiased"),
        "k1 at mu, sequence ratio": (Recipe(reward_estimator="k1", reward_coef=1.0, reward_credit="full",
                                            reward_kl_at="behaviour", pg_ratio="sequence", pg_ratio_grad="detached",
                                            pg_agg="token-sum"), "biased"),
        "ratio x k3 in loss": (Recipe(loss_estimator="k3", loss_coef=1.0, loss_weight="ratio", pg_ratio="token",
                                      loss_agg="token-sum"), "biased"),
    }
    for name, (recipe, expected) in cases.items():
        total = 0.0
        for y in complete_responses(V, T, None):
            P, Q, M = (next_logp(theta, y, V), next_logp(ref_logp, y, V, False), next_logp(mu_logp, y, V, False))
            lp, lq, lm = (torch.stack([X[t][y[t]] for t in range(len(y))]) for X in (P, Q, M))  # (T,) each
            weight = lm.sum().exp()  # mu(y): the samples come from the behaviour policy
            if name.startswith("k1"):
                at = lp.detach() if "at pi" in name else lm
                rho = (lp.detach().sum() - lm.sum()).exp()
                total = total + weight * rho * (at - lq).sum() * lp.sum()
            else:
                total = total + weight * ((lp - lm).exp() * KS["k3"](lp - lq)).sum()
        g = _grad(total, theta)
        result = engine.evaluate(recipe)
        assert (result.expected_grad - g).norm() <= 1e-10 * g.norm(), name
        assert verdict_from_definitions(g, dirs, 1.0)[0] == expected == result.verdict, name
