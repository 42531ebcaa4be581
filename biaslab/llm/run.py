"""The statistics pass on a real causal LM: sample, score, differentiate every configuration, gather, test.

This module is the statistics pass and the report (``summarize``, ``run_llm``); the steps before it live in
``options`` (what to run), ``setup`` (model, adapter, prompts), ``tokens`` (per-token coefficients and cotangents)
and ``passes`` (the sampling pass, ``collect``). Their names are re-exported here.

For y ~ pi_theta (the LoRA-adapted model) and each ``KLConfig`` c, the per-sample gradient g_c(y) of the
surrogate (``placements``) estimates grad KL(pi_theta || pi_ref) (reverse, sequence level). The pass draws three
independent sets of responses (separate random streams):

* main (``--samples`` n, y ~ pi_theta): g_c(y) for every configuration, the unbiased Rao-Blackwellized reference
  g_ref(y) (``rb`` in reward + loss, reward-to-go: the exact next-token KLs from full logits) on the same y, the
  token-level forward direction and the value statistics;
* directions (``--direction-samples``, y ~ pi_theta): an independent estimate of grad KL(pi || pi_ref) and of the
  token-level forward KL direction f_tok = -E_{y~pi} sum_t sum_v pi_ref(v|y_<t) grad log pi(v|y_<t) (what k3 in
  the loss follows);
* forward (as many, y ~ pi_ref): -grad log pi(y), samples of grad KL(pi_ref || pi) (forward KL).

The bias of c is tested on the paired differences g_c(y) - g_ref(y) projected on directions fixed by the other two
sets, so tests and intervals carry no selection effect and include the reference's own noise
(``calibration.analyze``: Hotelling, Holm over configurations, Fieller ratio intervals, bootstrap of |b|).

Numerics: the trunk may run under bf16 autocast, but the head, log_softmax, every KL and cotangent run in float32
(float64 with float64 weights) and the LoRA delta in float32 (``sample.head_logits``, ``policy.LoRALinear``); the
report's ``numeric_floor`` is the sequence-KL error the chosen dtype causes, measured on a subsample.

Padding: a response ends at its EOS token; positions after it are padded. At padded positions the policy's
log-probabilities are replaced by the reference's: every registered estimator is then exactly 0 there, sequence
sums are unchanged, and the coefficients on padded positions are multiplied by 0, so padding contributes nothing.

Memory: per-token quantities are computed in slices of positions; besides the graph, about three (B, L, V)
float32 tensors are alive at once (policy logits, reference log-probs, one cotangent). Per-sample gradients are
kept as (n, P) rows (P = projected dimension), so statistics are exact and identical whatever the process count.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict

from torch import Tensor

from .._version import __version__
from ..core.verdict import cosine
from . import distributed as D
from .calibration import MIN_CALIBRATED_SAMPLES, Directions, analyze
from .options import (  # noqa: F401
    DEFAULT_CONFIGS,
    FLOOR_SAMPLES,
    FLOOR_WARN,
    FORWARD_TOKEN_KEY,
    POSITION_SLICE,
    REFERENCE_CONFIG,
    REFERENCE_KEY,
    VALUE_ESTIMATORS,
    LLMConfig,
    LLMOptions,
    Setup,
    _round_up,
    _rules_and_group,
    parse_config,
)
from .passes import (  # noqa: F401
    FORWARD_KEY,
    TOKENS_KEY,
    _by_micro_batch,
    _gather_rows,
    _grads_of_specs,
    _micro_batches,
    _Scored,
    _suffix,
    collect,
    forward_grads,
    forward_rows,
    numeric_floor,
    sample_grads,
)
from .setup import _prompts, build, default_perturb, reach_target_kl  # noqa: F401
from .tokens import (  # noqa: F401
    _forward_token_cotangent,
    _generate,
    _ref_logp_full,
    _reference_cotangent,
    _refuse_nonzero_padding,
    _slices,
    _token_cotangent,
    masked_coefficients,
    masked_logp,
    sequence_kls,
    token_coefficients,
    token_stats,
    value_rows,
)


def config_rows(rows: dict[str, dict[str, Tensor]], setup: Setup, opts: LLMOptions, cut: int | None = None
                ) -> tuple[list[dict], Tensor]:
    """Per configuration and recipe (at truncation ``cut``, None: the full responses) the calibrated test,
    intervals, variance and cosines; and the reference rows' mean."""
    sfx = _suffix(cut)
    main = dict(rows["main"])
    dirs = _directions(rows, sfx)
    ref = main[REFERENCE_KEY + sfx]
    main["reference"] = ref
    refs = {}
    for key, rule in setup.rules.items():  # each group's mean of g_ref pairs with the group's update
        name = f"reference/B={rule.group_size}"
        main[name] = ref.reshape(-1, rule.group_size, ref.shape[1]).mean(1)
        refs[key + sfx] = name
    keys = [k + sfx for k in (*setup.configs, *setup.rules)]
    stats_rows = analyze(main, keys, dirs, alpha=opts.alpha, seed=opts.seed, n_boot=opts.bootstrap, references=refs)
    out_rows = []
    for key, srow in zip((*setup.configs, *setup.rules), stats_rows):
        g = main[key + sfx]
        r = main[refs.get(key + sfx, "reference")].mean(0)
        mean, var = g.mean(0), float(g.var(0).sum())
        rule = setup.rules.get(key)
        extra = {} if rule is None else {
            "recipe": rule.description, "group_size": rule.group_size, "groups": int(g.shape[0]),
            "notes": rule.notes, "nominal_scale_length": cut or setup.max_new_tokens}
        out_rows.append({
            "config": key,
            "label": (setup.configs[key] if rule is None else rule).label,
            **{k: v for k, v in srow.items() if k != "config"},
            "variance": var,
            "rel_variance": var / max(float(r @ r), 1e-300),
            "cos_reverse": cosine(mean, r),
            "cos_forward": cosine(mean, dirs.f_dir),
            "cos_forward_token": cosine(mean, dirs.ftok_dir),
            **extra,
        })
    return out_rows, ref.mean(0)

