"""``biaslab audit --loss FILE:FUNC`` / ``biaslab.audit_loss`` / ``assert_kl_unbiased``: loss functions written here
(not by the code under test), with the verdicts the theory gives them (BACKGROUND section 3): k1 in the reward is
unbiased, k1 in the loss is zero in expectation, k3 in the loss follows the per-token forward KL, a doubled
coefficient is rescaled x2, a baseline over the total score with a std division is biased."""

import json

import pytest
import torch

import biaslab
from biaslab.cli import main
from biaslab.workflows.audit import AuditToy, audit_loss
from biaslab.workflows.testing import assert_kl_unbiased
from biaslab.workflows.userloss import LossBatch, UserLoss, UserLossError

TOY = AuditToy(max_group=2)
BETA = 0.2


def rtg(x):
    return x.flip(-1).cumsum(-1).flip(-1)


def k1_reward_reinforce(batch):
    """REINFORCE with -beta * k1 (rollout log-probs) in the token rewards, reward-to-go, mean over the group."""
    k = (batch.old_logp - batch.ref_logp) * batch.mask
    adv = batch.rewards[:, None] - BETA * rtg(k)
    return -(adv.detach() * batch.logp * batch.mask).sum(-1).mean()


def k1_reward_double(batch):
    k = (batch["old_logp"] - batch["ref_logp"]) * batch["mask"]
    return (2 * BETA * rtg(k).detach() * batch["logp"] * batch["mask"]).sum(-1).mean()


def k1_loss(batch):
    return BETA * ((batch.logp - batch.ref_logp) * batch.mask).sum(-1).mean()


def k3_loss_token_mean(batch):
    d = batch.ref_logp - batch.logp
    return BETA * ((torch.expm1(d) - d) * batch.mask).sum() / batch.mask.sum()


def k1_total_grpo(batch):
    """KL summed into the score, then (score - mean) / std over the group: GRPO with KL in the reward."""
    score = batch.rewards - BETA * ((batch.old_logp - batch.ref_logp) * batch.mask).sum(-1)
    adv = (score - score.mean()) / (score.std() + 1e-6)
    return -(adv.detach() * (batch.logp * batch.mask).sum(-1)).mean()


def k1_total_rloo(batch):
    score = batch.rewards - BETA * ((batch.old_logp - batch.ref_logp) * batch.mask).sum(-1)
    B = score.shape[0]
    adv = score - (score.sum() - score) / (B - 1)
    return -(adv.detach() * (batch.logp * batch.mask).sum(-1)).mean()


def k1_reward_with_item(batch):
    """Same update as k1_reward_reinforce, but data-dependent Python control flow (.item()): no vmap."""
    out = k1_reward_reinforce(batch)
    if batch.mask.sum().item() > 0:
        return out
    return out * 0


@pytest.mark.parametrize(
    "fn,agg,verdict,direction",
    [
        (k1_reward_reinforce, "seq-mean-token-sum", "unbiased", "reverse_kl"),
        (k1_reward_double, "seq-mean-token-sum", "rescaled", "reverse_kl (x2)"),
        (k1_loss, "seq-mean-token-sum", "zero", "zero"),
        (k3_loss_token_mean, "token-mean", "biased", "forward_kl_token"),
    ],
)
def test_verdicts_of_unseen_losses(fn, agg, verdict, direction):
    r = audit_loss(fn, beta=BETA, agg=agg, toy=TOY)
    assert r["verdict"] == verdict == r["on_policy"]["verdict"]
    assert r["on_policy"]["direction"] == direction
    assert set(r) >= {"on_policy", "variable_length", "off_policy", "toy", "notes", "vectorized"}
    assert r["vectorized"].startswith("vmap")


def test_token_mean_without_agg_is_rescaled_by_one_over_t():
    r = audit_loss(k3_loss_token_mean, beta=BETA, toy=TOY)  # declared seq-mean-token-sum, T = 3
    assert r["on_policy"]["direction"] == "forward_kl_token (x0.3333)"


def test_rewards_binary_judges_the_whole_update():
    """E[g] against grad(E[R] - beta KL): RLOO on the total score is unbiased (with variable lengths too); the
    group std of GRPO rescales each group differently: biased; a loss without the task term is biased."""
    r = audit_loss(k1_total_rloo, beta=BETA, rewards="binary", toy=TOY)
    assert (r["verdict"], r["variable_length"]["verdict"], r["toy"]["rewards"]) == ("unbiased", "unbiased", "binary")
    assert audit_loss(k1_total_grpo, beta=BETA, rewards="binary", toy=TOY)["verdict"] == "biased"
    assert audit_loss(k3_loss_token_mean, beta=BETA, rewards="binary", agg="token-mean", toy=TOY)["verdict"] == "biased"
    doubled = audit_loss(lambda b: 2 * k1_total_rloo(b), beta=BETA, rewards="binary", toy=TOY)["on_policy"]
    assert doubled["verdict"] == "rescaled" and doubled["direction"] == "reverse_kl (x2)"
    # without task rewards the GRPO std divides the KL part by its own spread: also biased
    assert audit_loss(k1_total_grpo, beta=BETA, toy=TOY)["verdict"] == "biased"


