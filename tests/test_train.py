"""Exact training dynamics (``biaslab.workflows.train``, ``biaslab.workflows.fixedpoints``): every end point is
checked against truths
computed here from the formulas (per-prefix backward induction written with dicts and scipy's root finder, the
optimality conditions, autograd of the defining objectives), never against the code under test itself."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq

from biaslab import ExactEngine, TabularAR, make_config, make_pair
from biaslab.cli import main
from biaslab.workflows.fixedpoints import targets
from biaslab.workflows.train import (
    ExactFlow,
    TabularProblem,
    expected_update,
    parse_config,
    parse_configs,
    parse_reward,
)

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------ independent truths


def cond_dict(model: TabularAR) -> dict[tuple, np.ndarray]:
    """{prefix tuple: next-token probabilities} of a tabular model."""
    V, T = model.vocab_size, model.length
    out = {}
    for t in range(T):
        probs = torch.softmax(model.levels[t].detach(), -1).numpy()
        for h in itertools.product(range(V), repeat=t):
            row = sum(y * V ** (t - 1 - s) for s, y in enumerate(h))
            out[h] = probs[row]
    return out


def seq_from_cond(cond: dict[tuple, np.ndarray], V: int, T: int) -> np.ndarray:
    """(V**T,) sequence probabilities, itertools.product order (= base V, first token most significant)."""
    return np.array([math.prod(cond[y[:t]][y[t]] for t in range(T)) for y in itertools.product(range(V), repeat=T)])


def reward_dict(reward: torch.Tensor, V: int, T: int) -> dict[tuple, float]:
    return {y: float(r) for y, r in zip(itertools.product(range(V), repeat=T), reward)}


def backward_induction(q: dict, R: dict, V: int, T: int, beta: float, rule: str) -> dict[tuple, np.ndarray]:
    """Per-prefix fixed points from the formulas, deepest prefixes first.

    forward:  pi(v|h) = beta q(v|h) / (mu_h - Q(h,v)), mu_h from sum_v pi(v|h) = 1 (scipy brentq)
    reverse:  pi(v|h) = q(v|h) exp(Q(h,v)/beta) / Z_h
    with Q(h,v) = R(hv) at the last level, else the expected reward sum_w pi(w|hv) Q(hv,w).
    """
    pi, value = {}, {}
    for t in range(T - 1, -1, -1):
        for h in itertools.product(range(V), repeat=t):
            Q = np.array([R[h + (v,)] if t == T - 1 else value[h + (v,)] for v in range(V)])
            if rule == "forward":
                qh = q[h]
                # the root lies in (max Q, max Q + beta]; at the right end only when Q is constant
                hi = Q.max() + beta * (1 + 1e-9)
                mu = brentq(lambda m, qh=qh, Q=Q: np.sum(beta * qh / (m - Q)) - 1, Q.max() + 1e-15, hi, xtol=1e-15)
                p = beta * qh / (mu - Q)
            else:
                w = q[h] * np.exp((Q - Q.max()) / beta)
                p = w
            p = p / p.sum()
            pi[h], value[h] = p, float(p @ Q)
    return pi


def independent_targets(ref: TabularAR, reward: torch.Tensor, beta: float) -> dict[str, np.ndarray]:
    V, T = ref.vocab_size, ref.length
    q, R = cond_dict(ref), reward_dict(reward, V, T)
    q_seq, r = seq_from_cond(q, V, T), reward.numpy()
    rev = q_seq * np.exp(r / beta)
    lam = brentq(lambda m: np.sum(beta * q_seq / (m - r)) - 1, r.max() + 1e-15, r.max() + beta * (1 + 1e-9), xtol=1e-15)
    fwd = beta * q_seq / (lam - r)
    return {
        "reverse_kl_optimum": rev / rev.sum(),
        "forward_kl_optimum": fwd / fwd.sum(),
        "forward_kl_token_fixed_point": seq_from_cond(backward_induction(q, R, V, T, beta, "forward"), V, T),
        "reverse_kl_token_fixed_point": seq_from_cond(backward_induction(q, R, V, T, beta, "reverse"), V, T),
    }


def tabular_from_seq_conditionals(p_seq: np.ndarray, V: int, T: int) -> TabularAR:
    """A tabular model whose sequence law is p_seq (conditionals by marginalisation; logits = log conditionals)."""
    p = torch.as_tensor(p_seq, dtype=torch.float64)
    levels = []
    for t in range(T):
        marg = p.reshape(V ** (t + 1), V ** (T - t - 1)).sum(1).reshape(V**t, V)  # (V**t, V) pi(h, v)
        levels.append((marg / marg.sum(-1, keepdim=True)).log())
    return TabularAR(levels)


CASES = [  # (V, T, seed, reward, beta): small problems, not the CLI's defaults
    (3, 3, 3, "binary:5", 0.5),
    (3, 3, 4, "uniform", 1.0),
    (2, 3, 8, "binary:2", 0.3),
]


def problem(V, T, seed, reward, kl_scale=1.0):
    policy, ref = make_pair("tabular", V, T, seed=seed, kl_scale=kl_scale)
    R = parse_reward(reward, V, T, seed=seed)
    pb = TabularProblem(ref, R)
    return pb, pb.stack([lvl.detach() for lvl in policy.levels]), ref, R


# ------------------------------------------------------------------------------------ closed forms


@pytest.mark.parametrize("case", CASES)
def test_closed_forms_match_independent_backward_induction(case):
    V, T, seed, rw, beta = case
    _, _, ref, R = problem(V, T, seed, rw)
    q_cond = [torch.softmax(lvl.detach(), -1) for lvl in ref.levels]
    mine = targets(q_cond, R, beta)
    truth = independent_targets(ref, R, beta)
    for name, p in truth.items():
        assert np.abs(mine[name].numpy() - p).sum() < 1e-10, name


@pytest.mark.parametrize("case", CASES[:2])
def test_each_target_is_a_stationary_point_of_its_configuration(case):
    """At each closed-form target, grad E[R] = beta E[g] for the configuration that should end there, with E[g]
    from the core's exact engine (a separate code path) and grad E[R] by autograd."""
    V, T, seed, rw, beta = case
    _, _, ref, R = problem(V, T, seed, rw)
    truth = independent_targets(ref, R, beta)
    which = {
        "reverse_kl_optimum": [("k1", "reward", "token"), ("k3", "both", "token")],
        "forward_kl_optimum": [("k3", "loss", "sequence")],
        "forward_kl_token_fixed_point": [("k3", "loss", "token")],
        "reverse_kl_token_fixed_point": [("k2", "loss", "token")],
    }
    from biaslab.engines.exact import enumerate_sequences

    for name, configs in which.items():
        policy = tabular_from_seq_conditionals(truth[name], V, T)
        tokens = enumerate_sequences(V, T)
        lp = policy.log_probs(tokens).gather(-1, tokens.unsqueeze(-1)).squeeze(-1).sum(-1)  # (N,)
        grads = torch.autograd.grad((lp.exp() * R).sum(), list(policy.parameters()))
        g_reward = torch.cat([g.reshape(-1) for g in grads])
        engine = ExactEngine(policy, ref)
        for est, placement, level in configs:
            g_kl = engine.expected_grad(make_config(est, placement, level))
            assert (g_reward - beta * g_kl).abs().max() < 1e-10, (name, est, placement, level)
        wrong = engine.expected_grad(make_config("k3", "reward", "token"))  # a configuration that does not stop here
        assert (g_reward - beta * wrong).abs().max() > 1e-4, name


