"""Presets and ``biaslab audit``: verdicts computed on the toy (never tabled), framework-key validation, the
nearest-unbiased search, and the CLI's exit codes and JSON."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from biaslab.cli import main
from biaslab.frameworks import PRESETS, PresetError, get_preset
from biaslab.frameworks.base import resolve_interpolation
from biaslab.workflows.audit import AuditToy, audit, audit_defaults

TOY = AuditToy(max_group=2, search_group=1, max_evals=150)


@pytest.fixture(scope="module")
def defaults():
    return {r["framework"]: r for r in audit_defaults(TOY)}


def test_done_when_defaults(defaults):
    for name, direction in (
        ("verl", "forward_kl_token"),
        ("skyrl", "forward_kl_token"),
        ("nemo-rl", "reverse_kl_token"),
    ):
        r = defaults[name]
        assert r["verdict"] == "biased", name
        assert r["on_policy"]["direction"] == direction, name
    assert defaults["verl"]["kl_enabled_by_audit"] == {"actor_rollout_ref.actor.use_kl_loss": True}
    assert defaults["skyrl"]["kl_enabled_by_audit"] == {}  # SkyRL's default has the KL loss on
    orl = defaults["openrlhf"]
    assert orl["verdict"] == "unbiased" and orl["on_policy"]["direction"] == "reverse_kl"
    assert orl["off_policy"]["verdict"] == "biased"  # stale samples: KL from mu's log-probs, clipped ratios
    assert orl["on_policy"]["rel_bias"] < 1e-9 < orl["off_policy"]["rel_bias"]
    assert defaults["slime"]["verdict"] == "zero"  # k1 in the loss: zero in expectation
    assert set(defaults) == set(PRESETS)


def test_nearest_unbiased_verl_is_written_in_verl_keys():
    r = audit("verl", {"actor_rollout_ref.actor.use_kl_loss": "true"}, TOY)
    near = r["nearest_unbiased"]
    assert near["changes"] == {"algorithm.use_kl_in_reward": True, "actor_rollout_ref.actor.use_kl_loss": False}
    # the suggested configuration is verified by the audit itself
    again = audit("verl", {"actor_rollout_ref.actor.use_kl_loss": "true", **near["changes"]}, TOY, search=False)
    assert again["verdict"] == "unbiased"


@pytest.mark.parametrize(
    "framework,settings,verdict",
    [
        (
            "verl",
            {"algorithm.use_kl_in_reward": "true", "algorithm.adv_estimator": "rloo", "actor_rollout_ref.rollout.n": 2},
            "unbiased",
        ),
        (
            "verl",
            {"algorithm.use_kl_in_reward": "true", "algorithm.adv_estimator": "grpo", "actor_rollout_ref.rollout.n": 2},
            "biased",
        ),
        ("verl", {"actor_rollout_ref.actor.use_kl_loss": "true", "actor_rollout_ref.actor.kl_loss_type": "k1"}, "zero"),
        ("openrlhf", {"algo.kl.use_loss": "true", "algo.kl.estimator": "k3"}, "biased"),
        ("trl-grpo", {"beta": "0.04", "use_bias_correction_kl": "false"}, "biased"),
        ("trl-ppo", {"lam": "1.0"}, "unbiased"),
        (
            "skyrl",
            {
                "trainer.algorithm.use_kl_loss": "false",
                "trainer.algorithm.use_kl_in_reward": "true",
                "trainer.algorithm.kl_estimator_type": "k1",
                "trainer.algorithm.advantage_estimator": "rloo",
            },
            "unbiased",
        ),
    ],
)
def test_configurations(framework, settings, verdict):
    assert audit(framework, settings, TOY, search=False)["verdict"] == verdict


def test_unknown_keys_and_values_list_the_accepted_ones():
    with pytest.raises(PresetError, match="accepted keys: .*algorithm.use_kl_in_reward"):
        get_preset("verl").config({"algorithm.use_kl_in_rewards": "true"})
    with pytest.raises(PresetError, match="accepted values: .*low_var_kl"):
        get_preset("verl").config({"actor_rollout_ref.actor.kl_loss_type": "k4"})
    with pytest.raises(PresetError, match="choose one of: verl"):
        get_preset("megatron")
    with pytest.raises(PresetError, match="mutually exclusive"):
        get_preset("skyrl").config({"trainer.algorithm.use_kl_in_reward": "true"})
    assert get_preset("openrlhf").config({"--algo.kl.use_loss": "true"})["algo.kl.use_loss"] is True


def test_cli_exit_codes_and_json(capsys, tmp_path):
    assert main(["audit", "--framework", "openrlhf", "--no-search", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "unbiased" and report["off_policy"]["verdict"] == "biased"
    cfg = tmp_path / "verl.yaml"
    cfg.write_text("actor_rollout_ref:\n  actor:\n    use_kl_loss: true\n    kl_loss_type: low_var_kl\n")
    assert main(["audit", "--framework", "verl", "--config", str(cfg), "--no-search"]) == 1
    assert "forward_kl_token" in capsys.readouterr().out
    assert main(["audit", "--framework", "verl", "--set", "nope=1"]) == 2
    assert "accepted keys" in capsys.readouterr().err
    assert main(["audit", "--framework", "verl", "--set", "novalue"]) == 2
    assert main(["audit"]) == 2


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_accepted_value_builds_a_recipe(name):
    """Each key's accepted values map to a recipe (or to the framework's own validation error)."""
    preset = get_preset(name)
    base = preset.config({})
    assert preset.recipe(base).name == name
    for key in preset.keys:
        values = list(key.choices) if key.kind == "choice" else [True, False] if key.kind == "bool" else []
        for value in values:
            try:
                cfg = preset.config({**base, key.name: value})
            except PresetError:
                continue
            preset.recipe(cfg)


def test_defaults_json_is_strict(capsys):
    assert main(["audit", "--framework", "slime", "--enable-kl", "--no-search", "--format", "json"]) == 1
    out = capsys.readouterr().out
    report = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert report["verdict"] == "zero" and report["kl_enabled_by_audit"] == {"use-kl-loss": True, "kl-loss-coef": 0.001}


# ---------------------------------------------------------------- fidelity (issue #10): each fails on the old presets


def test_nemo_rl_kl_in_reward_vanishes_with_grpo_and_is_per_token_with_reinforce_pp():
    """advantage_estimator.py: GRPOAdvantageEstimator never reads log-probs and loss_functions.py zeroes the loss
    coefficient, so use_kl_in_reward with the default estimator has no KL at all; Reinforce++ subtracts beta * k_t
    from each token's advantage (no reward-to-go) and whitens: a per-token partial gradient."""
    r = audit("nemo-rl", {"loss_fn.use_kl_in_reward": "true"}, TOY, search=False)
    assert r["verdict"] == "no_kl" and any("disappears" in n for n in r["notes"])
    rpp = {"loss_fn.use_kl_in_reward": "true", "grpo.adv_estimator.name": "reinforce_plus_plus"}
    recipe = get_preset("nemo-rl").recipe(get_preset("nemo-rl").config(rpp))
    assert recipe.reward_lambda == 0.0 and recipe.whiten and recipe.baseline_on == "task"
    assert audit("nemo-rl", rpp, TOY, search=False)["verdict"] == "biased"
    # with k1 the per-token partial gradient is exactly the per-token reverse KL
    r = audit("nemo-rl", {**rpp, "loss_fn.reference_policy_kl_type": "k1"}, TOY, search=False)
    assert r["verdict"] == "biased" and r["on_policy"]["direction"].startswith("reverse_kl_token")
    # the old layout's keys still read
    assert (
        get_preset("nemo-rl").config({"grpo.use_leave_one_out_baseline": "false"})[
            "grpo.adv_estimator.use_leave_one_out_baseline"
        ]
        is False
    )


