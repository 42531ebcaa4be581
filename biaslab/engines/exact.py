"""The exact engine: enumerate every response (and every group of B responses) of a toy model and compute the
expected update of any configuration, its variance and its verdict, with no sampling noise.

For a policy pi_theta, a fixed reference pi_ref and a behaviour policy mu (mu = pi: on-policy), a configuration's
update on a group (y_1..y_B) drawn i.i.d. from mu is g = grad_theta L(y_1..y_B) (``Recipe.batch_loss``; for the
basic ``make_config`` configurations B = 1 and g(y) is the per-sample estimate of BACKGROUND section 3). Because L
depends on theta only through the next-token log-probabilities,

    g = sum_{i,t} a_it grad log pi(y_it | y_i,<t) + sum_{i,t,v} c_itv grad log pi(v | y_i,<t),

with a = dL/dlogp (and c = dL/dlogp_full for estimators that read whole distributions). The engine

* enumerates complete responses: all V**T sequences, or with an end-of-sequence token every response that ends
  at EOS or at T tokens (``tokens`` (N, T), ``mask`` (N, T) 1 on response tokens);
* computes the coefficients for every group in one autograd pass over stacked groups;
* sums them, weighted by the group's probability under mu, into per-response coefficients, so that E[g] is one
  weighted sum of grad log pi: a reshape-sum in closed form for tabular models, one backward pass otherwise;
* when B = 1, writes each configuration as a linear combination sum_i alpha_i of shared *fields* (a basic
  configuration: reward_coef x its reward part + loss_coef x its loss part), so E[g] = sum_i alpha_i E[g_i] and
  E||g||^2 = sum_ij alpha_i alpha_j E[g_i . g_j], each field's mean and each pair's inner product computed once
  per enumeration (closed form for tabular models; for others one per-token Jacobian pass gives the token Gram
  (N, T, T) and the means of every field registered before it);
* when B > 1, sums over the sorted groups (multisets, weighted by their orderings: a ``Recipe`` is symmetric in
  the group's members) and takes E||g||^2 from the Jacobian (N, T, P);
* computes the named directions (``biaslab.core.verdict.DIRECTIONS``) and KLs over complete responses, and applies
  the one verdict rule (``biaslab.core.verdict.exact_verdict``) against ``nominal * grad KL(pi || pi_ref)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.recipes import Recipe
from ..core.verdict import DIRECTIONS, Directions, Verdict, exact_verdict, true_gradient_is_zero
from .enumeration import (
    DEFAULT_MAX_BYTES,
    MAX_GROUPS,
    Enumeration,
    EnumerationTooLarge,
    _human,
    check_enumerable,
    count_complete,
    enumerate_complete,
    enumerate_sequences,
    enumeration_bytes,
)
from .fields import Fields
from .precision import config_dtype, estimator_dtype
from .toy import DTYPE, AutoregressiveModel, ModelError, check_models
from .truths import Truths, TruthsMixin, value_derivative


@dataclass
class ExactResult:
    """Exact statistics of one configuration's update g, groups drawn from mu."""

    config: Recipe
    expected_grad: Tensor  # (P,) E[g]
    variance: float  # E||g - E g||^2 (trace of the covariance)
    nominal_scale: float  # c: an unbiased configuration has E g = c * grad KL
    info: Verdict
    #: share of the expected tokens where the loss estimator's clamps zero its gradient (None: no clamps)
    clamped_fraction: float | None = None

    # the verdict's fields, flat
    verdict = property(lambda self: self.info.verdict)
    rel_bias = property(lambda self: self.info.rel_bias)
    scale = property(lambda self: self.info.scale)
    factor = property(lambda self: self.info.factor)
    cos_reverse = property(lambda self: self.info.cos_reverse)
    cos_forward = property(lambda self: self.info.cos_forward)
    all_matches = property(lambda self: self.info.matches)  # direction -> scale relative to c
    matches = property(lambda self: self.info.direction)  # the first matched direction, or "none"
    nearest = property(lambda self: self.info.nearest)
    nearest_cos = property(lambda self: self.info.nearest_cos)
    recipe = property(lambda self: self.config)

    def as_dict(self, with_grad: bool = True) -> dict:
        cfg = self.config
        basic = cfg.estimator is not None
        d = {
            "label": cfg.label,
            "estimator": cfg.estimator.name if basic else None,
            "placement": cfg.placement.value if cfg.placement is not None else None,
            "level": cfg.level.value,
            "credit": cfg.credit.value if cfg.credit is not None else None,
            "variance": self.variance,
            "rel_bias": self.rel_bias,
            "scale": self.scale,
            "factor": self.factor,
            "cos_reverse": self.cos_reverse,
            "cos_forward": self.cos_forward,
            "verdict": self.verdict,
            "verdict_text": self.info.describe(),
            "matches": self.matches,
            "all_matches": dict(self.all_matches),
            "nearest": self.nearest,
            "nearest_cos": self.nearest_cos,
            "nominal_scale": self.nominal_scale,
            "dtype": self.info.dtype,
            "tolerance": self.info.tolerance,
            "objective": self.info.target,
            "clamped_fraction": self.clamped_fraction,
        }
        if with_grad:
            d["expected_grad"] = self.expected_grad.tolist()
        return d