# ------------------------------------------------------------------------------------ flows


@pytest.mark.parametrize("case", CASES[:2])
def test_unbiased_flows_reach_the_reverse_kl_optimum(case):
    V, T, seed, rw, beta = case
    pb, start, ref, R = problem(V, T, seed, rw)
    target = independent_targets(ref, R, beta)["reverse_kl_optimum"]
    for spec in ("k1:reward", "k3:both"):
        run = ExactFlow(pb, parse_config(spec), beta).run(start, steps=20_000, record=False)
        assert run.status == "converged", (spec, run.verdict)
        assert np.abs(np.array(run.final_seq_probs) - target).sum() < 1e-10, spec
        assert run.verdict.startswith("converges to reverse_kl_optimum"), run.verdict


@pytest.mark.parametrize(
    "spec, name",
    [
        ("k3:loss", "forward_kl_token_fixed_point"),
        ("k3:loss:sequence", "forward_kl_optimum"),
        ("k2:loss", "reverse_kl_token_fixed_point"),
    ],
)
def test_biased_flows_reach_their_closed_form_fixed_points(spec, name):
    V, T, seed, rw, beta = CASES[1]
    pb, start, ref, R = problem(V, T, seed, rw)
    truth = independent_targets(ref, R, beta)
    run = ExactFlow(pb, parse_config(spec), beta).run(start, steps=20_000, record=False)
    assert run.status == "converged" and run.nearest_target == name, run.verdict
    assert np.abs(np.array(run.final_seq_probs) - truth[name]).sum() < 1e-9
    assert np.abs(np.array(run.final_seq_probs) - truth["reverse_kl_optimum"]).sum() > 1e-3  # not pi*


