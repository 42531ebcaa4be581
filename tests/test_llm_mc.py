"""Monte Carlo statistics of the real-LLM path against exact truths on a tiny GPT-2 (every response enumerable).

512 responses from pi_theta (LoRA rank 2, perturbation 0.4, V = 5, L = 3, seed 0). Each assertion is a level
alpha = 1e-3 test (normal / Hotelling with the standard errors of ``biaslab.stats``), so for a random seed each
fails with probability about 1e-3 and the file with probability below 5e-3; with the fixed seed the outcome is
deterministic. Agreement in kind with the toy engine: k1 in reward is consistent with grad KL(pi || pi_ref);
k3 in loss is biased beyond its confidence interval, toward the token-level forward KL direction, which its mean
is consistent with.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

pytest.importorskip("transformers", reason="the llm extra is not installed: pip install -e '.[llm]'")

from biaslab.llm.enumerate import exact_expectations  # noqa: E402
from biaslab.llm.run import REFERENCE_KEY, LLMOptions, build, collect, subspace_bias_test, summarize  # noqa: E402
from biaslab.stats import bias_test  # noqa: E402

ALPHA = 1e-3
K = 3  # directions of the Hotelling tests: the reference, the forward and the token-level forward directions
Z = stats.norm.ppf(1 - ALPHA / 2)


@pytest.fixture(scope="module")
def mc_and_exact():
    opts = LLMOptions(model="tiny-random-gpt2", vocab_size=5, max_new_tokens=3, weights_dtype="float64",
                      n_random_prompts=1, lora_rank=2, perturb=0.4, configs=("k1:reward", "k3:loss"), samples=512,
                      alpha=ALPHA, batch_size=128, progress=False, max_dense=10**9, seed=0)
    exact = exact_expectations(build(opts, "cpu"), 3, "float64")
    merged, setup, timing = collect(opts)
    return opts, exact, merged, summarize(merged, setup, opts, timing)


def test_reference_and_k1_in_reward_are_consistent_with_the_exact_gradient(mc_and_exact):
    _, exact, merged, _ = mc_and_exact
    r, others = exact.reverse_kl, [exact.forward_kl, exact.expected["forward_kl_token"]]
    assert bias_test(merged[REFERENCE_KEY], r, alpha=ALPHA, n_projections=16).p_value > ALPHA
    assert subspace_bias_test(merged[REFERENCE_KEY], r, others, K, ALPHA, 0).p_value > ALPHA
    k1 = subspace_bias_test(merged["raw|k1:reward:token:rtg"], r, others, K, ALPHA, 0)
    assert k1.p_value > ALPHA
    assert k1.ci_low < 0 < k1.ci_high  # the exact relative bias along r, 0, lies inside the CI


def test_k3_in_loss_is_biased_toward_the_forward_direction(mc_and_exact):
    _, exact, merged, _ = mc_and_exact
    r, e3, f_tok = exact.reverse_kl, exact.expected["k3:loss:token"], exact.expected["forward_kl_token"]
    m = merged["raw|k3:loss:token"]
    b = e3 - r  # exact bias
    u = b / b.norm()
    along = float((m.mean - r) @ u)
    se = math.sqrt(float(u @ m.cov @ u) / m.n)
    assert along - Z * se > 0  # zero bias lies outside the CI ...
    assert abs(along - float(b.norm())) < Z * se  # ... and the exact bias inside it
    directions = [exact.forward_kl, f_tok]
    assert subspace_bias_test(m, r, directions, K, ALPHA, 0).p_value < ALPHA
    assert subspace_bias_test(m, f_tok, [r, exact.forward_kl], K, ALPHA, 0).p_value > ALPHA  # consistent with it
    # the direction of the bias: toward the forward KL (exact cosines, then the Monte Carlo one)
    cos = lambda a, c: float(a @ c / (a.norm() * c.norm()))
    assert cos(e3, f_tok) > cos(e3, r)
    assert cos(b, exact.forward_kl - r) > 0.5


def test_report_verdicts_from_samples_alone(mc_and_exact):
    """The report (paired test against the sampled reference, no exact truth) reaches the same verdicts."""
    opts, exact, _, report = mc_and_exact
    rows = {row["config"]: row for row in report["configs"]}
    k1, k3 = rows["k1:reward:token:rtg"], rows["k3:loss:token"]
    assert k1["p_value"] > ALPHA and not k1["biased"]
    assert k1["toward_ci_low"] < 0 < k1["toward_ci_high"]
    assert k3["p_value"] < ALPHA and k3["biased"]
    assert k3["toward_ci_low"] > 0  # biased toward the token-level forward direction beyond its CI
    kl = report["sequence_kl"]
    assert abs(kl["mean"] - exact.kl) < Z * kl["se"]
    values = report["values"]
    for name in ("k1", "k3"):  # unbiased values of the KL
        assert abs(values[name]["bias_vs_exact"]) < Z * values[name]["bias_se"] + 1e-12
    assert all(torch.isfinite(torch.tensor(row["cos_forward"])) for row in report["configs"])