def test_nemo_rl_fix_is_never_kl_in_reward_with_grpo():
    near = audit("nemo-rl", {}, TOY)["nearest_unbiased"]
    assert near is None or near["changes"] != {"loss_fn.use_kl_in_reward": True}
    if near:
        assert audit("nemo-rl", near["changes"], TOY, search=False)["verdict"] == "unbiased"


def test_slime_reinforce_pp_baseline_is_per_token_partial():
    """ppo_utils.get_reinforce_plus_plus_baseline_advantages: (R - group mean of R) - kl_coef * k_t per token."""
    s = {"advantage-estimator": "reinforce_plus_plus_baseline", "kl-coef": "0.01", "n-samples-per-prompt": "2"}
    recipe = get_preset("slime").recipe(get_preset("slime").config(s))
    assert (recipe.reward_lambda, recipe.baseline, recipe.baseline_on) == (0.0, "batch_mean", "task")
    r = audit("slime", s, TOY, search=False)
    assert r["verdict"] == "biased" and r["on_policy"]["direction"] == "reverse_kl_token"
    # reinforce_plus_plus (discounted returns) keeps the reward-to-go: unbiased on-policy
    s2 = {**s, "advantage-estimator": "reinforce_plus_plus"}
    assert audit("slime", s2, TOY, search=False)["verdict"] == "unbiased"


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_openrlhf_kl_loss_is_a_global_token_mean_whatever_loss_agg_mode(mode):
    """ppo_actor.py: aggregate_loss(kl, action_mask, **loss_batch_info) without token_level_loss."""
    preset = get_preset("openrlhf")
    recipe = preset.recipe(preset.config({"algo.kl.use_loss": "true", "actor.loss_agg_mode": mode}))
    assert recipe.loss_agg == "token-mean" and recipe.pg_agg == mode