def test_k3_loss_fixed_point_has_more_entropy_than_pi_star_at_small_beta():
    V, T, seed, rw, _ = CASES[0]
    _, _, ref, R = problem(V, T, seed, rw)
    truth = independent_targets(ref, R, 0.2)
    h = {k: float(-(p * np.log(p)).sum()) for k, p in truth.items()}
    assert h["forward_kl_token_fixed_point"] > h["reverse_kl_optimum"] + 0.01, h


def test_k1_in_loss_follows_the_no_kl_trajectory():
    V, T, seed, rw, beta = CASES[0]
    pb, start, _, _ = problem(V, T, seed, rw)
    a = ExactFlow(pb, parse_config("k1:loss"), beta).run(start, steps=1500)
    b = ExactFlow(pb, None, beta).run(start, steps=1500)
    assert a.steps == b.steps == 1500
    assert np.abs(np.array(a.final_seq_probs) - np.array(b.final_seq_probs)).max() < 1e-12
    for ra, rb in zip(a.trajectory, b.trajectory):
        assert ra["step"] == rb["step"] and abs(ra["reward"] - rb["reward"]) < 1e-12
    assert a.final["reward"] > 0.99  # it maximises the reward as if there were no KL at all


def test_k3_in_reward_diverges():
    V, T, seed, rw, beta = CASES[0]
    pb, start, _, _ = problem(V, T, seed, rw)
    run = ExactFlow(pb, parse_config("k3:reward"), beta).run(start, steps=20_000)
    assert run.status == "diverged" and run.verdict.startswith("diverges (collapse)"), run.verdict
    assert run.final["max_abs_log_ratio"] > 50
    assert run.trajectory[-1]["entropy"] < run.trajectory[0]["entropy"]


def test_without_reward_only_k3_in_reward_runs_away_from_the_reference():
    """R = 0: every target is pi_ref itself. From a perturbed start each configuration returns to pi_ref, except k3 in
    the reward, whose reverse KL grows."""
    V, T, seed = 3, 3, 11
    pb, start, ref, R = problem(V, T, seed, "zero", kl_scale=0.5)
    q = seq_from_cond(cond_dict(ref), V, T)
    for spec in ("k1:reward", "k3:both", "k3:loss", "k3:loss:sequence", "k2:loss"):
        run = ExactFlow(pb, parse_config(spec), 1.0).run(start, steps=5000, record=False)
        assert np.abs(np.array(run.final_seq_probs) - q).sum() < 1e-8, spec
    run = ExactFlow(pb, parse_config("k3:reward"), 1.0).run(start, steps=5000)
    kls = [r["reverse_kl"] for r in run.trajectory]
    assert run.status == "diverged" and kls[-1] > 10 * kls[0], (run.verdict, kls[0], kls[-1])


