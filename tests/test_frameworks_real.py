"""Presets against the frameworks' own functions (verl 0.9.1, OpenRLHF 0.11.2), on random inputs: values and
gradients. The packages come from requirements/frameworks.txt (``make test`` installs them with --no-deps);
a test skips, saying why, only when its package cannot be imported.

OpenRLHF's ``models/utils.py`` imports deepspeed at module top without using it in ``compute_approx_kl``; the
file is loaded by path with an empty stand-in for ``deepspeed`` (no DeepSpeed build on a CPU machine).
"""

import sys

import numpy as np
import pytest
import torch

from biaslab.core.aggregation import aggregate
from biaslab.core.estimators import get_estimator
from biaslab.core.recipes import Recipe, advantages, batch_loss, kl_token_loss, pg_token_loss
from biaslab.frameworks import get_preset
from biaslab.frameworks.openrlhf import KL_VALUES
from biaslab.frameworks.verl import KL_TYPES

try:
    from verl.trainer.ppo import core_algos as verl_core
except Exception as exc:  # pragma: no cover - the reason is printed by the skip
    verl_core = None
    VERL_REASON = (
        f"verl 0.9.1 not importable ({type(exc).__name__}: {exc}); pip install --no-deps -r requirements/frameworks.txt"
    )


try:  # one loader, shared with the example losses built from OpenRLHF's functions
    from examples.frameworks.openrlhf_real import load_openrlhf_models

    orl_utils, orl_loss = load_openrlhf_models()
except Exception as exc:  # pragma: no cover
    orl_utils = orl_loss = None
    ORL_REASON = f"OpenRLHF 0.11.2 not loadable ({type(exc).__name__}: {exc})"

needs_verl = pytest.mark.skipif(verl_core is None, reason=VERL_REASON if verl_core is None else "")
needs_orl = pytest.mark.skipif(orl_utils is None, reason=ORL_REASON if orl_utils is None else "")


