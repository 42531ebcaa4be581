"""``biaslab llm``: bias and variance of KL-gradient configurations on a real causal LM.

Runs under torchrun for several processes (gloo on CPU, NCCL on GPUs); only rank 0 prints and writes.
Heavy imports (transformers) happen when the command runs, so ``biaslab --help`` stays fast without the extra.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from ..core.io import to_json


def _options(args: argparse.Namespace, **over) -> object:
    from ..llm.run import LLMOptions

    same = ("reference", "prompts", "samples", "direction_samples", "max_new_tokens", "params", "device", "dtype",
            "seed", "batch_size", "lora_rank", "perturb", "target_kl", "train_steps", "projections", "max_dense",
            "alpha", "allow_tf32", "bootstrap", "generation_batch", "stacked", "framework", "enable_kl", "group_size")
    kw = {name: getattr(args, name) for name in same}  # flags named as the options
    kw.update(
        model=args.policy or args.model,
        configs=tuple(c for c in args.configs.split(",") if c.strip()),
        eos=False if args.no_eos else None,
        progress=bool(args.progress),
        truncations=None if args.sweep_truncate is None else tuple(
            int(x) for x in _floats(args.sweep_truncate, "--sweep-truncate", allow_empty=True)),
        framework_settings=tuple(args.set or ()),
        framework_config=args.config,
        losses=tuple(args.loss or ()),
        loss_beta=args.beta,
        loss_agg=args.agg,
    )
    kw.update(over)
    return LLMOptions(**kw)


def _floats(text: str, name: str, allow_empty: bool = False) -> list[float]:
    from ..llm.models import LLMError

    try:
        vals = [float(x) for x in text.split(",") if x.strip() and x.strip() != "0"]
    except ValueError:
        raise LLMError(f"{name} {text!r}: expected comma-separated numbers") from None
    if allow_empty and not vals:
        return []
    if not vals or any(not v > 0 for v in vals):
        raise LLMError(f"{name} {text!r}: expected positive numbers")
    return vals


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings on the command line: one line, no source location."""
    print(f"biaslab llm: warning: {message}", file=file or sys.stderr)


def _run(args: argparse.Namespace) -> int:
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        if not (args.sweep_kl or args.sweep_lengths or args.perturb_seeds > 1):
            # a single pass prints its warnings in its report: not twice
            warnings.filterwarnings("ignore", category=UserWarning, module=r"biaslab\.llm\.run")
        return _run_passes(args)


def _run_passes(args: argparse.Namespace) -> int:
    from ..llm.models import LLMError
    from ..llm.run import run_llm

    try:
        if args.sweep_kl or args.sweep_lengths:
            from ..llm.sweep import run_sweep

            kls = _floats(args.sweep_kl, "--sweep-kl") if args.sweep_kl else [args.target_kl]
            lengths = [int(x) for x in _floats(args.sweep_lengths, "--sweep-lengths")] if args.sweep_lengths \
                else [args.max_new_tokens]
            if any(k is None for k in kls):
                raise LLMError("--sweep-lengths without --sweep-kl needs --target-kl")
            report = run_sweep(lambda **over: _options(args, **over), kls, lengths, args.perturb_seeds,
                               args.out or None)
        elif args.perturb_seeds > 1:
            from ..llm.sweep import run_seeds

            report = run_seeds(lambda **over: _options(args, **over), args.perturb_seeds)
        else:
            report = run_llm(_options(args))
    except LLMError as exc:
        print(f"biaslab llm: error: {exc}", file=sys.stderr)
        return 2
    finally:
        from ..llm.distributed import shutdown

        shutdown()
    if report is None:  # not rank 0
        return 0
    if args.out and "configs" in report:
        from ..llm.figure import write_figure

        report["written"] = [str(p) for p in write_figure(report, args.out)]
        if report.get("sweep"):
            from ..llm.sweep import write_sweep

            report["written"] += [str(p) for p in write_sweep(report["sweep"], args.out)]
    if args.format == "json":
        print(to_json(report, default=float))
    else:
        print(to_text(report))
    return 0


def _ci(lo: float, hi: float) -> str:
    return f"[{lo:+.3f}, {hi:+.3f}]"