def test_accepted_keys_that_were_ignored_now_act_or_are_refused():
    verl = get_preset("verl")
    assert verl.updates_per_rollout(verl.config({})) == 4  # 1024 / 256 prompts, 1 epoch
    assert verl.updates_per_rollout(verl.config({"actor_rollout_ref.actor.ppo_epochs": 3})) == 12
    one = {"actor_rollout_ref.actor.ppo_mini_batch_size": 1024, "actor_rollout_ref.actor.use_kl_loss": "true"}
    r = audit("verl", one, TOY, search=False)
    assert r["off_policy"]["behaviour"].startswith("on-policy") and r["off_policy"]["verdict"] == r["verdict"]
    r = audit("verl", {**one, "actor_rollout_ref.actor.ppo_epochs": 2}, TOY, search=False)
    assert r["off_policy"]["updates_per_rollout"] == 2 and r["off_policy"]["behaviour"].startswith("mu = pi")
    trl_ppo = get_preset("trl-ppo")
    assert trl_ppo.updates_per_rollout(trl_ppo.config({})) == 4
    assert trl_ppo.updates_per_rollout(trl_ppo.config({"num_ppo_epochs": 1})) == 1
    grpo = get_preset("trl-grpo")
    assert grpo.config({})["max_completion_length"] == 512  # TRL 1.16 default
    dr = grpo.recipe(grpo.config({"beta": 0.04, "loss_type": "dr_grpo", "max_completion_length": 1024}))
    assert dr.horizon == 1024 and dr.loss_agg == "constant"
    assert grpo.updates_per_rollout(grpo.config({"num_iterations": 2})) == 2
    with pytest.raises(PresetError, match="generation engine"):
        get_preset("nemo-rl").config({"loss_fn.use_importance_sampling_correction": "true"})
    with pytest.raises(PresetError, match="adaptive KL controller"):
        get_preset("openrlhf").config({"algo.kl.target": "0.1"})
    with pytest.raises(PresetError, match="adaptive controller"):
        verl.config({"algorithm.kl_ctrl.type": "adaptive"})
    orl = get_preset("openrlhf")
    assert orl.updates_per_rollout(orl.config({})) == 8  # 1024 prompts x 1 / 128 samples
    assert orl.updates_per_rollout(orl.config({"rollout.batch_size": 128})) == 1


