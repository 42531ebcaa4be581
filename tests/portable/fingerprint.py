"""The numbers and verdicts biaslab must reproduce on any CPU: one JSON document, compared by ``compare.py``.

    python tests/portable/fingerprint.py OUT.json

Kinds of entries (``compare.py`` applies the tolerance each kind states):

* ``exact``: the exact engine on toys that cover its paths (tabular closed form, neural autograd, EOS-ended
  responses, groups of B = 2 with GRPO / RLOO baselines, a stale behaviour policy, chunked enumeration): per
  configuration the verdict and its text (exact), E[g] and the variance (to 1e-9 relative to the update's size
  sqrt(E||g||^2)), the relative bias (to 1e-9: it is already relative);
* ``audit``: every framework default (``audit --defaults``): verdicts and directions exact, numbers as above;
* ``mc``: seeded Monte Carlo (``check --mode mc``): verdicts exact; p-values and intervals to 1e-6, because the
  samples are the same only while the sampler's probabilities round the same way;
"""

from __future__ import annotations

import sys

import torch


def exact_rows(engine, configs) -> list[dict]:
    out = []
    for r in engine.evaluate_all(configs):
        size = (r.variance + float(r.expected_grad @ r.expected_grad)) ** 0.5
        out.append({"label": r.config.label, "verdict": r.verdict, "text": r.info.describe(),
                    "matches": r.matches, "rel_bias": r.rel_bias, "variance": r.variance, "size": size,
                    "expected_grad": r.expected_grad.tolist()})
    return out


def exact_section() -> dict:
    from biaslab import ExactEngine, make_pair
    from biaslab.core.recipes import Recipe
    from biaslab.workflows.table import all_configs

    basic = all_configs(("k1", "k2", "k3", "abs"))
    groups = [
        Recipe(baseline="grpo", loss_estimator="k3", loss_coef=0.1, pg_agg="seq-mean-token-mean",
               loss_agg="seq-mean-token-mean"),
        Recipe(baseline="rloo", reward_estimator="k1", reward_coef=0.1),
        Recipe(baseline="batch_mean", reward_estimator="k3", reward_coef=0.1, loss_estimator="k3", loss_coef=0.1),
    ]
    out = {}
    for model, V, T, seed in (("tabular", 3, 4, 0), ("neural", 3, 3, 1), ("tabular", 2, 3, 2)):
        policy, ref = make_pair(model, vocab_size=V, length=T, seed=seed, kl_scale=0.8)
        out[f"{model}-V{V}-T{T}-s{seed}"] = exact_rows(ExactEngine(policy, ref), basic)
    policy, ref = make_pair("tabular", vocab_size=3, length=3, seed=3, kl_scale=0.8)
    out["eos"] = exact_rows(ExactEngine(policy, ref, eos=0), basic)
    behaviour, _ = make_pair("tabular", vocab_size=3, length=3, seed=4, kl_scale=0.8)
    out["behaviour"] = exact_rows(ExactEngine(policy, ref, behaviour=behaviour), basic[:12])
    policy, ref = make_pair("tabular", vocab_size=2, length=2, seed=5, kl_scale=0.8)
    out["groups"] = exact_rows(ExactEngine(policy, ref, group_size=2), groups)
    policy, ref = make_pair("tabular", vocab_size=2, length=6, seed=6, kl_scale=0.8)
    out["chunked"] = exact_rows(ExactEngine(policy, ref, max_bytes=2**16), basic[:6])
    return out


def audit_section() -> list[dict]:
    from biaslab.workflows.audit import audit_defaults, records

    keep = ("framework", "scenario", "verdict", "direction", "rel_bias", "scale", "variance")
    return [{k: row.get(k) for k in keep} for row in records(list(audit_defaults()))]


def mc_section() -> dict:
    from biaslab.workflows.check import check_estimator

    out = {}
    for placement, level in (("loss", "token"), ("both", "token"), ("loss", "sequence")):
        rep = check_estimator("k3", placement=placement, level=level, mode="mc", models=2, samples=4000, seed=0)
        out[f"k3-{placement}-{level}"] = {
            "verdict": rep.verdict, "matches": rep.matches, "p_value": rep.p_value,
            "models": [{"verdict": m.verdict, "p_value": m.p_value, "ci_low": m.ci_low, "ci_high": m.ci_high}
                       for m in rep.models]}
    return out


def fingerprint() -> dict:
    torch.set_default_dtype(torch.float64)
    return {"exact": exact_section(), "audit": audit_section(), "mc": mc_section()}


if __name__ == "__main__":
    from biaslab.core.io import to_json

    text = to_json({"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                    **fingerprint()})
    with open(sys.argv[1], "w") as f:
        f.write(text + "\n")