def to_text(report: dict) -> str:
    """A short human-readable summary (the JSON has everything)."""
    if "points" in report:  # a sweep or several perturbation seeds
        lines = [f"{report['kind']}: {len(report['points'])} points"]
        for pt in report["points"]:
            lines.append(f"  target KL {pt['target_kl']}, L {pt['max_new_tokens']}: KL {pt['sequence_kl']:.4g}, "
                         f"{pt['n_seeds']} seed(s)")
            for c in pt["configs"]:
                lines.append(f"    {c['label']:34s} rel.bias {c['rel_bias_mean']:+.3f} (seed spread "
                             f"{c['rel_bias_spread']:.3f}), biased in {c['biased_seeds']}/{pt['n_seeds']} seeds")
        lines += [f"wrote {p}" for p in report.get("written", [])]
        return "\n".join(lines)
    kl = report["sequence_kl"]
    ref = report["reference"]
    floor = report.get("numeric_floor")
    lines = [
        f"model {report['model']['name']} ({report['model']['class']}), params {report['parameters']['spec']}: "
        f"{report['parameters']['count']} numbers"
        + (f" projected on {report['parameters']['projected_dim']}" if report["parameters"]["projected_dim"] else ""),
        f"sequence KL(pi||pi_ref) = {kl['mean']:.4g} +- {kl['se']:.2g} (exact per-token KLs summed), "
        f"mean response length {report['mean_response_tokens']:.3g} tokens"
        + (f", {100 * report['ended_at_eos']:.0f}% ended at EOS" if report.get("ended_at_eos") is not None else ""),
        f"samples: {report['samples']['main']} main, {report['samples']['directions']} for the directions, "
        f"{report['samples']['forward']} from pi_ref; reference relative SE {ref['rel_se']:.3g}"
        + (f"; numeric floor {floor['nats']:.2g} nats ({report['options']['dtype']} vs {floor['against']})"
           if floor else ""),
        "",
        f"{'configuration':34s} {'rel.bias along ref [CI]':>28s} {'toward fwd-token [CI]':>28s} {'|b|/|r| [CI]':>26s}"
        f" {'p (Holm)':>9s}  verdict",
    ]
    for r in report["configs"]:
        along = f"{r['rel_bias_along_reference']:+.3f} {_ci(r['ci_low'], r['ci_high'])}"
        toward = f"{r['rel_bias_toward_forward_token']:+.3f} {_ci(r['toward_ci_low'], r['toward_ci_high'])}"
        norm = f"{r['rel_bias_norm']:.3f} [{r['rel_bias_norm_ci_low']:.3f}, {r['rel_bias_norm_ci_high']:.3f}]"
        lines.append(f"{r['label']:34s} {along:>28s} {toward:>28s} {norm:>26s} {r['p_value']:9.2g}  {r['verdict']}")
    lines.append("")
    lines.append("values against the exact per-token KL (sum over the response):")
    for name, v in report["values"].items():
        lines.append(
            f"  {name}: mean {v['mean_sequence_value']:.4g} +- {v['se']:.2g}, bias {v['bias_vs_exact']:+.3g} "
            f"+- {v['bias_se']:.2g}, token RMSE {v['token_rmse_vs_exact']:.3g}"
        )
    for r in report["configs"]:
        if "recipe" in r:
            lines.append(f"{r['label']}: {r['recipe']}; {r['groups']} groups of {r['group_size']}, divided by the "
                         f"nominal scale (aggregation weight of a {r['nominal_scale_length']}-token response)")
            lines += [f"  note: {n}" for n in r["notes"] if "updates per rollout" not in n]
    sweep = report.get("sweep")
    if sweep:
        lines.append("")
        lines.append("KL sweep by truncation (the same responses cut after L' tokens; n = "
                     f"{sweep['points'][0]['samples']} at every point):")
        lines.append(f"  {'L':>4s} {'KL':>8s}  " + "  ".join(f"{c['label'][:18]:>18s}" for c in
                                                              sweep["points"][0]["configs"]))
        for pt in sweep["points"]:
            cells = "  ".join(f"{c['rel_bias_mean']:+8.3f}{'*' if c['biased_seeds'] else ' ':1s}{'':9s}"
                              for c in pt["configs"])
            lines.append(f"  {pt['max_new_tokens']:4d} {pt['sequence_kl']:8.4f}  {cells}")
        lines.append("  (relative bias along the reference; * = biased at family-wise alpha within the point)")
    for w in report.get("warnings", []):
        lines.append(f"warning: {w}")
    for p in report.get("written", []):
        lines.append(f"wrote {p}")
    return "\n".join(lines)


