"""``biaslab llm``: bias and variance of KL-gradient configurations on a real causal LM.

Runs under torchrun for several processes (gloo on CPU, NCCL on GPUs); only rank 0 prints and writes.
Heavy imports (transformers) happen when the command runs, so ``biaslab --help`` stays fast without the extra.
"""

from __future__ import annotations

import argparse
import json
import sys


def _run(args: argparse.Namespace) -> int:
    from .models import LLMError
    from .run import LLMOptions, run_llm

    opts = LLMOptions(
        model=args.model,
        prompts=args.prompts,
        samples=args.samples,
        max_new_tokens=args.max_new_tokens,
        params=args.params,
        configs=tuple(c for c in args.configs.split(",") if c.strip()),
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        batch_size=args.batch_size,
        lora_rank=args.lora_rank,
        perturb=args.perturb,
        train_steps=args.train_steps,
        projections=args.projections,
        max_dense=args.max_dense,
        alpha=args.alpha,
        progress=not args.no_progress,
    )
    try:
        report = run_llm(opts)
    except LLMError as exc:
        print(f"biaslab llm: error: {exc}", file=sys.stderr)
        return 2
    finally:
        from .distributed import shutdown

        shutdown()
    if report is None:  # not rank 0
        return 0
    written = []
    if args.out:
        from .figure import write_figure

        written = [str(p) for p in write_figure(report, args.out)]
        report["written"] = written
    if args.format == "json":
        print(json.dumps(report, indent=2))
    else:
        print(to_text(report))
    return 0


def to_text(report: dict) -> str:
    """A short human-readable summary (the JSON has everything)."""
    kl = report["sequence_kl"]
    ref = report["reference"]
    lines = [
        f"model {report['model']['name']} ({report['model']['class']}), params {report['parameters']['spec']}: "
        f"{report['parameters']['count']} numbers"
        + (f" projected on {report['parameters']['projected_dim']}" if report["parameters"]["projected_dim"] else ""),
        f"sequence KL(pi||pi_ref) = {kl['mean']:.4g} +- {kl['se']:.2g} (exact per-token KLs summed), "
        f"mean response length {report['mean_response_tokens']:.3g} tokens",
        f"reference grad (rb in both, rtg): relative SE {ref['rel_se']:.3g}; cosine to forward KL "
        f"{ref['cos_forward']:.3f}",
        "",
        f"{'configuration':34s} {'rel.bias along ref [CI]':>30s} {'p':>8s} {'verdict':>8s} {'var/|r|^2':>10s} "
        f"{'cos rev':>8s} {'cos fwd':>8s} {'cos fwd tok':>11s}",
    ]
    for r in report["configs"]:
        ci = f"{r['rel_bias_along_reference']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
        lines.append(
            f"{r['label']:34s} {ci:>30s} {r['p_value']:8.2g} {'biased' if r['biased'] else 'ok':>8s} "
            f"{r['rel_variance']:10.3g} {r['cos_reverse']:8.3f} {r['cos_forward']:8.3f} {r['cos_forward_token']:11.3f}"
        )
    lines.append("")
    lines.append("values against the exact per-token KL (sum over the response):")
    for name, v in report["values"].items():
        lines.append(
            f"  {name}: mean {v['mean_sequence_value']:.4g} +- {v['se']:.2g}, bias {v['bias_vs_exact']:+.3g} "
            f"+- {v['bias_se']:.2g}, token RMSE {v['token_rmse_vs_exact']:.3g}"
        )
    for p in report.get("written", []):
        lines.append(f"wrote {p}")
    return "\n".join(lines)


def add_commands(sub: argparse._SubParsersAction) -> None:
    from .run import DEFAULT_CONFIGS

    p = sub.add_parser(
        "llm",
        help="bias/variance of KL-gradient configurations on a real Hugging Face causal LM (needs the llm extra)",
        description=__doc__.split("\n")[0],
    )
    p.add_argument("--model", default="tiny-random", help="smollm2 | tiny-random | tiny-random-gpt2 | PATH")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line (default: four built-in)")
    p.add_argument("--samples", type=int, default=64, help="responses sampled from the policy (default 64)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="response length cap L (default 16)")
    p.add_argument("--params", default="lora", help="lora | last-layer | NAMES (comma-separated patterns)")
    p.add_argument(
        "--configs",
        default=",".join(DEFAULT_CONFIGS),
        help="estimator:placement[:level[:credit]],... (default: %(default)s)",
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="bfloat16 = autocast")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="samples per micro-batch (default 8)")
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--perturb", type=float, default=None,
                   help="LoRA B ~ N(0, perturb^2) (default 0.3 on tiny random models, 0.05 on real ones)")
    p.add_argument("--train-steps", type=int, default=0, help="REINFORCE steps on the LoRA after the perturbation")
    p.add_argument("--projections", type=int, default=128, help="random directions when params are many")
    p.add_argument("--max-dense", type=int, default=1024, help="project when the subset has more numbers")
    p.add_argument("--alpha", type=float, default=0.05, help="test level; CIs are 1 - alpha (default 0.05)")
    p.add_argument("--out", default="llm_out", help="folder for llm.png/.csv/.json ('' to skip)")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)
