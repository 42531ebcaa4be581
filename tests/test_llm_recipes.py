"""The stacked backward pass, the KL sweep by truncation, and framework recipes / user losses on the real-LLM path
(tiny random models, float64 weights).

* one batched backward pass through the hidden states gives the numbers of one logits backward per cotangent;
* a response's first L' tokens scored as part of the full response give the rows of the response cut at L';
* a preset whose recipe is a built-in configuration gives its per-sample gradients; ``--loss`` with verl's own
  functions (examples/frameworks/verl_real.py) equals verl's preset on the same groups; refusals are one-line
  errors.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytest.importorskip("transformers", reason="the llm extra is not installed: pip install -e '.[llm]'")

from biaslab.cli import main  # noqa: E402
from biaslab.llm.models import LLMError  # noqa: E402
from biaslab.llm.run import (  # noqa: E402
    FORWARD_KEY,
    FORWARD_TOKEN_KEY,
    REFERENCE_KEY,
    LLMOptions,
    build,
    forward_rows,
    sample_grads,
)
from biaslab.llm.sample import Generation, generate  # noqa: E402

CONFIGS = ("k1:reward", "k1:loss", "k2:loss", "k3:reward", "k3:loss", "k3:both", "k1:loss:sequence",
           "k3:loss:sequence", "k1:reward:token:full", "rb:loss")
VERL_LOSS = "examples/frameworks/verl_real.py:grpo_k3_in_loss"
needs_verl = pytest.mark.skipif(importlib.util.find_spec("verl") is None,
                                reason="verl 0.9.1 not installed: pip install --no-deps -r requirements/frameworks.txt")


def _setup(model="tiny-random", params="lora", configs=CONFIGS, length=6, **kw):
    opts = LLMOptions(model=model, vocab_size=11, max_new_tokens=length, weights_dtype="float64", params=params,
                      n_random_prompts=2, perturb=0.4, configs=configs, progress=False, max_dense=10**9, **kw)
    opts.validate()
    return opts, build(opts, "cpu")


def _gen(setup, n=4, length=6, eos=None, seed=1):
    prompts = [setup.prompts[(i // setup.group) % len(setup.prompts)] for i in range(n)]
    return generate(setup.loaded.model, prompts, length, sample_seeds=[(0, seed, i) for i in range(n)], eos=eos,
                    pad=setup.loaded.pad_token_id)


def _close(a, b, msg=""):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12 * max(float(b.abs().max()), 1e-300), msg=msg)


@pytest.mark.parametrize("model,params", [("tiny-random", "lora"), ("tiny-random-gpt2", "last-layer")])
def test_stacked_backward_equals_one_backward_per_cotangent(model, params):
    opts, setup = _setup(model, params)
    assert setup.psg.subset.method == "hooks" and not setup.head_in_subset
    gen = _gen(setup)
    keys = (REFERENCE_KEY, *setup.configs, FORWARD_TOKEN_KEY)
    fast, values = sample_grads(setup, gen, "float64", keys, truncations=(2, 4), stacked=True)
    slow, values2 = sample_grads(setup, gen, "float64", keys, truncations=(2, 4), stacked=False)
    assert set(fast) == set(slow) and f"{REFERENCE_KEY}@2" in fast and "values@4" in fast
    for key in fast:
        _close(fast[key], slow[key], key)
    torch.testing.assert_close(values, values2)
    f1, f2 = forward_rows(setup, gen, "float64", (3,), True), forward_rows(setup, gen, "float64", (3,), False)
    for key in (FORWARD_KEY, f"{FORWARD_KEY}@3"):
        _close(f1[key], f2[key], key)


def test_head_in_the_subset_takes_the_logits_path():
    opts, setup = _setup("tiny-random-gpt2", params="transformer.wte.weight,transformer.h.1.mlp.c_fc.weight",
                         configs=("k3:loss", "k1:reward"))
    assert setup.head_in_subset
    gen = _gen(setup, n=3)
    fast, _ = sample_grads(setup, gen, "float64", stacked=True)
    slow, _ = sample_grads(setup, gen, "float64", stacked=False)
    for key in fast:
        _close(fast[key], slow[key], key)


def test_truncated_rows_equal_the_cut_responses():
    """The KL sweep by truncation: rows '@L' from the full responses equal the rows of the responses cut at L."""
    opts, setup = _setup(length=6)
    gen = _gen(setup, n=4, length=6, eos=3)  # variable lengths: some responses end before the cut
    assert gen.mask.sum(1).min() < 6
    keys = (REFERENCE_KEY, *setup.configs, FORWARD_TOKEN_KEY)
    full, _ = sample_grads(setup, gen, "float64", keys, truncations=(3,))
    cut = Generation(gen.prompt, gen.prompt_mask, gen.completion[:, :3], gen.mask[:, :3])
    alone, values = sample_grads(setup, cut, "float64", keys)
    for key in keys:
        _close(full[f"{key}@3"], alone[key], key)
    torch.testing.assert_close(full["values@3"], values)
    cut_rows = forward_rows(setup, cut, "float64")[FORWARD_KEY]
    _close(forward_rows(setup, gen, "float64", (3,))[f"{FORWARD_KEY}@3"], cut_rows)


def test_preset_recipe_equal_to_a_builtin_gives_its_per_sample_gradients():
    """verl with use_kl_loss, kl_loss_type mse (k2, unclamped), token-sum, one response per prompt: the recipe's
    per-group gradient divided by its nominal scale (kl_loss_coef) is k2-in-loss's per-sample gradient."""
    a = "actor_rollout_ref.actor."
    opts, setup = _setup(configs=("k2:loss", "k1:loss"), framework="verl", framework_settings=(
        f"{a}use_kl_loss=true", f"{a}kl_loss_type=mse", f"{a}loss_agg_mode=token-sum", f"{a}kl_loss_coef=0.05"))
    rule = setup.rules["framework:verl"]
    assert rule.group_size == 1 and "k2 in loss" in rule.description
    assert any("updates per rollout" in n for n in rule.notes)  # verl's default mini-batches: said, not ignored
    gen = _gen(setup, n=4, eos=3)
    grads, _ = sample_grads(setup, gen, "float64", (REFERENCE_KEY, "k2:loss:token", "framework:verl"), (3,))
    # the recipe's cotangent is beta times the configuration's: equal up to float32 rounding in the backward pass
    # (transformers' RMSNorm computes in float32 even with float64 weights)
    for key in ("", "@3"):
        torch.testing.assert_close(grads[f"framework:verl{key}"], grads[f"k2:loss:token{key}"], rtol=1e-5,
                                   atol=1e-6 * float(grads[f"k2:loss:token{key}"].abs().max()))