def add_commands(sub: argparse._SubParsersAction) -> None:
    from ..llm.calibration import MIN_CALIBRATED_SAMPLES
    from ..llm.run import DEFAULT_CONFIGS
    from .flags import DEFAULT_ALPHA, probability

    p = sub.add_parser(
        "llm",
        help="bias/variance of KL-gradient configurations on a real Hugging Face causal LM (needs the llm extra)",
        description=__doc__.split("\n")[0],
    )
    p.add_argument("--model", default="tiny-random", help="smollm2 | tiny-random | tiny-random-gpt2 | PATH")
    p.add_argument("--policy", default=None, help="PATH of a policy checkpoint (with --reference; replaces --model)")
    p.add_argument("--reference", default=None, help="PATH of the reference checkpoint pi_ref (no LoRA then)")
    p.add_argument("--prompts", default=None,
                   help="FILE: .jsonl ({\"prompt\": ...} a line) or text, one prompt a line (default: 12 built-in "
                        "math word problems)")
    p.add_argument("--samples", type=int, default=MIN_CALIBRATED_SAMPLES,
                   help="main responses sampled from the policy (default %(default)s, the calibrated minimum)")
    p.add_argument("--direction-samples", type=int, default=None,
                   help="independent responses fixing the test directions (default samples/2, at least 16)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="response length cap L (default 16 on the tiny random models, 64 on real ones)")
    p.add_argument("--params", default="auto",
                   help="auto | lora | lora-last:K | last-layer | NAMES (comma-separated patterns); auto = lora on "
                        "models of up to 8 blocks, else the LoRA of the last 4 blocks")
    p.add_argument(
        "--configs",
        default=",".join(DEFAULT_CONFIGS),
        help="estimator:placement[:level[:credit]],... (default: %(default)s)",
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    p.add_argument("--dtype", choices=["float32", "float64", "bfloat16"], default="float32",
                   help="bfloat16 = autocast of the decoder trunk (head, log_softmax, KLs stay float32); float64 = "
                        "float64 weights")
    p.add_argument("--allow-tf32", action="store_true", help="allow TF32 matmuls on CUDA (off by default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="samples per micro-batch (default 8)")
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--perturb", type=float, default=None,
                   help="LoRA B ~ N(0, perturb^2) (default 0.06 on tiny random models, 0.05 on real ones)")
    p.add_argument("--target-kl", type=float, default=None,
                   help="rescale the perturbation to this sequence KL(pi||pi_ref) in nats (pilot estimate)")
    p.add_argument("--perturb-seeds", type=int, default=1,
                   help="repeat with this many perturbation seeds (seed, seed+1, ...); report the mean and spread")
    p.add_argument("--sweep-kl", default="", help="comma-separated target KLs: a sweep figure (llm_sweep.*)")
    p.add_argument("--sweep-lengths", default="", help="comma-separated --max-new-tokens values for the sweep")
    p.add_argument("--sweep-truncate", default=None, metavar="L1,L2",
                   help="KL sweep by truncation: the run's own responses cut after L' tokens (exact samples of the "
                        "policy capped at L' tokens), every point with all the run's samples, written as "
                        "llm_sweep.{png,csv,json} (default with --target-kl: L/4,L/2; 0 to switch off)")
    p.add_argument("--train-steps", type=int, default=0, help="REINFORCE steps on the LoRA after the perturbation")
    p.add_argument("--projections", type=int, default=128, help="random directions when params are many")
    p.add_argument("--max-dense", type=int, default=1024, help="project when the subset has more numbers")
    p.add_argument("--alpha", type=probability, default=DEFAULT_ALPHA,
                   help="family-wise test level over the configurations (Holm); CIs are 1 - alpha")
    p.add_argument("--bootstrap", type=int, default=2000,
                   help="paired bootstrap resamples for p-values and intervals (0: F test and t-based Fieller)")
    p.add_argument("--no-eos", action="store_true", help="fixed-length responses (ignore the EOS token)")
    p.add_argument("--generation-batch", type=int, default=None,
                   help="responses sampled at once (default: the smallest multiple of the micro-batch >= 64)")
    p.add_argument("--stacked", action=argparse.BooleanOptionalAction, default=True,
                   help="all gradient sets from one batched backward pass through the hidden states (default); "
                        "--no-stacked: one backward pass from the logits per distinct cotangent")
    g = p.add_argument_group("framework recipes and your own loss (the update rules of biaslab audit)")
    g.add_argument("--framework", default=None, help="a preset of `biaslab audit` (verl, openrlhf, trl-grpo, ...): "
                   "its recipe's per-group gradient is measured beside --configs")
    g.add_argument("--set", action="append", metavar="KEY=VALUE", help="a config key in the framework's own name")
    g.add_argument("--config", default=None, help="YAML or JSON file of the framework's config keys")
    g.add_argument("--enable-kl", action="store_true", help="switch KL on if the configuration has it off")
    g.add_argument("--loss", action="append", metavar="FILE:FUNC",
                   help="FUNC(batch) -> scalar loss of one group (biaslab.workflows.userloss contract; task rewards 0)")
    g.add_argument("--beta", type=float, default=None, help="the KL coefficient inside --loss (default 1)")
    g.add_argument("--agg", default=None, help="how --loss aggregates tokens, for its nominal scale (default "
                   "seq-mean-token-sum)")
    g.add_argument("--group-size", type=int, default=None,
                   help="responses per group B (default: the framework's; 2 for --loss); --samples must be a "
                        "multiple")
    p.add_argument("--out", default="llm_out", help="folder for llm.png/.csv/.json ('' to skip)")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on stderr (default: on when stderr is a terminal)")
    p.set_defaults(func=_run)
