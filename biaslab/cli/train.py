"""``biaslab train``: where KL-regularised training ends up, exactly (expected-update flow) or by Monte Carlo.

Registered through ``biaslab.cli.PLUGINS``. The objective is E[R] - beta * KL(pi || pi_ref) (reverse KL); each
configuration's update uses its own KL gradient estimate, and the report names the closed-form end point it reaches.
"""

from __future__ import annotations

import argparse
import math
import sys

from .._version import __version__


def _betas(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--beta expects comma-separated numbers, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("--beta needs at least one value")
    return out


DEFAULT_CONFIGS = "k1:reward,k3:both,k3:loss,k3:loss:sequence,k2:loss,k1:loss,k3:reward,none"


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``train`` to the ``biaslab`` subcommands (the shared flags from ``biaslab.cli.add_common_flags``)."""
    from .flags import add_common_flags, nonnegative_int, positive_int, record_defaults

    p = sub.add_parser(
        "train",
        help="where training ends up: exact training dynamics (and Monte Carlo) on toys",
        description="Train each KL configuration on an enumerable toy and report the end point it reaches.",
    )
    add_common_flags(p, formats=("text", "json"), progress=False, seed=True, toy=True, kl_scale=True, out="")
    p.add_argument("--model", choices=["tabular", "neural"], default="tabular")
    p.add_argument("--logits", help="npz in the `exact --logits` layout: policy_t is the start, ref_t the reference")
    p.add_argument("--reward", default="binary:10", help="binary:K | uniform | zero | FILE.npy (V**T, base V)")
    p.add_argument("--beta", type=_betas, default="0.3", help="comma-separated KL coefficients")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="ESTIMATOR:PLACEMENT[:LEVEL],... or none")
    p.add_argument("--mode", choices=["exact", "mc"], default="exact")
    p.add_argument("--steps", type=positive_int, help="exact: 50000 (stops earlier when converged); mc: 500")
    p.add_argument("--tol", type=_positive_float, default=1e-12,
                   help="exact: stop when the update is below this (relative)")
    p.add_argument("--no-precondition", action="store_true", help="exact tabular: plain gradient ascent")
    p.add_argument("--lr", type=_positive_float, default=None, help="step size (exact: min(1, 1/beta); mc: 0.1)")
    p.add_argument("--samples", type=positive_int, default=8, help="mc: samples per step and seed")
    p.add_argument("--seeds", type=positive_int, default=16, help="mc: independent runs (vectorized)")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="adam")
    p.add_argument("--baseline", choices=["none", "mean", "rloo", "grpo"], default="rloo")
    p.add_argument("--lag", type=nonnegative_int, default=0, help="mc: sample from the policy this many steps ago")
    p.add_argument("--clip", type=float, default=None, help="mc: PPO clip epsilon on the importance ratio, in [0, 1)")
    p.add_argument("--collapse-reward", type=float, default=0.01, help="mc: collapse when E[R] falls below this")
    p.add_argument("--no-trajectory", action="store_true", help="json: leave out the recorded trajectories")
    p.set_defaults(func=run_train)
    record_defaults(p, MC_ONLY + EXACT_ONLY)


#: flags only one mode (or model) reads: set away from their defaults where they are not read, they are refused
MC_ONLY = ("samples", "seeds", "optimizer", "baseline", "lag", "clip", "collapse_reward")
EXACT_ONLY = ("tol", "no_precondition")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def unused_flags(args: argparse.Namespace) -> list[str]:
    """The flags set away from their defaults that this mode / model does not read."""
    from .flags import changed_flags

    tabular = args.logits is not None or args.model == "tabular"
    return changed_flags(args, EXACT_ONLY if args.mode == "mc" else MC_ONLY + (() if tabular else ("no_precondition",)))


def run_train(args: argparse.Namespace) -> int:
    import torch

    from ..engines.logits import load_logits_npz
    from ..engines.toy import make_pair
    from ..workflows.fixedpoints import sequence_probs
    from ..workflows.train import TrainSetup, cond_tables, parse_configs, parse_reward, train

    torch.set_num_threads(1)
    configs = parse_configs(args.configs)
    if args.logits:
        policy, ref = load_logits_npz(args.logits)
    else:
        policy, ref = make_pair(args.model, args.vocab, args.length, seed=args.seed, kl_scale=args.kl_scale)
    V, T = policy.vocab_size, policy.length
    reward = parse_reward(args.reward, V, T, seed=args.seed)
    mc_flags = ("samples", "seeds", "optimizer", "baseline", "lag", "clip", "seed", "collapse_reward")
    unused = unused_flags(args)
    if unused:
        if args.mode == "mc":
            why = "--mode mc (they steer the exact flow)"
        elif unused == ["--no-precondition"]:
            why = "the neural model (it applies to tabular models)"
        else:
            why = "--mode exact (Monte Carlo flags apply to --mode mc)"
        raise ValueError(f"{', '.join(unused)} not read with {why}: leave them out or change the mode")
    mc = {k: getattr(args, k) for k in mc_flags} if args.mode == "mc" else {}
    result = train(TrainSetup(policy, ref, reward), configs, args.beta, mode=args.mode, steps=args.steps,
                   tol=args.tol, precondition=not args.no_precondition, lr=args.lr, **mc)
    meta = {
        "model": "logits" if args.logits else args.model,
        "logits": args.logits,
        "vocab": V,
        "length": T,
        "seed": args.seed,
        "kl_scale": None if args.logits else args.kl_scale,
        "reward": args.reward,
        "mode": args.mode,
        "version": __version__,
        **({"mc": mc} if mc else {}),
    }
    if args.out is not None:
        from ..figures.train import write_train_artifacts

        for path in write_train_artifacts(result, meta, args.out):
            print(path, file=sys.stderr)
    if args.format == "json":
        from ..core.io import to_json

        print(to_json({**result.as_dict(with_trajectory=not args.no_trajectory), "meta": meta}))
        return 0
    print(
        f"biaslab train: {meta['model']} toy V={V} T={T} seed {args.seed}, reward {args.reward} "
        f"(E_ref[R] = {float(sequence_probs(cond_tables(ref)) @ reward):.4g}), mode {args.mode}"
    )
    for beta in args.beta:
        print(f"\nbeta {beta}: closed-form end points")
        print(f"  {'target':32s} {'reward':>8s} {'rev KL':>8s} {'fwd KL':>8s} {'entropy':>8s}")
        for name, t in result.targets[str(beta)].items():
            print(f"  {name:32s} {t['reward']:8.4f} {t['reverse_kl']:8.4f} {t['forward_kl']:8.4f} {t['entropy']:8.4f}")
        head = f"  {'configuration':32s} {'reward':>8s} {'rev KL':>8s} {'fwd KL':>8s} {'entropy':>8s} {'steps':>6s}"
        print(head + "  verdict")
        for run in result.runs:
            if run.beta != beta:
                continue
            f = run.final
            print(
                f"  {run.config:32s} {f['reward']:8.4f} {f['reverse_kl']:8.4f} {f['forward_kl']:8.4f} "
                f"{f['entropy']:8.4f} {run.steps:6d}  {run.verdict}"
            )
    return 0
