"""``biaslab check FILE:FUNCTION``: is your KL estimator, placed this way, unbiased (``workflows.check``)?"""

from __future__ import annotations

import argparse

from ..workflows.check import MODEL_KINDS, MODES, check_estimator
from ..workflows.check import __doc__ as CHECK_DOC
from ..workflows.plugins import load_function


def unused_flags(args: argparse.Namespace) -> list[str]:
    """Flags set away from their defaults that this mode / placement does not read (refused, not ignored):
    ``--samples`` and ``--alpha`` in exact mode, ``--credit`` for a loss (no score-function term to credit)."""
    from .flags import changed_flags

    unused = ["samples", "alpha"] if args.mode == "exact" else []
    return changed_flags(args, unused + (["credit"] if args.placement == "loss" else []))


def _run(args: argparse.Namespace) -> int:
    unused = unused_flags(args)
    if unused:
        raise ValueError(f"{', '.join(unused)} not read here: --samples and --alpha apply to --mode mc, --credit to "
                         "--placement reward or both (a loss has no score-function term to credit)")
    fn = load_function(args.function)
    same_name = ("mode", "vocab", "length", "models", "samples", "seed", "alpha", "kl_scale")
    report = check_estimator(
        fn,
        args.placement,
        args.level,
        args.credit,
        model_kind=args.model,
        name=args.function.rsplit(":", 1)[1],
        progress=bool(args.progress),
        **{k: getattr(args, k) for k in same_name},
    )
    if args.format == "json":
        from ..core.io import to_json

        print(to_json(report.as_dict()))
    elif args.format == "csv":
        print(report.to_frame().to_csv(index=False, lineterminator="\n"), end="")
    elif args.format == "md":
        from ..core.io import markdown_table

        print(markdown_table(report.to_frame()))
    else:
        print(report.format_text())
    return report.exit_code


def add_commands(sub: argparse._SubParsersAction) -> None:
    from .flags import HelpFormatter, add_common_flags, positive_int, record_defaults

    p = sub.add_parser(
        "check",
        help="is your KL estimator, placed this way, unbiased for grad KL(pi||pi_ref)? (exit 1 when not)",
        description=CHECK_DOC.split("\n\n")[0]
        + " Exit status: 0 unbiased (exact) or no bias detected (mc), 1 biased / rescaled / zero, 2 bad input or"
        " an undefined verdict (the toy's true gradient is zero).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("function", help="MODULE_OR_FILE:FUNCTION, FUNCTION(logp, logp_ref) -> per-token estimate")
    p.add_argument("--placement", choices=["reward", "loss", "both"], required=True)
    p.add_argument("--level", choices=["token", "sequence"], default="token")
    p.add_argument("--credit", choices=["full", "rtg"], default="rtg")
    p.add_argument("--mode", choices=list(MODES), default="exact")
    p.add_argument("--models", type=positive_int, default=3, help="number of random toy models")
    p.add_argument("--samples", type=positive_int, default=20_000, help="mc samples per model")
    p.add_argument("--model", choices=list(MODEL_KINDS), default="mixed")
    add_common_flags(p, formats=("text", "json", "csv", "md"), seed=True, toy=True, kl_scale=True, alpha=True)
    p.set_defaults(func=_run)
    record_defaults(p, ("samples", "alpha", "credit"))
