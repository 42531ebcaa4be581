"""Behaviour policies for off-policy audits: "the policy k updates ago".

``stale_pair(model, ref, k, lr)`` returns (policy, behaviour) where the behaviour is ``model`` and the policy is
``model`` after k exact gradient-descent steps of size ``lr`` on the regularized loss

    L(theta) = beta * KL(pi_theta || pi_ref) - E_{y ~ pi_theta}[R(y)]      (reverse KL over complete responses)

so samples drawn from the behaviour are k updates stale for the policy, as in asynchronous or multi-epoch
training. Gradients come from ``biaslab.engines.exact.ExactEngine`` (enumeration, no sampling noise):
grad E[R] = sum_y pi(y) R(y) grad log pi(y).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from .exact import ExactEngine
from .toy import AutoregressiveModel


def exact_loss_grad(
    model: AutoregressiveModel,
    ref: AutoregressiveModel,
    eos: int | None = None,
    beta: float = 1.0,
    task_reward: Tensor | None = None,
) -> Tensor:
    """(P,) exact grad of beta * KL(pi || pi_ref) - E_pi[R] over complete responses."""
    engine = ExactEngine(model, ref, eos=eos, task_reward=task_reward)
    return beta * engine.truths().grad_reverse - engine.task_grad()


def updated(
    model: AutoregressiveModel,
    ref: AutoregressiveModel,
    steps: int,
    lr: float,
    eos: int | None = None,
    beta: float = 1.0,
    task_reward: Tensor | None = None,
) -> AutoregressiveModel:
    """A copy of ``model`` after ``steps`` exact gradient-descent steps on beta * KL - E[R]."""
    if steps < 0 or lr < 0:
        raise ValueError(f"steps and lr must be >= 0, got {steps}, {lr}")
    out = copy.deepcopy(model)
    params = [p for p in out.parameters() if p.requires_grad]
    for _ in range(steps):
        step = lr * exact_loss_grad(out, ref, eos, beta, task_reward)  # (P,) in the order of out.parameters()
        with torch.no_grad():
            vector_to_parameters(parameters_to_vector(params) - step, params)
    return out


def stale_pair(
    model: AutoregressiveModel,
    ref: AutoregressiveModel,
    k: int,
    lr: float,
    eos: int | None = None,
    beta: float = 1.0,
    task_reward: Tensor | None = None,
) -> tuple[AutoregressiveModel, AutoregressiveModel]:
    """(policy, behaviour): the behaviour is ``model`` (frozen), the policy is ``model`` k updates later."""
    policy = updated(model, ref, k, lr, eos, beta, task_reward)
    behaviour = copy.deepcopy(model)
    behaviour.requires_grad_(False)
    return policy, behaviour


__all__ = ["exact_loss_grad", "stale_pair", "updated"]