def _directions(rows: dict[str, dict[str, Tensor]], sfx: str = "") -> Directions:
    """The fixed test directions (means of the direction and forward sample sets), at truncation suffix ``sfx``."""
    return Directions(rows["directions"][REFERENCE_KEY + sfx].mean(0),
                      rows["directions"][FORWARD_TOKEN_KEY + sfx].mean(0), rows["forward"][FORWARD_KEY + sfx].mean(0))

def truncation_sweep(rows: dict[str, dict[str, Tensor]], setup: Setup, opts: LLMOptions, full: dict) -> dict | None:
    """The KL sweep by truncation: one point per cut L' (the run's own responses cut after L' tokens, which are
    exact samples of the policy capped at L' tokens) plus the full responses, in ``sweep.run_sweep``'s format
    (one seed per point; n = the run's samples at every point; points share samples, so they are correlated)."""
    if not opts.truncations:
        return None
    points = []
    for cut in (*opts.truncations, None):
        if cut is None:
            cfgs, kl, tokens = full["configs"], full["sequence_kl"]["mean"], full["mean_response_tokens"]
        else:
            cfgs, _ = config_rows(rows, setup, opts, cut)
            v = rows["main"][f"values@{cut}"]
            kl, tokens = float(v[:, 0].mean()), float(v[:, 7].mean())
        configs = [{
            "config": c["config"], "label": c["label"], "rel_bias_mean": c["rel_bias_along_reference"],
            "rel_bias_spread": 0.0, "ci_low_mean": c["ci_low"], "ci_high_mean": c["ci_high"],
            "rel_bias_norm_mean": c["rel_bias_norm"], "rel_variance_mean": c["rel_variance"],
            "biased_seeds": int(bool(c["biased"])), "verdict": c["verdict"],
            "per_seed": [{k: c[k] for k in ("rel_bias_along_reference", "ci_low", "ci_high", "verdict")}],
        } for c in cfgs]
        points.append({"target_kl": opts.target_kl, "max_new_tokens": cut or setup.max_new_tokens,
                       "seeds": [opts.seed], "n_seeds": 1, "sequence_kl": kl, "sequence_kl_spread": 0.0,
                       "mean_response_tokens": tokens, "numeric_floor_nats": (full["numeric_floor"] or {}).get(
                           "nats", 0.0), "samples": int(rows["main"]["values"].shape[0]), "configs": configs})
    return {
        "kind": "truncation sweep",
        "biaslab_version": __version__,
        "design": "one run: its responses cut after L' tokens are exact samples of the same policy with "
                  "--max-new-tokens L'; every point uses all the run's samples (n each; points are correlated)",
        "options": full["options"],
        "sweep": {"target_kls": [opts.target_kl], "lengths": [p["max_new_tokens"] for p in points], "n_seeds": 1,
                  "truncation": True},
        "points": points,
    }

