"""Loss functions built from OpenRLHF 0.11.2's own functions, in biaslab's ``--loss`` contract (one group per call).

    biaslab audit --loss examples/frameworks/openrlhf_real.py:rloo_k1_in_reward --beta 0.01 --agg token-mean

Each function reproduces one OpenRLHF actor update on a group: the task-reward baseline of the experience maker
(openrlhf/trainer/ppo_utils/experience_maker.py: rloo / reinforce_baseline / group_norm on the task reward),
``compute_reward`` (KL from the rollout log-probs into the token rewards, openrlhf/models/utils.py), the REINFORCE
returns (``get_cumulative_returns``, gamma 1), ``PolicyLoss`` (openrlhf/models/loss.py) with
``token_level_loss = loss_agg_mode == "token-mean"``, and with ``use_loss`` the KL loss
``aggregate_loss(compute_approx_kl(logp, ref, old, estimator, unbiased_gradient), mask)`` with no
``token_level_loss`` argument, as openrlhf/trainer/ray/ppo_actor.py calls it.

``models/utils.py`` imports deepspeed at module top without using it in these functions: the two files are loaded by
path with an empty stand-in for ``deepspeed`` (no DeepSpeed build on a CPU machine).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Callable

import torch
from torch import Tensor


def load_openrlhf_models() -> tuple[types.ModuleType, types.ModuleType]:
    """(utils, loss) modules of openrlhf/models, loaded by path under a private package name."""
    if "_openrlhf_models.loss" in sys.modules:
        return sys.modules["_openrlhf_models.utils"], sys.modules["_openrlhf_models.loss"]
    spec = importlib.util.find_spec("openrlhf")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("openrlhf is not installed")
    models_dir = f"{list(spec.submodule_search_locations)[0]}/models"
    pkg = types.ModuleType("_openrlhf_models")
    pkg.__path__ = [models_dir]
    saved = sys.modules.get("deepspeed")
    sys.modules["deepspeed"] = types.ModuleType("deepspeed")
    sys.modules["_openrlhf_models"] = pkg
    loaded = []
    try:
        for module in ("utils", "loss"):
            mod_spec = importlib.util.spec_from_file_location(f"_openrlhf_models.{module}", f"{models_dir}/{module}.py")
            mod = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_spec.name] = mod
            mod_spec.loader.exec_module(mod)
            loaded.append(mod)
    finally:
        if saved is None:
            sys.modules.pop("deepspeed", None)
        else:
            sys.modules["deepspeed"] = saved
    return loaded[0], loaded[1]


utils, loss_mod = load_openrlhf_models()


def make_openrlhf_loss(
    estimator: str = "k1",
    use_loss: bool = False,
    unbiased_gradient: bool = False,
    advantage: str = "rloo",
    loss_agg_mode: str = "token-mean",
    init_coef: float = 0.01,
    eps_clip: float = 0.2,
) -> Callable:
    """A loss function ``f(batch) -> scalar`` for one OpenRLHF configuration (advantage: rloo | group_norm |
    dr_grpo | reinforce_baseline without its whitening; see module docstring)."""
    policy_loss = loss_mod.PolicyLoss(
        clip_eps_low=eps_clip, clip_eps_high=eps_clip, token_level_loss=loss_agg_mode == "token-mean"
    )

    def loss(batch) -> Tensor:
        lp, old, ref, mask = batch.logp, batch.old_logp, batch.ref_logp, batch.mask  # (B, T)
        r = batch.rewards.to(lp.dtype)  # (B,)
        B = r.shape[0]
        if advantage == "rloo":
            r = r - (r.sum(-1, keepdim=True) - r) / (B - 1)
        elif advantage in ("reinforce_baseline", "dr_grpo"):
            r = r - r.mean(-1, keepdim=True)
        elif advantage == "group_norm":
            r = (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + 1e-9)
        kl = (
            torch.zeros_like(lp) if use_loss else utils.compute_approx_kl(old, ref, kl_estimator=estimator).to(lp.dtype)
        )
        rewards = utils.compute_reward(r, 0.0 if use_loss else init_coef, kl, action_mask=mask)  # (B, T)
        rewards = rewards * mask  # get_cumulative_returns(rewards, action_mask, gamma=1)
        adv = rewards.flip(-1).cumsum(-1).flip(-1)
        total = policy_loss(lp, old, adv, action_mask=mask)[0]
        if use_loss:
            kl_l = utils.compute_approx_kl(
                lp, ref, log_probs_old=old, kl_estimator=estimator, unbiased_gradient=unbiased_gradient
            )
            total = total + init_coef * loss_mod.aggregate_loss(kl_l, mask)
        return total

    loss.__qualname__ = f"openrlhf[{advantage}, {estimator} in {'loss' if use_loss else 'reward'}, {loss_agg_mode}]"
    return loss


#: OpenRLHF's default KL: k1 in the reward (here with the RLOO baseline).
rloo_k1_in_reward = make_openrlhf_loss()
#: --algo.kl.use_loss with k3: the KL loss is a global token mean whatever actor.loss_agg_mode says.
k3_in_loss_seq_mean = make_openrlhf_loss(estimator="k3", use_loss=True, loss_agg_mode="seq-mean-token-mean")