class ExactEngine(Enumeration, TruthsMixin, Fields):
    """Enumerate every complete response (and group) and evaluate configurations exactly (module docstring).

    One class from three mixins, one responsibility each: ``Enumeration`` (the responses, chunks and
    ``weighted_grad``), ``TruthsMixin`` (named directions and KLs), ``Fields`` (coefficients, fields, moments);
    this class holds the set-up, the caches and the verdict.

    Args:
        policy: pi_theta (its parameters receive the gradient).
        ref: pi_ref (never differentiated).
        behaviour: mu, the policy that sampled the data (None: on-policy, mu = pi).
        eos: end-of-sequence token id (None: fixed length T).
        group_size: B, the responses per group (baselines and aggregation act within a group).
        task_reward: optional (N,) task reward of each enumerated response (default 0); the KL part of the
            update is then judged: g(config) - g(config without KL).
        max_bytes: refuse enumerations whose estimated peak memory exceeds this (default 4 GiB or
            $BIASLAB_MAX_BYTES).
    """

    def __init__(
        self,
        policy: AutoregressiveModel,
        ref: AutoregressiveModel,
        behaviour: AutoregressiveModel | None = None,
        eos: int | None = None,
        group_size: int = 1,
        task_reward: Tensor | None = None,
        max_bytes: int | None = None,
        max_groups: int = MAX_GROUPS,
    ) -> None:
        check_models(policy, ref, behaviour, group_size, eos)
        self.policy, self.ref, self.behaviour = policy, ref, behaviour
        self.V, self.T, self.eos, self.B = policy.vocab_size, policy.length, eos, int(group_size)
        self.params = [p for p in policy.parameters() if p.requires_grad]
        if not self.params:
            raise ModelError("the policy has no parameters that require grad")
        self.P = sum(p.numel() for p in self.params)
        n_params = 0 if policy.closed_form_grads else self.P
        self._max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
        self.N = count_complete(self.V, self.T, eos)
        self.chunk_size: int | None = None  # set when the enumeration is processed in chunks (see _plan_chunks)
        try:
            check_enumerable(self.V, self.T, n_params, self._max_bytes, eos)
        except EnumerationTooLarge:
            if not (policy.closed_form_grads and eos is None and self.B == 1 and behaviour is None):
                raise
            self.chunk_size = self._plan_chunks()
        if self.B > 1:
            if self.N**self.B > max_groups:
                raise ValueError(
                    f"exact enumeration of groups needs N**B = {self.N}**{self.B} = {self.N**self.B:.3g} groups "
                    f"(limit {max_groups:.3g}); use a smaller group size or toy, or Monte Carlo over groups"
                )
            need = self.N * self.T * self.P * 8 * 2
            if need > self._max_bytes:
                raise EnumerationTooLarge(
                    f"groups of B > 1 need the Jacobian of {self.N} responses x {self.T} tokens x {self.P} "
                    f"parameters, about {_human(need)}; use a smaller toy"
                )

        if task_reward is not None:
            task_reward = torch.as_tensor(task_reward, dtype=DTYPE)
            if task_reward.shape != (self.N,) or not torch.isfinite(task_reward).all():
                raise ValueError(f"task_reward must be a finite ({self.N},) tensor, one value per complete response")
        self.task_reward = task_reward
        self._directions: Directions | None = None
        self._level_probs: list[Tensor] | None = None
        self._full_enumeration = True  # tokens are all V**T sequences in base-V order (closed-form reshape sums)
        self._reset_caches()
        if self.chunk_size is None:
            self._setup(*enumerate_complete(self.V, self.T, eos))

    def _reset_caches(self) -> None:
        """Empty the caches of one enumeration (or chunk): truths, Jacobian and Gram matrices, fields and sums."""
        self._truths: Truths | None = None
        self._jac: Tensor | None = None
        self._gram: Tensor | bool | None = None  # False: would not fit in the memory budget
        self._tok_gram: Tensor | bool | None = None
        self._pair_gram: Tensor | bool | None = None
        self._value_grads: dict = {}
        self._objective_dirs: dict = {}  # objective name -> (P,) its gradient (``direction``)
        self._kl: dict = {}  # (estimator, level) -> its values and derivative on every response (``_kl_values``)
        self._fields: dict = {}  # field key -> Coefficients of one response's update (B = 1)
        self._means: dict = {}  # field key -> (P,) sum_n mu(y_n) g_n
        self._dots: dict = {}  # (key, key) -> sum_n mu(y_n) g_n . g'_n

    def evaluate(self, config, objective: str = "reverse_kl") -> ExactResult:
        """Exact expected update, variance, verdict (``biaslab.core.verdict``) and matched directions of ``config``,
        judged against ``objective`` (any name of ``biaslab.core.objectives``; default the sequence-level reverse KL
        to pi_ref, which in distillation is the teacher)."""
        tr = self.truths()
        mean, second, wstd = self.moments(config)
        variance = max(second - float(mean @ mean), 0.0)
        nominal = config.nominal_scale(self.B, self.T, wstd)
        # a named direction of round-off size (the rule of ``true_gradient_is_zero``) is zero: it never matches
        def named(d: Tensor) -> Tensor:
            return torch.zeros_like(d) if true_gradient_is_zero(float(d.norm()), tr.score_rms) else d

        if self._directions is None:  # stacked once per engine (batched dot products in the verdict rule)
            self._directions = Directions({k: named(v) for k, v in tr.directions.items() if k != "zero"})
        directions = self._directions
        undefined = tr.undefined
        if objective not in directions.names:
            target = self.direction(objective)
            directions = directions.extended({objective: named(target)})
            undefined = true_gradient_is_zero(float(target.norm()), tr.score_rms)
        ev = self.expected_value_grad(config) if isinstance(config, Recipe) else None
        if ev is not None:
            directions = directions.extended({"expected_value": named(ev)})
        info = exact_verdict(mean, directions, nominal, math.sqrt(max(second, 0.0)), undefined, config_dtype(config),
                             target=objective)
        est = getattr(config, "loss_estimator", None) if getattr(config, "has_loss_kl", False) else None
        clamp = None if est is None else self.clamped_fraction(est, getattr(config, "level", "token"))
        return ExactResult(config, mean.detach(), variance, nominal, info, clamp)

    def evaluate_all(self, configs: list, progress: bool = False) -> list[ExactResult]:
        """``evaluate`` every configuration, under the thread policy for the enumeration's size."""
        from tqdm.auto import tqdm

        from .threads import small_problem_threads, work_size

        with small_problem_threads(work_size(self.N * self.B, self.T, self.V)):
            if self.B == 1 and self.chunk_size is None:  # every field first: one Jacobian pass serves them all
                for c in configs:
                    if not getattr(c, "whiten", False):
                        for _, key in self._parts(c):
                            self._field(key)
            return [self.evaluate(c) for c in tqdm(configs, desc="exact", disable=not progress, leave=False)]


__all__ = [
    "DIRECTIONS",
    "DEFAULT_MAX_BYTES",
    "MAX_GROUPS",
    "EnumerationTooLarge",
    "ExactEngine",
    "ExactResult",
    "Truths",
    "check_enumerable",
    "config_dtype",
    "count_complete",
    "enumerate_complete",
    "enumerate_sequences",
    "enumeration_bytes",
    "value_derivative",
    "estimator_dtype",
]