def random_logps(seed, shape=(5, 7), dtype=torch.float64, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    lp = -spread * torch.rand(shape, generator=g, dtype=dtype)
    ref = -spread * torch.rand(shape, generator=g, dtype=dtype)
    ref[0, :3] = torch.tensor([-40.0, -0.01, -25.0], dtype=dtype)  # exercise the +-20 / +-10 clamps
    lp[0, :3] = torch.tensor([-0.01, -30.0, -0.5], dtype=dtype)
    mask = (torch.rand(shape, generator=g) < 0.8).to(dtype)
    mask[:, 0] = 1
    w = torch.randn(shape, generator=g, dtype=dtype)
    return lp, ref, mask, w


def value_and_grad(fn, lp, w):
    x = lp.clone().requires_grad_(True)
    out = fn(x)
    (grad,) = torch.autograd.grad((out * w).sum() if out.dim() else out, x)
    return out.detach(), grad


# ---------------------------------------------------------------- verl


@needs_verl
@pytest.mark.parametrize("kl_type", list(KL_TYPES))
def test_verl_kl_penalty_matches_preset_estimator(kl_type):
    lp, ref, _, w = random_logps(1)
    est = get_estimator(KL_TYPES[kl_type])
    v_real, g_real = value_and_grad(lambda x: verl_core.kl_penalty(x, ref, kl_type), lp, w)
    v_ours, g_ours = value_and_grad(lambda x: est(x, ref), lp, w)
    torch.testing.assert_close(v_ours, v_real, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_ours, g_real, rtol=1e-12, atol=1e-12)


@needs_verl
@pytest.mark.parametrize(
    "mode", ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
)
def test_verl_agg_loss_matches_aggregation(mode):
    lp, _, mask, _ = random_logps(2)
    loss = torch.randn(lp.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    v_real, g_real = value_and_grad(lambda x: verl_core.agg_loss(x, mask, mode), loss, torch.ones(()))
    v_ours, g_ours = value_and_grad(lambda x: aggregate(x, mask, mode), loss, torch.ones(()))
    torch.testing.assert_close(v_ours, v_real, rtol=1e-7, atol=1e-10)  # verl adds 1e-8 to seq-mean-token-mean
    torch.testing.assert_close(g_ours, g_real, rtol=1e-7, atol=1e-10)


@needs_verl
@pytest.mark.parametrize("kl_type", ["low_var_kl", "kl", "low_var_kl+", "mse"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_verl_kl_loss_term_matches_preset_recipe(kl_type, mode):
    """coef * agg_loss(kl_penalty(logp, ref)) from verl = the preset's batch_loss with use_kl_loss=true."""
    a = "actor_rollout_ref.actor."
    preset = get_preset("verl")
    recipe = preset.recipe(
        preset.config({a + "use_kl_loss": "true", a + "kl_loss_type": kl_type, a + "loss_agg_mode": mode})
    )
    lp, ref, mask, _ = random_logps(4)
    lp, ref = lp * mask, ref * mask

    def real(x):
        return 0.001 * verl_core.agg_loss(verl_core.kl_penalty(x, ref, kl_type), mask, mode)

    v_real, g_real = value_and_grad(real, lp, torch.ones(()))
    v_ours, g_ours = value_and_grad(
        lambda x: batch_loss(recipe, x[None], x.detach()[None], ref[None], mask[None])[0], lp, torch.ones(())
    )
    torch.testing.assert_close(v_ours, v_real, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(g_ours, g_real, rtol=1e-7, atol=1e-12)


@needs_verl
@pytest.mark.parametrize("adv", ["grpo", "rloo"])
@pytest.mark.parametrize("norm", [True, False])
def test_verl_outcome_advantages_with_kl_in_reward_match(adv, norm):
    """token_level_rewards = -beta * kl_penalty(old, ref) (apply_kl_penalty with zero scores), then verl's
    GRPO / RLOO advantage = the preset's advantages()."""
    preset = get_preset("verl")
    cfg = preset.config(
        {
            "algorithm.use_kl_in_reward": True,
            "algorithm.adv_estimator": adv,
            "algorithm.norm_adv_by_std_in_grpo": norm,
            "algorithm.kl_ctrl.kl_coef": 0.3,
        }
    )
    recipe = preset.recipe(cfg)
    lp, ref, mask, _ = random_logps(5, shape=(4, 6))
    lp, ref = lp * mask, ref * mask
    rewards = -0.3 * verl_core.kl_penalty(lp, ref, "kl") * mask
    index = np.array(["p"] * 4)
    if adv == "grpo":
        real, _ = verl_core.compute_grpo_outcome_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=norm)
    else:
        real, _ = verl_core.compute_rloo_outcome_advantage(rewards, mask, index)
    ours = advantages(recipe, lp[None], lp[None], ref[None], mask[None])[0]
    torch.testing.assert_close(ours, real, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- OpenRLHF


@needs_orl
@pytest.mark.parametrize("estimator", list(KL_VALUES))
def test_openrlhf_compute_approx_kl_matches_preset_estimator(estimator):
    lp, ref, _, w = random_logps(6, dtype=torch.float32)  # OpenRLHF computes in float32 (.float())
    est = get_estimator(KL_VALUES[estimator])
    v_real, g_real = value_and_grad(lambda x: orl_utils.compute_approx_kl(x, ref, kl_estimator=estimator), lp, w)
    v_ours, g_ours = value_and_grad(lambda x: est(x, ref), lp, w)
    torch.testing.assert_close(v_ours, v_real, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_ours, g_real, rtol=1e-6, atol=1e-6)


@needs_orl
@pytest.mark.parametrize("estimator", list(KL_VALUES))
def test_openrlhf_unbiased_gradient_matches_preset_kl_loss(estimator):
    """--algo.kl.use_loss --algo.kl.unbiased_gradient: value of the estimator, gradient min(pi/pi_old, 10) * grad k2."""
    preset = get_preset("openrlhf")
    cfg = preset.config({"algo.kl.use_loss": True, "algo.kl.unbiased_gradient": True, "algo.kl.estimator": estimator})
    recipe = preset.recipe(cfg)
    lp, ref, mask, w = random_logps(7, dtype=torch.float32)
    old = lp.detach() + 0.8 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(9))
    old[0, 3] = lp[0, 3] - 5.0  # a weight above the clip at 10

    def real(x):
        return orl_utils.compute_approx_kl(x, ref, log_probs_old=old, kl_estimator=estimator, unbiased_gradient=True)

    v_real, g_real = value_and_grad(real, lp, w)
    v_ours, g_ours = value_and_grad(lambda x: kl_token_loss(recipe, x, old, ref, torch.ones_like(x)), lp, w)
    torch.testing.assert_close(v_ours.double(), v_real.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_ours.double(), g_real.double(), rtol=1e-6, atol=1e-6)


@needs_verl
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_verl_ppo_policy_loss_matches_recipe(mode):
    """compute_policy_loss_vanilla (clip 0.2/0.28, dual clip 3, log-ratio clamp 20) = pg_token_loss + aggregate."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {
            "clip_ratio": 0.2,
            "clip_ratio_low": 0.2,
            "clip_ratio_high": 0.28,
            "clip_ratio_c": 3.0,
            "global_batch_info": {},
        }
    )
    lp, old, mask, adv = random_logps(10, spread=1.0)
    old = lp.detach() + 0.5 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(11), dtype=lp.dtype)
    old[0, 1] = lp[0, 1] - 30.0  # log-ratio beyond the +-20 clamp
    recipe = Recipe(pg_clip=(0.2, 0.28), pg_dual_clip=3.0, log_ratio_clamp=20.0, pg_agg=mode)

    def real(x):
        return verl_core.compute_policy_loss_vanilla(old, x, adv, mask, loss_agg_mode=mode, config=cfg)[0]

    def ours(x):
        return aggregate(pg_token_loss(recipe, adv * mask, x, old, mask), mask, mode)

    v_real, g_real = value_and_grad(real, lp, torch.ones(()))
    v_ours, g_ours = value_and_grad(ours, lp, torch.ones(()))
    torch.testing.assert_close(v_ours, v_real, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(g_ours, g_real, rtol=1e-7, atol=1e-12)


@needs_orl
@pytest.mark.parametrize("token_level", [True, False])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_openrlhf_policy_loss_matches_recipe(token_level, dual_clip):
    """openrlhf.models.loss.PolicyLoss (ppo) = the preset's pg loss with its aggregation."""
    preset = get_preset("openrlhf")
    mode = "token-mean" if token_level else "seq-mean-token-mean"
    settings = {"actor.loss_agg_mode": mode, "actor.dual_clip": dual_clip}
    recipe = preset.recipe(preset.config({k: v for k, v in settings.items() if v is not None}))
    lp, old, mask, adv = random_logps(12, spread=1.0, dtype=torch.float32)
    old = lp.detach() + 0.5 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(13))
    loss_fn = orl_loss.PolicyLoss(
        clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=dual_clip, token_level_loss=token_level
    )

    def real(x):
        return loss_fn(x, old, adv, action_mask=mask)[0]

    def ours(x):
        return aggregate(pg_token_loss(recipe, adv * mask, x, old, mask), mask, recipe.pg_agg)

    v_real, g_real = value_and_grad(real, lp, torch.ones(()))
    v_ours, g_ours = value_and_grad(ours, lp, torch.ones(()))
    torch.testing.assert_close(v_ours.double(), v_real.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours.double(), g_real.double(), rtol=1e-5, atol=1e-6)


@needs_orl
@pytest.mark.parametrize("token_level", [True, False])
def test_openrlhf_aggregate_loss_matches(token_level):
    lp, _, mask, _ = random_logps(14)
    mode = "token-mean" if token_level else "seq-mean-token-mean"
    v_real, g_real = value_and_grad(
        lambda x: orl_loss.aggregate_loss(x, mask, token_level_loss=token_level), lp, torch.ones(())
    )
    v_ours, g_ours = value_and_grad(lambda x: aggregate(x, mask, mode), lp, torch.ones(()))
    torch.testing.assert_close(v_ours, v_real, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(g_ours, g_real, rtol=1e-7, atol=1e-10)


# ---------------------------------------------------------------- the real functions through --loss (issue #10)

from pathlib import Path  # noqa: E402

from biaslab.workflows.audit import AuditToy, audit, audit_loss  # noqa: E402

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # examples/ lives at the repository root (pytest may only put tests/ on the path)
    sys.path.insert(0, _ROOT)

TOY_REAL = AuditToy(max_group=2)
ROWS = ("on_policy", "variable_length", "off_policy")


def _verdicts(report):
    return tuple(report[k]["verdict"] for k in ROWS)


def _same_direction(real, preset):
    """Exactly matched named directions must agree; a nearest-only direction (~name) is compared by its cosine
    (recipes also get the 'expected_value' direction, user losses do not)."""
    a, b = real["on_policy"], preset["on_policy"]
    if b["direction"].startswith("~"):
        assert a["nearest_cos"] == pytest.approx(b["nearest_cos"], abs=1e-6)
    else:
        assert a["direction"] == b["direction"]


@needs_orl
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_openrlhf_kl_loss_seq_mean_mode_matches_real_actor(estimator):
    """Defect 3: with actor.loss_agg_mode=seq-mean-token-mean the real KL loss is still aggregate_loss(kl, mask)
    (global token mean); the preset's KL loss term now matches it in value and gradient."""
    preset = get_preset("openrlhf")
    cfg = preset.config(
        {"algo.kl.use_loss": True, "algo.kl.estimator": estimator, "actor.loss_agg_mode": "seq-mean-token-mean"}
    )
    recipe = preset.recipe(cfg)
    lp, ref, mask, _ = random_logps(15, dtype=torch.float32)
    lp, ref = lp * mask, ref * mask

    def real(x):
        return 0.01 * orl_loss.aggregate_loss(orl_utils.compute_approx_kl(x, ref, kl_estimator=estimator), mask)

    def ours(x):
        return recipe.loss_coef * aggregate(kl_token_loss(recipe, x, x.detach(), ref, mask), mask, recipe.loss_agg)

    v_real, g_real = value_and_grad(real, lp, torch.ones(()))
    v_ours, g_ours = value_and_grad(ours, lp, torch.ones(()))
    torch.testing.assert_close(v_ours.double(), v_real.double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_ours.double(), g_real.double(), rtol=1e-5, atol=1e-7)


VERL_CASES = [
    # (preset settings, make_verl_loss kwargs, beta, agg)
    ({"actor_rollout_ref.actor.use_kl_loss": True}, {}, 0.001, "token-mean"),
    (
        {"actor_rollout_ref.actor.use_kl_loss": True, "actor_rollout_ref.actor.kl_loss_type": "kl"},
        {"kl_loss_type": "kl"},
        0.001,
        "token-mean",
    ),
    (
        {
            "actor_rollout_ref.actor.use_kl_loss": True,
            "actor_rollout_ref.actor.kl_loss_type": "k3+",
            "actor_rollout_ref.actor.loss_agg_mode": "seq-mean-token-sum",
        },
        {"kl_loss_type": "k3+", "loss_agg_mode": "seq-mean-token-sum"},
        0.001,
        "seq-mean-token-sum",
    ),
    (
        {
            "actor_rollout_ref.actor.use_kl_loss": True,
            "actor_rollout_ref.actor.kl_loss_type": "mse",
            "actor_rollout_ref.actor.loss_agg_mode": "seq-mean-token-mean",
        },
        {"kl_loss_type": "mse", "loss_agg_mode": "seq-mean-token-mean"},
        0.001,
        "seq-mean-token-mean",
    ),
    (
        {"algorithm.use_kl_in_reward": True, "algorithm.adv_estimator": "rloo"},
        {"kl_loss_type": None, "kl_penalty": "kl", "adv_estimator": "rloo"},
        0.001,
        "token-mean",
    ),
    (
        {"algorithm.use_kl_in_reward": True},
        {"kl_loss_type": None, "kl_penalty": "kl"},
        0.001,
        "token-mean",
    ),
]


@needs_verl
@pytest.mark.parametrize("settings,kwargs,beta,agg", VERL_CASES)
def test_verl_preset_verdicts_equal_the_real_functions(settings, kwargs, beta, agg):
    from examples.frameworks.verl_real import make_verl_loss

    preset_report = audit(
        "verl",
        {**settings, "algorithm.adv_estimator": kwargs.get("adv_estimator", "grpo"), "actor_rollout_ref.rollout.n": 2},
        TOY_REAL,
        search=False,
    )
    real_report = audit_loss(make_verl_loss(**kwargs), beta=beta, agg=agg, toy=TOY_REAL)
    assert preset_report["updates_per_rollout"] > 1  # both off-policy rows use a stale behaviour policy
    assert _verdicts(real_report) == _verdicts(preset_report)
    _same_direction(real_report, preset_report)


ORL_CASES = [
    ({"algo.kl.estimator": "k1"}, {"estimator": "k1"}),
    ({"algo.kl.estimator": "k3"}, {"estimator": "k3"}),
    ({"algo.advantage.estimator": "group_norm"}, {"advantage": "group_norm"}),
    ({"algo.kl.use_loss": True, "algo.kl.estimator": "k3"}, {"estimator": "k3", "use_loss": True}),
    (
        {"algo.kl.use_loss": True, "algo.kl.estimator": "k2", "actor.loss_agg_mode": "seq-mean-token-mean"},
        {"estimator": "k2", "use_loss": True, "loss_agg_mode": "seq-mean-token-mean"},
    ),
    (
        {"algo.kl.use_loss": True, "algo.kl.estimator": "k3", "algo.kl.unbiased_gradient": True},
        {"estimator": "k3", "use_loss": True, "unbiased_gradient": True},
    ),
]


@needs_orl
@pytest.mark.parametrize("settings,kwargs", ORL_CASES)
def test_openrlhf_preset_verdicts_equal_the_real_functions(settings, kwargs):
    from examples.frameworks.openrlhf_real import make_openrlhf_loss

    adv = kwargs.get("advantage", "rloo")
    preset_report = audit(
        "openrlhf",
        {"algo.advantage.estimator": adv, "rollout.n_samples_per_prompt": 2, **settings},
        TOY_REAL,
        search=False,
    )
    # OpenRLHF's compute_approx_kl computes in float32 (.float()): the verdict's tolerance follows
    real_report = audit_loss(
        make_openrlhf_loss(**kwargs), beta=0.01, agg="token-mean", toy=TOY_REAL, compute_dtype="float32"
    )
    assert _verdicts(real_report) == _verdicts(preset_report)
    _same_direction(real_report, preset_report)
