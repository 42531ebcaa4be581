"""Framework recipes and user losses on the real model: ``biaslab llm --framework NAME --set KEY=VALUE`` and
``biaslab llm --loss FILE:FUNC``, the same update rules ``biaslab audit`` judges on its toy.

A rule (a preset's ``biaslab.core.recipes.Recipe``, or a ``biaslab.workflows.userloss.UserLoss``) maps ONE group of B
responses
to one prompt to a scalar loss L(logp, old_logp, ref_logp, mask); the trainer steps along -grad L. On the real
model the pass draws the main samples in blocks of B consecutive responses that share a prompt, so every block is
one group. L depends on theta only through the sampled tokens' log-probabilities, so its gradient is

    grad L = sum_{i in group} sum_t a_it grad log pi(y_it | x, y_i,<t),      a = dL/dlogp  (autograd, float64),

i.e. one per-sample gradient row per response with coefficients a_i (``run.sample_grads``), summed over the
group. Divided by the rule's nominal scale c (beta x B x the weight the declared aggregation gives one token of a
full-length group, exactly as the audit: ``Recipe.nominal_scale`` / ``UserLoss.nominal_scale``), an unbiased rule
has E[grad L / c] = grad KL(pi || pi_ref). Each group's row is paired with the mean of the Rao-Blackwellized
reference g_ref over the same B responses (unbiased for the same target), so the calibrated tests and intervals of
``calibration.analyze`` apply with n = the number of groups.

What the real model does and does not model (refused or reported, never silently dropped):

* on-policy only: responses come from pi_theta, so old_logp = logp in value. A configuration that makes several
  updates per rollout (verl ppo_epochs / mini-batches, OpenRLHF's rollout vs train batch) is measured at its first,
  on-policy update; the report says so (``biaslab audit`` models the stale updates on its toy);
* task rewards are 0 (the KL part of the update, as the audit's default);
* whitened advantages (normalised over a large rollout batch) use the population mean and std of the per-token
  advantages estimated on the independent direction samples (the exact engine uses their exact values);
* estimators that read whole next-token distributions (``rb``) are refused in a recipe (use ``--configs``);
* with EOS, token-mean aggregations weight responses by their length: the nominal scale assumes full-length
  responses, so the measured relative bias includes that length effect (``--no-eos`` removes it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .models import LLMError


@dataclass
class LLMRule:
    """One update rule measured per group: its row key, label, the rule object, the group size B and notes."""

    key: str
    label: str
    rule: object  # biaslab.core.recipes.Recipe or biaslab.workflows.userloss.UserLoss
    group_size: int
    description: str
    notes: list[str] = field(default_factory=list)
    updates_per_rollout: int = 1

    @property
    def needs_whitening(self) -> bool:
        """Whitened advantages with something to whiten (the KL in the reward; task rewards are 0)."""
        return bool(getattr(self.rule, "whiten", False)) and bool(getattr(self.rule, "has_reward_kl", False))

    def nominal(self, length: int, whiten_std: float | None) -> float:
        c = float(self.rule.nominal_scale(self.group_size, length, whiten_std))
        if not (math.isfinite(c) and c > 0):
            raise LLMError(f"{self.label}: nominal scale {c} (no KL term with a positive coefficient?)")
        return c


def build_rules(opts) -> list[LLMRule]:
    """The rules of ``--framework`` (with ``--set`` / ``--config`` / ``--enable-kl``) and of each ``--loss``."""
    rules: list[LLMRule] = []
    if opts.framework:
        rules.append(_preset_rule(opts))
    elif opts.framework_settings or opts.framework_config or opts.enable_kl:
        raise LLMError("--set, --config and --enable-kl go with --framework NAME")
    for spec in opts.losses:
        rules.append(_loss_rule(opts, spec))
    if not opts.losses and (opts.loss_beta is not None or opts.loss_agg is not None):
        raise LLMError("--beta and --agg go with --loss FILE:FUNC")
    for r in rules:
        if getattr(r.rule, "needs_full_logits", False):
            raise LLMError(f"{r.label}: estimators that read whole next-token distributions (rb) are not supported "
                           "in a recipe on the real model; measure them with --configs rb:...")
        if r.group_size < 1:
            raise LLMError(f"{r.label}: group size must be >= 1, got {r.group_size}")
    return rules


def _preset_rule(opts) -> LLMRule:
    from ..core.recipes import RecipeError
    from ..frameworks import get_preset
    from ..frameworks.base import PresetError
    from ..frameworks.config import load_config_file, parse_sets

    try:
        preset = get_preset(opts.framework)
        settings: dict[str, object] = load_config_file(opts.framework_config) if opts.framework_config else {}
        sets = parse_sets(list(opts.framework_settings))
        for k in sets:  # --set keys are strict, as in the audit
            preset.key(preset.normalize_name(k))
        cfg, _, ignored = preset.read_config({**settings, **sets}, lenient=bool(opts.framework_config))
        notes = list(preset.notes(cfg))
        if opts.enable_kl and not preset.kl_enabled(cfg):
            cfg, changed = preset.enable_kl(cfg)
            notes.append("KL switched on by --enable-kl: " + ", ".join(f"{k}={v}" for k, v in changed.items()))
        recipe = preset.recipe(cfg)
    except (PresetError, RecipeError, FileNotFoundError) as exc:
        raise LLMError(f"--framework {opts.framework}: {exc}") from None
    if not (recipe.has_reward_kl or recipe.has_loss_kl):
        reason = preset.no_kl_reason(cfg) or "KL is disabled in this configuration"
        raise LLMError(f"--framework {opts.framework}: {reason}; nothing to measure (pass --enable-kl)")
    group = opts.group_size if opts.group_size is not None else int(preset.group_size(cfg))
    lag = int(preset.updates_per_rollout(cfg))
    if lag > 1:
        notes.append(f"{lag} updates per rollout ({preset.lag_reason(cfg)}): the real model is sampled from the "
                     "current policy, so this measures the first (on-policy) update only; `biaslab audit` models "
                     "the stale ones")
    if ignored:
        notes.append(f"{len(ignored)} keys of the config file are irrelevant to the KL gradient and were ignored")
    if opts.group_size is not None and opts.group_size != preset.group_size(cfg):
        notes.append(f"groups of {opts.group_size} (--group-size) instead of the configuration's "
                     f"{preset.group_size(cfg)}")
    return LLMRule(f"framework:{preset.name}", f"{preset.name} recipe (B={group})", recipe, group,
                   recipe.describe(), notes, lag)


def _loss_rule(opts, spec: str) -> LLMRule:
    from ..workflows.userloss import UserLoss, UserLossError, load_loss

    try:
        fn = load_loss(spec)
        rule = UserLoss(fn, beta=1.0 if opts.loss_beta is None else opts.loss_beta,
                        agg=opts.loss_agg or "seq-mean-token-sum", name=spec)
    except (UserLossError, ValueError) as exc:
        raise LLMError(str(exc)) from None
    group = opts.group_size if opts.group_size is not None else 2
    return LLMRule(f"loss:{spec}", f"loss {spec.rsplit(':', 1)[-1]} (B={group})", rule, group, rule.describe(),
                   ["task rewards are 0 (batch.rewards): the KL part of the update"])


def rule_coefficients(r: LLMRule, lp: Tensor, lr: Tensor, mask: Tensor, whiten: tuple[float, float] | None
                      ) -> Tensor:
    """(B, L) a = dL/dlogp of each group's loss on the batch's consecutive groups of ``r.group_size`` (float64
    autograd, ``placements.loss_coefficients``; on-policy: old_logp = logp in value; task rewards 0); 0 on padding.
    ``lp``/``lr`` are the sampled tokens' log-probs, ``mask`` 1 on response tokens."""
    from ..core.placements import loss_coefficients

    B, L = lp.shape
    g = r.group_size
    if B % g:
        raise LLMError(f"{r.label}: a micro-batch of {B} responses does not hold whole groups of {g}")
    m = mask.to(torch.float64).reshape(B // g, g, L)
    x = lp.detach().to(torch.float64).reshape(B // g, g, L) * m
    ref = lr.detach().to(torch.float64).reshape(B // g, g, L) * m
    if r.needs_whitening and whiten is None:
        raise LLMError(f"{r.label}: whitened advantages need the population statistics (internal error)")
    try:  # RecipeError, UserLossError, a loss of the wrong shape or non-finite (e.g. a zero group std)
        a = loss_coefficients(r.rule, x, x, ref, m, None, None, whiten if r.needs_whitening else None).tok * m
    except ValueError as exc:
        raise LLMError(f"{r.label}: {exc}") from None
    if not bool(torch.isfinite(a).all()):
        raise LLMError(f"{r.label}: the update is non-finite (NaN/inf) for some group")
    return a.reshape(B, L)


def whiten_stats(r: LLMRule, lp: Tensor, lr: Tensor, mask: Tensor) -> tuple[float, float]:
    """Population (mean, std) of the rule's per-token advantages (before whitening) over the responses given (the
    independent direction samples, in groups), as ``ExactEngine.whiten_stats`` computes them exactly."""
    from ..core.recipes import advantages

    n, L = lp.shape
    g = r.group_size
    m = mask.to(torch.float64).reshape(n // g, g, L)
    x = lp.to(torch.float64).reshape(n // g, g, L) * m
    adv = advantages(r.rule, x, x, lr.to(torch.float64).reshape(n // g, g, L) * m, m, None)  # (G, g, L)
    s0 = float(m.sum())
    mean = float((adv * m).sum()) / max(s0, 1.0)
    var = max(float((adv * adv * m).sum()) / max(s0, 1.0) - mean**2, 0.0)
    return mean, math.sqrt(max(var, 1e-8))


__all__ = ["LLMRule", "build_rules", "rule_coefficients", "whiten_stats"]
