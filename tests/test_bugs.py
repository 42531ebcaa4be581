"""The bug zoo (examples/bugs): every entry audited through ``audit_loss``, its verdicts asserted here from the
theory (BACKGROUND sections 3 and 9), and listed in the README's "known ways to get the KL gradient wrong"."""

import importlib
import pkgutil
import sys
from pathlib import Path

import pytest

from biaslab.workflows.audit import AuditToy, audit_loss
from biaslab.workflows.userloss import UserLossError

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # examples/ lives at the repository root (pytest may only put tests/ on the path)
    sys.path.insert(0, str(ROOT))
bugs = importlib.import_module("examples.bugs")
TOY = AuditToy(max_group=2)

# entry -> (on-policy fixed length, variable length, off-policy, on-policy direction or None)
EXPECTED = {
    "trl_rloo_k3_in_reward": ("biased", "biased", "biased", None),  # k3 in reward: score half only
    "trl_seq_ratio_kl": ("biased", "biased", "biased", None),
    "marin_k1_loss": ("zero", "zero", "biased", "zero"),  # E[grad log pi] = 0 on-policy only
    "rlhf_book_k3_inverted": ("biased", "biased", "biased", None),
    "slime_grpo_kl_ignored": ("zero", "zero", "zero", "zero"),
    "skyrl_gdpo_drops_kl": ("zero", "zero", "zero", "zero"),
    "k3_in_loss_forward_kl": ("biased", "biased", "biased", "forward_kl_token"),
    "grpo_length_norm_kl_reward": ("unbiased", "biased", "biased", "reverse_kl"),
    "k2_in_loss_partial": ("biased", "biased", "biased", "reverse_kl_token"),
    "unsloth_k3_cancellation": ("biased", "biased", "biased", "forward_kl_token"),
}
RAISES = {"openrlhf_k3_overflow": "on-policy, variable length: .*non-finite"}


def entries():
    return sorted(m.name for m in pkgutil.iter_modules(bugs.__path__))


def load(name):
    return importlib.import_module(f"examples.bugs.{name}")


def test_zoo_has_at_least_eight_entries_all_covered():
    assert len(entries()) >= 8
    assert set(entries()) == set(EXPECTED) | set(RAISES)
    readme = (ROOT / "README.md").read_text()
    for name in entries():
        mod = load(name)
        assert mod.REPORT and mod.FIX and mod.__doc__, name
        assert f"examples/bugs/{name}.py" in readme, f"{name} missing from the README bug table"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bug_verdicts(name):
    mod = load(name)
    r = audit_loss(mod.loss, beta=mod.BETA, agg=mod.AGG, toy=TOY)
    fixed, varlen, off, direction = EXPECTED[name]
    assert (r["on_policy"]["verdict"], r["variable_length"]["verdict"], r["off_policy"]["verdict"]) == (
        fixed,
        varlen,
        off,
    )
    if direction is not None:
        assert r["on_policy"]["direction"] == direction


def test_overflow_bug_is_a_clear_error_and_fixed_length_is_k3_in_loss():
    mod = load("openrlhf_k3_overflow")
    with pytest.raises(UserLossError, match=RAISES["openrlhf_k3_overflow"]):
        audit_loss(mod.loss, beta=mod.BETA, agg=mod.AGG, toy=TOY)


def test_cancellation_bug_shows_in_low_precision():
    """exp(d) - d - 1 in float32 near the reference: value error of order 1 (and negative 'KL' values);
    expm1(d) - d keeps it to the rounding of the float32 inputs."""
    mod = load("unsloth_k3_cancellation")
    bad = audit_loss(mod.loss, beta=mod.BETA, agg=mod.AGG, toy=TOY, dtype="float32")["precision"]
    good = audit_loss(mod.loss_fixed, beta=mod.BETA, agg=mod.AGG, toy=TOY, dtype="float32")["precision"]
    assert bad["near_reference"]["value_rel_error_max"] > 1e-2
    assert good["near_reference"]["value_rel_error_max"] < 1e-3
    assert bad["near_reference"]["value_rel_error_max"] > 100 * good["near_reference"]["value_rel_error_max"]
    assert bad["dtype"] == "float32"
