"""Presets and ``biaslab audit``: verdicts computed on the toy (never tabled), framework-key validation, the
nearest-unbiased search, and the CLI's exit codes and JSON."""

import json

import pytest

from biaslab.cli import main
from biaslab.frameworks import PRESETS, PresetError, get_preset
from biaslab.frameworks.audit import AuditToy, audit, audit_defaults

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