# Contexts in which each key can act (all KL paths on); a key acts when changing it changes the recipe, the group
# size, the updates per rollout, the no-KL reason, or is refused.
RICH = {
    "verl": {"algorithm.use_kl_in_reward": True, "actor_rollout_ref.actor.use_kl_loss": True},
    "openrlhf": {},
    "trl-grpo": {"beta": 0.04},
    "trl-rloo": {},
    "trl-ppo": {},
    "skyrl": {},
    "slime": {
        "use-kl-loss": True,
        "kl-loss-coef": 0.01,
        "kl-coef": 0.01,
        "advantage-estimator": "ppo",
        "rollout-batch-size": 32,
        "global-batch-size": 32,
    },
    "nemo-rl": {},
    "roll": {"use_kl_loss": True, "kl_loss_coef": 0.01, "add_token_level_kl": True},
    "areal": {},
    "easyr1": {},
    "ms-swift": {},
    "oat": {"kl_penalty_coef": 0.01},
    "torchforge": {},
    "tinker": {"kl_penalty_coef": 0.01},
}
INFORMATIONAL = {("verl", "data.max_response_length")}  # the loss_scale_factor value suggested with sum-norm


def _alternatives(key):
    """Values to try for a key: every bool / choice (a sentinel when only one is accepted), two numbers."""
    if key.kind == "bool":
        return [True, False]
    if key.kind == "choice":  # a single accepted value: anything else must be refused
        return list(key.choices) if len(key.choices) > 1 else ["__not_modelled__"]
    base = key.default if key.default is not None else 0
    if key.kind == "int":
        values = [2 * base + 1, base + 3]
    else:
        values = [0.5 * base if base else 0.5, base + 0.05]
    return values + ([None] if key.nullable else [])


def _signature(preset, settings):
    cfg = preset.config(settings)
    r = preset.recipe(cfg)
    fields = tuple(
        getattr(r, f.name).name if hasattr(getattr(r, f.name), "fn") else getattr(r, f.name)
        for f in dataclasses.fields(r)
        if f.name != "name"
    )
    return fields, preset.group_size(cfg), preset.updates_per_rollout(cfg), preset.no_kl_reason(cfg)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_accepted_key_acts_or_is_refused(name):
    preset = get_preset(name)
    contexts = [{}, RICH[name]]
    for k in preset.keys:  # single changes on top of the rich context
        for v in _alternatives(k):
            contexts.append({**RICH[name], k.name: v})
    idle = []
    for key in preset.keys:
        if (name, key.name) in INFORMATIONAL:
            continue
        acts = False
        for ctx in contexts:
            try:
                before = _signature(preset, ctx)
            except PresetError:
                continue
            for v in _alternatives(key):
                try:
                    after = _signature(preset, {**ctx, key.name: v})
                except PresetError:
                    acts = True
                    break
                if after != before:
                    acts = True
                    break
            if acts:
                break
        if not acts:
            idle.append(key.name)
    assert not idle, f"{name}: keys accepted but never used: {idle}"