@needs_verl
def test_loss_with_verls_own_functions_equals_verls_preset():
    """verl's GRPO k3-in-loss written with verl's functions (--loss) and verl's preset with the same keys: the same
    per-group updates on the same groups of 2 (token-mean over the group, kl_loss_coef 0.001)."""
    a = "actor_rollout_ref.actor."
    opts, setup = _setup(configs=("k3:loss",), losses=(VERL_LOSS,), loss_beta=0.001, loss_agg="token-mean",
                         framework="verl", framework_settings=(
                             "algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.n=2", f"{a}use_kl_loss=true",
                             f"{a}kl_loss_type=low_var_kl", f"{a}loss_agg_mode=token-mean"))
    assert setup.group == 2 and setup.rules[f"loss:{VERL_LOSS}"].group_size == 2
    gen = _gen(setup, n=4)
    keys = (REFERENCE_KEY, "framework:verl", f"loss:{VERL_LOSS}")
    grads, _ = sample_grads(setup, gen, "float64", keys)
    assert grads["framework:verl"].shape[0] == 2  # one row per group
    torch.testing.assert_close(grads[f"loss:{VERL_LOSS}"], grads["framework:verl"], rtol=1e-6, atol=1e-9)


@needs_verl
@pytest.mark.filterwarnings("ignore:--samples", "ignore:.*groups, below")
def test_cli_loss_with_a_real_framework_example(capsys):
    args = ["llm", "--model", "tiny-random", "--samples", "16", "--direction-samples", "8", "--max-new-tokens", "3",
            "--configs", "k3:loss", "--loss", VERL_LOSS, "--beta", "0.001", "--agg", "token-mean", "--group-size", "2",
            "--bootstrap", "200", "--no-progress", "--out", "", "--format", "json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    row = next(r for r in report["configs"] if r["config"] == f"loss:{VERL_LOSS}")
    assert row["groups"] == 8 and row["group_size"] == 2 and row["n"] == 8
    if "ci" in row["unbounded"]:  # 8 groups: Fieller's set may be the whole line (null ends, the reason beside)
        assert row["ci_low"] is None and "not significantly nonzero" in row["unbounded"]["ci"]
    else:
        assert row["ci_low"] <= row["rel_bias_along_reference"] <= row["ci_high"]
    assert any("8 groups, below" in w for w in report["warnings"])
    # 8 groups in 4 directions: many bootstrap resamples are rank-deficient; they count against rejection, said once
    assert row["bootstrap_degenerate"] > 0 and any("bootstrap resamples" in w for w in report["warnings"])


@pytest.mark.filterwarnings("ignore:--samples", "ignore:.*groups, below", "ignore:.*updates per rollout")
def test_framework_text_report_and_whitened_recipe(capsys):
    """OpenRLHF's default (k1 in the reward, whitened advantages): the whitening statistics come from the direction
    samples; the row is reported with its recipe, groups and the on-policy note."""
    args = ["llm", "--model", "tiny-random", "--samples", "16", "--direction-samples", "8", "--max-new-tokens", "3",
            "--configs", "k1:reward", "--framework", "openrlhf", "--bootstrap", "200", "--no-progress", "--out", ""]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "openrlhf recipe (B=1)" in out and "whitened" in out and "16 groups of 1" in out
    assert "first (on-policy) update only" in out


@pytest.mark.parametrize("extra,message", [
    (["--framework", "verl", "--set", "actor_rollout_ref.rollout.n=2", "--set",
      "actor_rollout_ref.actor.use_kl_loss=true", "--samples", "15"], "not a multiple of the recipes' group size 2"),
    (["--framework", "verl"], "nothing to measure (pass --enable-kl)"),
    (["--framework", "trl-grpo", "--enable-kl", "--samples", "32"], "(4 groups of 8 responses): the 4-direction "
     "Hotelling test needs at least 8 independent groups; use --samples >= 64"),
    (["--framework", "roll", "--set", "kl_penalty=full"], "'full' needs the full next-token distributions"),
    (["--framework", "nosuch"], "unknown framework"),
    (["--set", "algorithm.use_kl_in_reward=true"], "go with --framework"),
    (["--beta", "0.1"], "go with --loss"),
    (["--loss", "examples/frameworks/nosuch.py:f"], "--loss"),
])
def test_refusals_are_one_line_errors(extra, message, capsys):
    base = ["llm", "--model", "tiny-random", "--samples", "16", "--max-new-tokens", "3", "--no-progress", "--out", ""]
    assert main([*base, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("biaslab llm: error:") and message in err and "Traceback" not in err


def test_full_logit_estimators_are_refused_in_a_recipe():
    from biaslab.core.recipes import Recipe
    from biaslab.llm.recipes import LLMRule, build_rules

    opts = LLMOptions(model="tiny-random")
    assert build_rules(opts) == []
    rule = LLMRule("x", "rb recipe", Recipe(reward_estimator="rb", reward_coef=1.0), 2, "")
    with pytest.raises(LLMError, match="whole next-token distributions"):
        import biaslab.llm.recipes as R

        orig = R._loss_rule
        R._loss_rule = lambda opts, spec: rule
        try:
            build_rules(LLMOptions(model="tiny-random", losses=("x",)))
        finally:
            R._loss_rule = orig