def summarize(rows: dict[str, dict[str, Tensor]], setup: Setup, opts: LLMOptions, timing: dict) -> dict:
    """The JSON-ready report: per configuration the calibrated test, intervals, variance and cosines; the sequence
    KL; values; the numeric floor; warnings; with truncations, the KL sweep by truncation (``sweep``)."""
    main = rows["main"]
    out_rows, r = config_rows(rows, setup, opts)
    ref = main[REFERENCE_KEY]
    n = ref.shape[0]
    r_sq = max(float(r @ r), 1e-300)
    dirs = _directions(rows)
    v = main["values"]  # (n, 8): the columns of ``value_rows``
    values = {}
    for i, name in enumerate(VALUE_ESTIMATORS):
        seq, diff = v[:, 1 + i], v[:, 1 + i] - v[:, 0]
        values[name] = {
            "mean_sequence_value": float(seq.mean()),
            "se": float(seq.std() / math.sqrt(n)),
            "bias_vs_exact": float(diff.mean()),
            "bias_se": float(diff.std() / math.sqrt(n)),
            "token_rmse_vs_exact": math.sqrt(float(v[:, 4 + i].sum()) / max(float(v[:, 7].sum()), 1.0)),
            "sequence_std": float(seq.std()),
        }
    kl_mean, kl_se = float(v[:, 0].mean()), float(v[:, 0].std() / math.sqrt(n))
    warn = []
    if n < MIN_CALIBRATED_SAMPLES:
        warn.append(f"--samples {n} is below {MIN_CALIBRATED_SAMPLES}, the smallest sample size at which the test "
                    "and intervals were found calibrated on the enumerable model: p-values and intervals may be "
                    "optimistic")
    floor = timing.get("numeric_floor")
    if floor is not None and floor["nats"] > FLOOR_WARN * max(kl_mean, 1e-300):
        warn.append(f"numeric floor {floor['nats']:.3g} nats ({opts.dtype} against {floor['against']}) is not small "
                    f"against the sequence KL {kl_mean:.3g}: gradients of this size are numerical noise")
    ended = float(main["ended"].mean()) if setup.eos is not None else None
    if ended is not None and ended < 0.5:
        warn.append(f"only {100 * ended:.0f}% of responses ended at EOS within --max-new-tokens "
                    f"{opts.max_new_tokens}: raise it, or the statistics describe truncated responses")
    for row in out_rows:
        if "groups" in row and row["groups"] < MIN_CALIBRATED_SAMPLES:
            warn.append(f"{row['label']}: {row['groups']} groups, below the calibrated {MIN_CALIBRATED_SAMPLES} "
                        "(each group is one sample of the update): p-values and intervals may be optimistic")
        if row.get("bootstrap_degenerate"):
            p_floor = (1 + row["bootstrap_degenerate"]) / (1 + row["bootstrap_resamples"])
            warn.append(f"{row['label']}: {row['bootstrap_degenerate']} of {row['bootstrap_resamples']} bootstrap "
                        f"resamples of its {row['n']} independent samples keep fewer than {row['tested_directions']} "
                        f"directions; they count against rejection (raw p >= {p_floor:.2g}): use more --samples")
        for note in row.get("notes", []):
            if "updates per rollout" in note:
                warn.append(f"{row['label']}: {note}")
    for w in warn:
        warnings.warn(w, stacklevel=2)
    loaded = setup.loaded
    report = {
        "biaslab_version": __version__,
        "options": {k: (list(x) if isinstance(x, tuple) else x) for k, x in asdict(opts).items() if k != "extra"},
        "model": {"name": loaded.name, "vocab_size": loaded.vocab_size, **loaded.info},
        "policy": setup.policy_info,
        "parameters": {
            "spec": opts.params if setup.psg.subset.spec == opts.params else f"{opts.params} ({setup.psg.subset.spec})",
            "count": setup.psg.subset.numel,
            "tensors": len(setup.psg.subset.names),
            "per_sample_method": setup.psg.subset.method,
            "projected_dim": setup.psg.dim if setup.psg.sketch is not None else None,
        },
        "samples": {"main": n, "directions": int(rows["directions"][REFERENCE_KEY].shape[0]),
                    "forward": int(rows["forward"][FORWARD_KEY].shape[0])},
        "sequence_kl": {"mean": kl_mean, "se": kl_se,
                        "direction": "KL(pi_theta || pi_ref), sum of exact per-token KLs over y ~ pi_theta"},
        "numeric_floor": floor,
        "mean_response_tokens": float(v[:, 7].mean()),
        "ended_at_eos": ended,
        "reference": {
            "config": ":".join(REFERENCE_CONFIG),
            "norm": math.sqrt(r_sq),
            "rel_se": math.sqrt(float(ref.var(0).sum()) / n) / math.sqrt(r_sq),
            "cos_directions_estimate": cosine(r, dirs.r_dir),
            "cos_forward": cosine(r, dirs.f_dir),
            "cos_forward_token": cosine(r, dirs.ftok_dir),
        },
        "train_rewards": setup.train_history,
        "configs": out_rows,
        "values": values,
        "warnings": warn,
        "timing": timing,
    }
    sweep = truncation_sweep(rows, setup, opts, report)
    if sweep is not None:
        report["sweep"] = sweep
    return report

def run_llm(opts: LLMOptions) -> dict | None:
    """The whole pass; returns the report on rank 0 (None on the other ranks)."""
    rows, setup, timing = collect(opts)
    rank, _ = D.world()
    return summarize(rows, setup, opts, timing) if rank == 0 else None

__all__ = [
    "DEFAULT_CONFIGS", "FORWARD_KEY", "LLMConfig", "LLMOptions", "REFERENCE_KEY", "build", "collect",
    "config_rows", "forward_grads", "forward_rows", "truncation_sweep",
    "masked_coefficients", "masked_logp", "numeric_floor", "parse_config", "run_llm", "sample_grads", "sequence_kls",
    "summarize", "token_coefficients", "token_stats", "value_rows",
]