def test_config_file_accepts_a_whole_real_verl_config(capsys):
    verl_pkg = pytest.importorskip("verl")
    path = Path(verl_pkg.__file__).parent / "trainer" / "config" / "_generated_ppo_trainer.yaml"
    if not path.is_file():
        pytest.skip(f"{path} not shipped with this verl")
    assert main(["audit", "--framework", "verl", "--config", str(path), "--enable-kl", "--no-search"]) == 1
    out = capsys.readouterr().out
    assert "ignored as irrelevant to the KL gradient" in out and "read: " in out
    assert main(["audit", "--framework", "verl", "--config", str(path), "--no-search", "--format", "json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["read"]["data.train_batch_size"] == 1024
    assert report["read"]["actor_rollout_ref.actor.ppo_mini_batch_size"] == 256
    assert "data.train_files" in report["ignored"] and report["updates_per_rollout"] == 4


def test_config_file_openrlhf_with_unrelated_keys_and_a_refused_value(tmp_path, capsys):
    cfg = tmp_path / "openrlhf.yaml"
    cfg.write_text(
        "ckpt:\n  output_dir: ./ckpt\nds:\n  zero_stage: 3\ntrain:\n  batch_size: 1024\n  max_epochs: 1\n"
        "rollout:\n  batch_size: 1024\n  n_samples_per_prompt: 2\nalgo:\n  kl:\n    use_loss: true\n"
        "    estimator: k3\n  advantage:\n    estimator: group_norm\nactor:\n  loss_agg_mode: seq-mean-token-mean\n"
    )
    assert main(["audit", "--framework", "openrlhf", "--config", str(cfg), "--no-search", "--format", "json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert set(report["ignored"]) == {"ckpt.output_dir", "ds.zero_stage"}
    assert report["updates_per_rollout"] == 2 and report["verdict"] == "biased"
    assert report["off_policy"]["verdict"] == "biased"
    cfg.write_text("algo:\n  kl:\n    target: 0.1\n")
    assert main(["audit", "--framework", "openrlhf", "--config", str(cfg)]) == 2
    assert "adaptive KL controller" in capsys.readouterr().err
    # --set stays strict even with a config file
    cfg.write_text("foo: 1\n")
    assert main(["audit", "--framework", "openrlhf", "--config", str(cfg), "--set", "algo.kl.use_los=true"]) == 2


def test_interpolations_resolve():
    assert resolve_interpolation("${oc.select:a.b,7}", {"a.b": 3}) == 3
    assert resolve_interpolation("${oc.select:a.c,7}", {"a.b": 3}) == "7"
    assert resolve_interpolation("${a.b}", {"a.b": "${c}", "c": 5}) == 5


def test_suggestions_say_critic_and_carry_companion_keys():
    r = audit("verl", {"actor_rollout_ref.actor.use_kl_loss": "true"}, TOY)
    assert any("critic" in n for n in r["nearest_unbiased"]["notes"])
    both = r["nearest_unbiased_all_lengths"]
    if both and both["changes"].get("actor_rollout_ref.actor.loss_agg_mode") == "seq-mean-token-sum-norm":
        assert both["changes"]["actor_rollout_ref.actor.loss_scale_factor"] == 512
    # a GRPO user gets a fix without a critic
    grpo = {"actor_rollout_ref.actor.use_kl_loss": "true", "algorithm.adv_estimator": "grpo"}
    near = audit("verl", grpo, TOY)["nearest_unbiased"]
    assert near and not get_preset("verl").needs_critic({**get_preset("verl").config(grpo), **near["changes"]})


# ---------------------------------------------------------------- aggregation pinned against the sources


def _agg_from_source(loss_type, loss, mask, max_len):
    """TRL 1.16 grpo_trainer._compute_loss, transcribed: the normaliser of each loss_type."""
    if loss_type == "grpo":
        return ((loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type in ("bnpo", "dapo"):
        return (loss * mask).sum() / mask.sum().clamp(min=1.0)
    return (loss * mask).sum() / (loss.size(0) * max_len)  # dr_grpo


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_trl_grpo_aggregation_pinned(loss_type):
    from biaslab.core.aggregation import aggregate

    preset = get_preset("trl-grpo")
    r = preset.recipe(preset.config({"beta": 0.04, "loss_type": loss_type, "max_completion_length": 7}))
    g = torch.Generator().manual_seed(0)
    loss = torch.randn(4, 5, generator=g, dtype=torch.float64)
    mask = (torch.arange(5) < torch.tensor([[5], [2], [3], [1]])).to(torch.float64)
    want = _agg_from_source(loss_type, loss, mask, 7)
    for mode in (r.pg_agg, r.loss_agg):
        torch.testing.assert_close(aggregate(loss[None], mask[None], mode, r.horizon)[0], want)


@pytest.mark.parametrize(
    "name,settings,pg,kl",
    [
        ("verl", {}, "token-mean", "token-mean"),  # actor.loss_agg_mode default (both terms, agg_loss)
        ("openrlhf", {"actor.loss_agg_mode": "seq-mean-token-mean"}, "seq-mean-token-mean", "token-mean"),
        ("skyrl", {}, "token-mean", "seq-mean-token-mean"),  # KL loss: per-sequence mean, then batch mean
        ("slime", {}, "seq-mean-token-mean", "seq-mean-token-mean"),  # per-sample mean unless per-token loss
        ("nemo-rl", {}, "token-mean", "token-mean"),  # token_level_loss default true
        ("roll", {}, "seq-mean-token-mean", "seq-mean-token-mean"),
        ("easyr1", {}, "token-mean", "token-mean"),
        ("ms-swift", {}, "seq-mean-token-mean", "seq-mean-token-mean"),
        ("torchforge", {}, "seq-mean-token-mean", "seq-mean-token-mean"),
        ("tinker", {}, "token-sum", "seq-mean-token-sum"),
    ],
)
def test_preset_default_aggregations_pinned(name, settings, pg, kl):
    preset = get_preset(name)
    cfg, _ = preset.enable_kl(preset.config(settings))
    r = preset.recipe(cfg)
    assert (r.pg_agg, r.loss_agg) == (pg, kl)


# ---------------------------------------------------------------- more frameworks


def test_fourteen_plus_frameworks_in_defaults(defaults, capsys):
    assert len(PRESETS) >= 14
    for name in ("trl-rloo", "roll", "areal", "easyr1", "ms-swift", "oat", "torchforge", "tinker"):
        assert name in defaults and get_preset(name).sources
    assert defaults["trl-rloo"]["verdict"] == "unbiased"  # k1 in reward, leave-one-out, beta 0.05 by default
    assert defaults["tinker"]["verdict"] == "biased"  # kl_discount_factor 0: per-token partial
    assert defaults["tinker"]["on_policy"]["direction"] == "reverse_kl_token"
    for name in ("easyr1", "ms-swift", "oat", "torchforge", "roll"):  # k3 in the loss by default
        assert defaults[name]["on_policy"]["direction"].startswith("forward_kl_token"), name
    assert defaults["areal"]["verdict"] == "unbiased"  # k1 in the reward, GAE with no critic, gamma = lambda = 1


def test_new_framework_configurations():
    assert audit("tinker", {"kl_penalty_coef": 0.05, "kl_discount_factor": 1.0}, TOY, search=False)["verdict"] == (
        "unbiased"
    )
    near = audit("tinker", {"kl_penalty_coef": 0.05}, TOY)["nearest_unbiased"]
    assert near["changes"] == {"kl_discount_factor": 1.0}
    # ms-swift kl_in_reward: summed k1 minus... then divided by the group std: biased; without the std: rescaled
    assert audit("ms-swift", {"kl_in_reward": True}, TOY, search=False)["verdict"] == "biased"
    r = audit("ms-swift", {"kl_in_reward": True, "scale_rewards": "none"}, TOY, search=False)
    assert r["verdict"] == "rescaled"  # the group mean removes 1/B of the KL (B = 2 here)
    # advantage_estimator=rloo turns kl_in_reward on and scale_rewards off by default (ms-swift rlhf args)
    assert audit("ms-swift", {"advantage_estimator": "rloo"}, TOY, search=False)["verdict"] == "unbiased"
    assert audit("oat", {"beta": 0, "kl_penalty_coef": 0.05}, TOY, search=False)["verdict"] == "unbiased"
    r = audit("trl-grpo", {"beta": 0.04, "importance_sampling_level": "sequence"}, TOY, search=False)
    assert r["verdict"] == "biased" and any("#6586" in n for n in r["notes"])


def test_formats_and_frame(capsys):
    assert main(["audit", "--defaults", "--format", "csv"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "framework,scenario,verdict,direction,rel_bias,scale,variance,nearest_cos,recipe"
    assert len(lines) > 3 * 14
    assert main(["audit", "--framework", "verl", "--enable-kl", "--no-search", "--format", "md"]) == 1
    assert capsys.readouterr().out.startswith("| framework | scenario |")
    df = audit("openrlhf", {}, TOY, search=False).to_frame()
    assert len(df) == 3 and str(df["scale"].dtype) == "float64"


def test_dtype_for_a_preset(capsys):
    """k3 = expm1(d) - d (the registry's, as TRL's exp(d) - d - 1 is not) keeps float32 close; bfloat16 does not."""
    r = audit("trl-grpo", {"beta": 0.04}, TOY, search=False, dtype="float32")["precision"]
    assert r["dtype"] == "float32" and r["far"]["value_rel_error_max"] < 1e-5
    assert main(["audit", "--framework", "verl", "--enable-kl", "--no-search", "--dtype", "bfloat16"]) == 1
    assert "precision of the loss in bfloat16" in capsys.readouterr().out
    assert main(["audit", "--defaults", "--dtype", "float32"]) == 2
