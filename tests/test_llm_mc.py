"""Monte Carlo statistics of the real-LLM path against exact truths on a tiny GPT-2 (every response enumerable).

512 responses from pi_theta (LoRA rank 2, perturbation 0.4, V = 5, L = 3, seed 0; sequence KL about 0.09 nats),
256 more for the directions and 256 from pi_ref. Each assertion is a level 0.01 test or a 99% interval (the
report's own intervals are computed at alpha = 0.01 here), so for a random seed each fails with probability about
0.01 and the file with probability below 10%; with the fixed seed the outcome is deterministic. Agreement in kind
with the toy engine: the reference is consistent with grad KL(pi || pi_ref); k1 in reward has zero relative bias
inside its interval; k1 in the loss (zero expectation) has relative bias exactly -1 inside its interval; k3 in the
loss is biased toward the token-level forward KL, and the exact value of that component lies in its interval.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

pytest.importorskip("transformers", reason="the llm extra is not installed: pip install -e '.[llm]'")

from biaslab.llm.calibration import hotelling  # noqa: E402
from biaslab.llm.enumerate import exact_expectations  # noqa: E402
from biaslab.llm.run import REFERENCE_KEY, LLMOptions, build, collect, summarize  # noqa: E402

ALPHA = 0.01
Z = stats.norm.ppf(1 - ALPHA / 2)


@pytest.fixture(scope="module")
def mc_and_exact():
    opts = LLMOptions(model="tiny-random-gpt2", vocab_size=5, max_new_tokens=3, weights_dtype="float64",
                      n_random_prompts=1, lora_rank=2, perturb=0.4, configs=("k1:reward", "k1:loss", "k3:loss"),
                      samples=512, direction_samples=256, alpha=ALPHA, batch_size=128, progress=False,
                      max_dense=10**9, seed=0, bootstrap=1000)
    exact = exact_expectations(build(opts, "cpu"), 3, "float64")
    rows, setup, timing = collect(opts)
    return opts, exact, rows, summarize(rows, setup, opts, timing)


def test_reference_is_consistent_with_the_exact_gradient(mc_and_exact):
    _, exact, rows, _ = mc_and_exact
    r = exact.reverse_kl
    q, _ = torch.linalg.qr(torch.stack([r, exact.forward_kl, exact.expected["forward_kl_token"]], 1))  # (P, 3)
    _, p, _, _ = hotelling((rows["main"][REFERENCE_KEY] - r) @ q)
    assert p > ALPHA
    _, p_dir, _, _ = hotelling((rows["directions"][REFERENCE_KEY] - r) @ q)
    assert p_dir > ALPHA


def test_report_intervals_contain_the_exact_values(mc_and_exact):
    """The report (samples only) against exact truths computed with the report's own directions."""
    _, exact, rows, report = mc_and_exact
    by = {row["config"]: row for row in report["configs"]}
    k1, k1_loss, k3 = by["k1:reward:token:rtg"], by["k1:loss:token"], by["k3:loss:token"]
    assert not k1["biased"] and k1["ci_low"] < 0 < k1["ci_high"]
    assert k1["verdict"].startswith("no bias detected (detectable >= ")
    assert k1_loss["biased"] and k1_loss["ci_low"] <= -1 <= k1_loss["ci_high"]  # exactly -1 along any direction
    r = exact.reverse_kl
    r_dir = rows["directions"][REFERENCE_KEY].mean(0)
    ftok_dir = rows["directions"]["forward_kl_token"].mean(0)
    u = r_dir / r_dir.norm()
    w = (ftok_dir - r_dir) / (ftok_dir - r_dir).norm()
    b3 = exact.expected["k3:loss:token"] - r
    assert k3["ci_low"] <= float(b3 @ u) / float(r @ u) <= k3["ci_high"]
    toward = float(b3 @ w) / float(r @ u)
    assert k3["toward_ci_low"] <= toward <= k3["toward_ci_high"]
    assert k3["biased"] and k3["toward_ci_low"] > 0  # biased toward the token-level forward direction
    cos = lambda a, c: float(a @ c / (a.norm() * c.norm()))  # noqa: E731
    assert cos(exact.expected["k3:loss:token"], exact.expected["forward_kl_token"]) > cos(
        exact.expected["k3:loss:token"], r)


def test_kl_and_values_against_the_exact_kl(mc_and_exact):
    _, exact, _, report = mc_and_exact
    kl = report["sequence_kl"]
    assert abs(kl["mean"] - exact.kl) < Z * kl["se"]
    for name in ("k1", "k3"):  # unbiased values of the KL
        v = report["values"][name]
        assert abs(v["bias_vs_exact"]) < Z * v["bias_se"] + 1e-12
    assert report["numeric_floor"]["nats"] == 0.0  # float64 weights: no floor
    assert all(math.isfinite(row["cos_forward"]) for row in report["configs"])