def test_loop_fallback_gives_the_same_result():
    a = audit_loss(k1_reward_reinforce, beta=BETA, toy=TOY)
    b = audit_loss(k1_reward_with_item, beta=BETA, toy=TOY)
    assert b["vectorized"].startswith("loop (torch.func.vmap failed")
    for key in ("on_policy", "variable_length", "off_policy"):
        assert a[key]["verdict"] == b[key]["verdict"]
        assert a[key]["rel_bias"] == pytest.approx(b[key]["rel_bias"], rel=1e-9, abs=1e-12)


def test_batch_is_a_mapping_and_single_group_call():
    lp = -torch.rand(2, 3)
    b = LossBatch(lp, lp, lp - 0.1, torch.ones(2, 3), torch.zeros(2))
    assert set(b) == {"logp", "old_logp", "ref_logp", "mask", "rewards"} and b["mask"] is b.mask
    with pytest.raises(KeyError, match="the batch has"):
        b["logits"]
    rule = UserLoss(k1_loss, beta=BETA)
    value = rule.batch_loss(lp, lp, lp - 0.1, torch.ones(2, 3))
    assert value.shape == () and float(value) == pytest.approx(BETA * 0.3)


@pytest.mark.parametrize(
    "fn,match",
    [
        (lambda b: 1 / 0, "raised ZeroDivisionError"),
        (lambda b: b.logp.sum(-1), "returned shape \\(2,\\)"),
        (lambda b: b.logp.sum() * float("nan"), "non-finite"),
        (lambda b: b.logp.detach().sum(), "not differentiable"),
        (lambda b: 3.0, "returned float"),
    ],
)
def test_clear_errors(fn, match):
    with pytest.raises(UserLossError, match=match):
        audit_loss(fn, beta=BETA, toy=TOY)


def test_python_api_and_pytest_assertion():
    assert biaslab.audit_loss is audit_loss
    report = assert_kl_unbiased(k1_reward_reinforce, beta=BETA, scenarios=("on_policy", "variable_length"), toy=TOY)
    assert report["verdict"] == "unbiased"
    with pytest.raises(AssertionError, match="not unbiased \\(on_policy\\)"):
        assert_kl_unbiased(k3_loss_token_mean, beta=BETA, agg="token-mean", toy=TOY)


def test_to_frame_typed_columns():
    df = audit_loss(k1_loss, beta=BETA, toy=TOY).to_frame()
    assert list(df["scenario"]) == ["on-policy, fixed length", "on-policy, variable length", "off-policy"]
    assert str(df["rel_bias"].dtype) == "float64" and str(df["verdict"].dtype) == "string"


LOSS_FILE = """
import torch

def good(batch):
    k = (batch.old_logp - batch.ref_logp) * batch.mask
    c = k.flip(-1).cumsum(-1).flip(-1)
    return (0.1 * c * batch.logp * batch.mask).sum(-1).mean()

def k3(batch):
    d = batch.ref_logp - batch.logp
    return 0.1 * ((torch.expm1(d) - d) * batch.mask).sum(-1).mean()
"""


def test_cli_loss(tmp_path, capsys):
    f = tmp_path / "my_trainer.py"
    f.write_text(LOSS_FILE)
    assert main(["audit", "--loss", f"{f}:good", "--beta", "0.1", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "unbiased" and report["framework"] == "loss"
    assert report["toy"]["group_size"] == 2 and report["toy"]["rewards"] == "zero"
    assert main(["audit", "--loss", f"{f}:k3", "--beta", "0.1", "--group-size", "1"]) == 1
    out = capsys.readouterr().out
    assert "forward_kl_token" in out and "on-policy, variable length" in out
    assert main(["audit", "--loss", f"{f}:k3", "--beta", "0.1", "--format", "csv"]) == 1
    assert capsys.readouterr().out.splitlines()[0].startswith("framework,scenario,verdict")
    assert main(["audit", "--loss", f"{f}:k3", "--beta", "0.1", "--format", "md", "--alpha", "0.01"]) == 1
    assert capsys.readouterr().out.startswith("| framework |")
    assert main(["audit", "--loss", f"{f}:missing"]) == 2
    assert "defines no 'missing'" in capsys.readouterr().err
    assert main(["audit", "--loss", "nofile.py:f"]) == 2
    assert main(["audit", "--loss", f"{f}:good", "--framework", "verl"]) == 2
    assert main(["audit", "--framework", "verl", "--beta", "0.1"]) == 2
