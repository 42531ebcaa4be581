"""``biaslab audit``: verdicts for a framework configuration written in that framework's own keys, or for any
trainer's own loss function.

    biaslab audit --framework verl --set actor_rollout_ref.actor.use_kl_loss=true [--config FILE.yaml] [--format json]
    biaslab audit --defaults
    biaslab audit --loss my_trainer.py:loss --beta 0.05 [--group-size 2] [--rewards zero|binary] [--dtype bfloat16]

Exit status: 0 when the configuration (or loss) is unbiased on-policy (fixed-length toy), 1 otherwise (biased,
rescaled, zero, or KL disabled; with --defaults: when any default is), 2 for usage errors (unknown framework, key
or value; a loss function that cannot be loaded, raises or returns no usable loss).
"""

from __future__ import annotations

import argparse
import sys

from ..core.aggregation import AGG_MODES
from ..core.io import to_json
from ..core.recipes import RecipeError
from ..frameworks import PRESETS, get_preset
from ..frameworks.base import PresetError
from ..frameworks.config import load_config_file, parse_sets
from ..workflows.audit import (
    REWARDS,
    AuditToy,
    audit,
    audit_defaults,
    audit_loss,
)
from ..workflows.audit_report import format_defaults, format_table, format_text
from ..workflows.userloss import DTYPES, UserLossError, load_loss


def _emit(report, fmt: str, text) -> None:
    if fmt == "json":
        print(to_json(report, default=str))
    elif fmt in ("csv", "md"):
        print(format_table(report, fmt))
    else:
        print(text(report))


def _audit(args: argparse.Namespace) -> int:
    from .flags import DEFAULT_ALPHA

    toy = AuditToy(seed=args.seed)
    progress = bool(getattr(args, "progress", False))  # main resolves the default (stderr is a terminal)
    alpha = getattr(args, "alpha", DEFAULT_ALPHA)
    loss_only = [
        f"--{n.replace('_', '-')}"
        for n in ("beta", "group_size", "rewards", "agg", "compute_dtype")
        if getattr(args, n) is not None
    ]
    if args.loss:
        if args.framework or args.set or args.config or args.defaults:
            raise PresetError("--loss takes no --framework, --set, --config or --defaults")
        report = audit_loss(
            load_loss(args.loss),
            beta=1.0 if args.beta is None else args.beta,
            group_size=2 if args.group_size is None else args.group_size,
            rewards=args.rewards or "zero",
            agg=args.agg or "seq-mean-token-sum",
            toy=toy,
            dtype=args.dtype,
            name=args.loss,
            progress=progress,
            compute_dtype=args.compute_dtype,
        )
    elif loss_only:
        raise PresetError(f"{', '.join(loss_only)} go with --loss FILE:FUNC")
    elif args.defaults:
        if args.framework or args.set or args.config:
            raise PresetError("--defaults takes no --framework, --set or --config")
        if args.dtype:
            raise PresetError("--dtype goes with --framework or --loss, not --defaults")
        rows = audit_defaults(toy, progress=progress)
        _emit(rows, args.format, format_defaults)
        return 0 if all(r["verdict"] == "unbiased" for r in rows) else 1
    elif not args.framework:
        raise PresetError("give --framework NAME, --loss FILE:FUNC or --defaults")
    else:
        preset = get_preset(args.framework)
        file_settings: dict[str, object] = load_config_file(args.config) if args.config else {}
        sets = parse_sets(args.set or [])
        for k in sets:  # --set keys are strict: a typo is an error, not an ignored key
            preset.key(preset.normalize_name(k))
        report = audit(
            args.framework,
            {**file_settings, **sets},
            toy,
            enable_kl=args.enable_kl,
            search=not args.no_search,
            lenient=bool(args.config),
            progress=progress,
            dtype=args.dtype,
        )
    if alpha != DEFAULT_ALPHA:
        report["notes"].append(
            f"--alpha {alpha} is not applicable: the audit's verdicts are exact (no statistical test)"
        )
    _emit(report, args.format, format_text)
    return 0 if report["verdict"] == "unbiased" else 1


def _run(args: argparse.Namespace) -> int:
    try:
        return _audit(args)
    except (PresetError, FileNotFoundError, UserLossError, RecipeError) as exc:
        print(f"biaslab audit: error: {exc}", file=sys.stderr)
        return 2


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``biaslab audit``."""
    from .flags import add_common_flags

    p = subparsers.add_parser(
        "audit",
        help="exact KL-gradient verdict for a training framework's configuration",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--framework", help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a config key in the framework's own name")
    p.add_argument("--config", help="YAML or JSON file of config keys (nested or dotted)")
    p.add_argument("--defaults", action="store_true", help="one row per framework default")
    p.add_argument("--enable-kl", action="store_true", help="switch KL on if the configuration has it off")
    p.add_argument("--no-search", action="store_true", help="skip the nearest-unbiased search")
    add_common_flags(p, formats=("text", "json", "csv", "md"), seed=True, alpha=True)
    for action in p._actions:
        if "--alpha" in action.option_strings:
            action.help = "accepted as on the other subcommands; not applicable: the audit's verdicts are exact"
    g = p.add_argument_group("auditing your own loss function")
    g.add_argument("--loss", metavar="FILE:FUNC",
                   help="FUNC(batch) -> scalar loss of one group (biaslab.workflows.userloss)")
    g.add_argument("--beta", type=float, default=None, help="the KL coefficient inside the function (default 1)")
    g.add_argument("--group-size", type=int, default=None, help="responses per group B (default 2, at most 3)")
    g.add_argument("--rewards", choices=REWARDS, default=None, help="task rewards (default zero)")
    g.add_argument(
        "--agg",
        default=None,
        choices=list(AGG_MODES),
        help="how the function aggregates tokens, for the nominal scale (default seq-mean-token-sum)",
    )
    g.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=None,
        help="also evaluate the loss (or the preset's recipe) in this dtype: value and gradient error vs float64",
    )
    g.add_argument(
        "--compute-dtype",
        choices=["float64", "float32"],
        default=None,
        help="precision the function computes in internally (sets the verdict tolerance)",
    )
    p.set_defaults(func=_run)


__all__ = ["add_commands", "load_config_file", "parse_sets"]
