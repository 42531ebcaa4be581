"""`biaslab check`, check_estimator and biaslab.workflows.testing on the example estimator file.

MC-mode tests use fixed seeds; the check itself runs at family-wise alpha = 0.01 (its stated false-alarm rate for
unbiased estimators), and the biased cases have exact relative biases > 0.1, far above the detectable bias."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from biaslab import EstimatorError
from biaslab.cli import main
from biaslab.workflows.check import check_estimator, load_function
from biaslab.workflows.testing import assert_biased, assert_unbiased

EXAMPLE = str(Path(__file__).resolve().parents[1] / "examples" / "my_estimators.py")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "biaslab", "check", *args], capture_output=True, text=True)


def test_exact_k3_in_reward_plus_loss_is_unbiased_and_k3_in_loss_follows_forward_kl():
    k3 = load_function(f"{EXAMPLE}:k3")
    ok = check_estimator(k3, "both")
    assert ok.unbiased and ok.matches == "reverse_kl" and ok.worst_rel_bias < 1e-9
    bad = check_estimator(k3, "loss", "sequence")
    assert not bad.unbiased and bad.matches == "forward_kl" and bad.worst_rel_bias > 0.1
    tok = check_estimator(k3, "loss", "token")
    assert tok.verdict == "biased" and tok.matches == "forward_kl_token"
    assert check_estimator(load_function(f"{EXAMPLE}:k1"), "loss").verdict == "zero"


def test_mc_mode_agrees_and_shows_the_exact_bias_inside_its_interval():
    k3 = load_function(f"{EXAMPLE}:k3")
    ok = check_estimator(k3, "both", mode="mc", samples=8000, models=2, seed=1)
    assert ok.verdict == "no bias detected" and ok.passed and not ok.unbiased and ok.p_value >= 0.01
    bad = check_estimator(k3, "loss", "sequence", mode="mc", samples=8000, models=2, seed=1, model_kind="tabular")
    assert not bad.unbiased and bad.p_value < 1e-6 and bad.matches == "forward_kl"
    for m in bad.models:  # the exact bias lies in the CI and zero lies outside it
        assert m.ci_low > 0 and m.ci_low <= m.rel_bias <= m.ci_high
        assert m.detectable_rel_bias < m.rel_bias


def test_cli_exit_codes_text_and_json():
    r = cli(f"{EXAMPLE}:k3", "--placement", "both")
    assert r.returncode == 0 and "UNBIASED" in r.stdout and "KL" in r.stdout
    r = cli(f"{EXAMPLE}:k3", "--placement", "loss", "--level", "sequence", "--mode", "mc", "--samples", "4000",
            "--models", "1", "--model", "tabular", "--format", "json")
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert out["verdict"] == "biased" and out["matches"] == "forward_kl" and out["mode"] == "mc"
    assert out["p_value"] < 1e-6 and out["models"][0]["detectable_rel_bias"] > 0


def test_cli_errors_name_the_problem(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import torch\n"
        "def wrong_shape(logp, logp_ref):\n    return (logp - logp_ref).sum(-1)\n"
        "def not_finite(logp, logp_ref):\n    return (logp - logp_ref) / 0.0\n"
        "def raises(logp, logp_ref):\n    raise RuntimeError('boom')\n"
        "x = 3\n"
    )
    cases = {
        "wrong_shape": "returned shape",
        "not_finite": "non-finite",
        "raises": "raised RuntimeError: boom",
        "x": "not callable",
        "missing": "defines no 'missing'",
    }
    for name, msg in cases.items():  # in-process: main() turns user errors into one line and status 2
        assert main(["check", f"{bad}:{name}", "--placement", "both", "--models", "1"]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, (name, err)
    r = cli(f"{tmp_path}/nope.py:f", "--placement", "both")  # one real subprocess: no traceback reaches the user
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr


def test_pytest_assertions():
    assert_unbiased("k3", placement="both", models=2)
    assert_biased("k3", placement="loss", models=2)
    with pytest.raises(AssertionError, match="forward_kl"):
        assert_unbiased(lambda lp, lr: torch.expm1(lr - lp) - (lr - lp), placement="loss", level="sequence")


def test_unknown_mode_and_bad_function_spec():
    with pytest.raises(ValueError, match="unknown mode"):
        check_estimator("k1", "reward", mode="fast")
    with pytest.raises(EstimatorError, match="MODULE_OR_FILE:FUNCTION"):
        load_function("no_colon")


def test_exact_biased_report_names_the_nearest_direction_and_its_cosine():
    """k3 in the reward follows no named direction: the report gives the nearest one and its cosine. The cosine
    with grad KL(pi||pi_ref) is recomputed here from the formula loop (E[g]) and autograd of the enumerated KL."""
    import itertools

    from test_exact import slow_loop

    from biaslab import make_config, make_pair

    k3 = load_function(f"{EXAMPLE}:k3")
    rep = check_estimator(k3, "reward", models=1, model_kind="tabular")
    (m,) = rep.models
    assert m.verdict == "biased" and m.matches == "none"
    policy, ref = make_pair("tabular", 3, 4, seed=0, kl_scale=1.0)
    mean, _ = slow_loop(policy, ref, make_config("k3", "reward", "token", "rtg"))
    params = [p for p in policy.parameters() if p.requires_grad]
    y = torch.tensor(list(itertools.product(range(3), repeat=4)))
    lp = policy.log_probs(y).gather(-1, y[..., None]).squeeze(-1).sum(-1)
    with torch.no_grad():
        lr = ref.log_probs(y).gather(-1, y[..., None]).squeeze(-1).sum(-1)
    kl = (lp.exp() * (lp - lr)).sum()
    g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(kl, params)])
    cos_rev = float(mean @ g / (mean.norm() * g.norm()))
    assert m.nearest_cos >= cos_rev - 1e-9
    if m.nearest == "reverse_kl":
        assert abs(m.nearest_cos - cos_rev) < 1e-9
    assert f"nearest {m.nearest} (cos {m.nearest_cos:.4f})" in rep.format_text()


@pytest.mark.parametrize("extra, flag", [
    (["--samples", "500"], "--samples"),
    (["--alpha", "0.05"], "--alpha"),
    (["--credit", "full"], "--credit"),
    (["--mode", "mc", "--samples", "500", "--credit", "full"], "--credit"),
])
def test_flags_the_mode_does_not_read_are_refused(extra, flag, capsys):
    """A flag that would change nothing (Monte Carlo settings in exact mode, a credit for a loss) is an error, not
    silently ignored: the user believes it acted."""
    assert main(["check", "examples/my_estimators.py:k3", "--placement", "loss", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("biaslab check: error:") and f"{flag} not read here" in err