def test_lagged_k1_in_loss_is_ascent_on_the_kl_from_the_behaviour_policy():
    """Samples from a stale mu: E_mu[grad of beta * k1] = -beta grad sum_h mu(h) KL(mu(.|h) || pi(.|h)), so the
    update (minus the reward part) is +beta times that gradient: ascent, away from mu."""
    V, T, seed, _, beta = CASES[0]
    pb, start, _, _ = problem(V, T, seed, "binary:5")
    behaviour = start + 0.7 * torch.randn(start.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    kl_part = expected_update(pb, start, behaviour, parse_config("k1:loss"), beta) - expected_update(
        pb, start, behaviour, None, beta
    )
    # sum_h mu(h) KL(mu(.|h) || pi(.|h)) over stacked rows, differentiated by autograd
    theta = start.clone().requires_grad_(True)
    mu_rows = torch.softmax(behaviour, -1)
    mu_seq = seq_from_cond(
        {
            h: p
            for h, p in zip(
                itertools.chain.from_iterable(itertools.product(range(V), repeat=t) for t in range(T)), mu_rows.numpy()
            )
        },
        V,
        T,
    )
    prefix_mass = []
    for t in range(T):
        marg = mu_seq.reshape(V**t, V ** (T - t)).sum(1)
        prefix_mass.append(torch.as_tensor(marg))
    mass = torch.cat(prefix_mass)  # (P,) mu(h), stacked order
    F = (mass * (mu_rows * (mu_rows.log() - torch.log_softmax(theta, -1))).sum(-1)).sum()
    (grad,) = torch.autograd.grad(F, theta)
    assert (kl_part - beta * grad).abs().max() < 1e-12
    assert float((kl_part * grad).sum()) > 0


# ------------------------------------------------------------------------------------ command line


def test_cli_json_end_states_match_independent_fixed_points_on_an_unseen_problem(tmp_path, capsys):
    V, T = 3, 3
    g = torch.Generator().manual_seed(1234)
    arrays = {}
    for t in range(T):
        arrays[f"ref_{t}"] = torch.randn(V**t, V, generator=g, dtype=torch.float64).numpy()
        arrays[f"policy_{t}"] = arrays[f"ref_{t}"] + torch.randn(V**t, V, generator=g, dtype=torch.float64).numpy()
    np.savez(tmp_path / "start.npz", **arrays)
    reward = np.linspace(0, 1, V**T) ** 2
    np.save(tmp_path / "r.npy", reward)
    rc = main(
        [
            "train",
            "--logits",
            str(tmp_path / "start.npz"),
            "--reward",
            str(tmp_path / "r.npy"),
            "--beta",
            "0.7,2",
            "--configs",
            "k1:reward,k3:loss,k3:loss:sequence,k2:loss,k3:reward",
            "--format",
            "json",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"runs", "targets"}
    ref = TabularAR([arrays[f"ref_{t}"] for t in range(T)])
    want = {
        "k1:reward": "reverse_kl_optimum",
        "k3:loss": "forward_kl_token_fixed_point",
        "k3:loss:sequence": "forward_kl_optimum",
        "k2:loss": "reverse_kl_token_fixed_point",
    }
    for run in out["runs"]:
        assert {"config", "beta", "final_seq_probs", "verdict"} <= set(run)
        if run["config"] == "k3:reward":
            assert run["verdict"].startswith("diverges"), run["verdict"]
            continue
        truth = independent_targets(ref, torch.as_tensor(reward), run["beta"])[want[run["config"]]]
        assert np.abs(np.array(run["final_seq_probs"]) - truth).sum() < 1e-5, run["config"]
        assert run["verdict"].startswith(f"converges to {want[run['config']]}"), run["verdict"]
    for beta in ("0.7", "2.0"):
        assert set(out["targets"][beta]) == set(want.values())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--configs", "k3"], "ESTIMATOR:PLACEMENT"),
        (["--configs", "k9:loss"], "unknown estimator"),
        (["--reward", "binary:0"], "K must lie"),
        (["--reward", "nope"], "unknown reward"),
        (["--beta", "0"], "positive"),
        (["--mode", "mc", "--model", "neural"], "tabular models only"),
        (["--mode", "mc", "--clip", "1.5"], "[0, 1)"),
        (["--vocab", "1"], "at least 2 tokens"),
        (["--samples", "0"], "positive integer"),
        # a flag the chosen mode does not read is refused, not silently ignored
        (["--samples", "64"], "--samples not read with --mode exact"),
        (["--lag", "2", "--clip", "0.2", "--baseline", "grpo"], "--baseline, --lag, --clip not read with --mode exact"),
        (["--mode", "mc", "--tol", "1e-6"], "--tol not read with --mode mc"),
        (["--mode", "mc", "--no-precondition"], "--no-precondition not read with --mode mc"),
        (["--model", "neural", "--no-precondition"], "not read with the neural model"),
        (["--lr", "0"], "must be a finite number > 0"),
        (["--tol", "-1"], "must be a finite number > 0"),
    ],
)
def test_cli_usage_errors_exit_2(args, message, capsys):
    try:
        rc = main(["train", "--vocab", "2", "--length", "2", "--steps", "5", "--reward", "binary:2", *args])
    except SystemExit as exc:  # argparse rejects a bad flag value itself
        rc = exc.code
    assert rc == 2
    assert message in capsys.readouterr().err


def test_parse_configs():
    cs = parse_configs("k1:reward,k3:loss:sequence,none")
    assert cs[0].label == make_config("k1", "reward").label
    assert cs[1].level.value == "sequence" and cs[2] is None
