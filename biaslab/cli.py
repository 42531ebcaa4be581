"""Command line: ``biaslab table | exact | figures`` (and the commands other modules register).

Each subcommand lives in a function ``add_<name>(subparsers)`` that sets ``func``; errors a user can fix
(bad input, unknown names, enumeration too large) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from . import __version__
from .estimators import EstimatorError
from .exact import EnumerationTooLarge
from .toy import ModelError

#: modules that add subcommands through ``add_commands(subparsers)``; missing ones are skipped.
PLUGINS = ("biaslab.check", "biaslab.frameworks.cli", "biaslab.llm.cli")


def _table(args: argparse.Namespace) -> int:
    from .table import exact_table, to_csv, to_json, to_markdown
    from .toy import make_pair

    policy, ref = make_pair(args.model, args.vocab, args.length, seed=args.seed, kl_scale=args.kl_scale)
    engine, results = exact_table(policy, ref, args.estimators.split(","), progress=args.progress)
    meta = {"model": args.model, "seed": args.seed, "kl_scale": args.kl_scale, "version": __version__}
    if args.format == "md":
        print(to_markdown(results, engine, title=f"Exact KL-gradient table ({args.model} toy, seed {args.seed})"))
    elif args.format == "csv":
        print(to_csv(results), end="")
    else:
        print(to_json(results, engine, meta=meta))
    return 0


def _exact(args: argparse.Namespace) -> int:
    from .io import load_logits_npz
    from .table import exact_table, to_csv, to_json, to_markdown

    policy, ref = load_logits_npz(args.logits)
    engine, results = exact_table(policy, ref, args.estimators.split(","), progress=args.progress)
    if args.format == "json":
        print(to_json(results, engine, with_grad=True, meta={"logits": str(args.logits), "version": __version__}))
    elif args.format == "csv":
        print(to_csv(results), end="")
    else:
        print(to_markdown(results, engine, title=f"Exact KL-gradient table for {args.logits}"))
    return 0


def _figures(args: argparse.Namespace) -> int:
    from .figures import make_figures

    only = args.only.split(",") if args.only else None
    written = make_figures(args.out, quick=args.quick, progress=not args.no_progress, only=only)
    if args.format == "json":
        print(json.dumps({"out": str(args.out), "quick": args.quick, "written": [str(p) for p in written]}, indent=2))
        return 0
    for path in written:
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="biaslab", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"biaslab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("table", help="exact bias/variance table on a random toy model")
    p.add_argument("--vocab", type=int, default=3, help="vocabulary size V (default 3)")
    p.add_argument("--length", type=int, default=4, help="sequence length T (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kl-scale", type=float, default=1.0, help="policy = reference + C * noise (default 1.0)")
    p.add_argument("--model", choices=["tabular", "neural"], default="tabular")
    p.add_argument("--estimators", default="k1,k2,k3,abs", help="comma-separated registered names")
    p.add_argument("--format", choices=["md", "csv", "json"], default="md")
    p.add_argument("--progress", action="store_true")
    p.set_defaults(func=_table)

    p = sub.add_parser("exact", help="exact table for your own tabular model (.npz of logits)")
    p.add_argument("--logits", required=True, help="npz with policy_0..policy_{T-1}, ref_0..ref_{T-1}")
    p.add_argument("--estimators", default="k1,k2,k3,abs")
    p.add_argument("--format", choices=["md", "csv", "json"], default="json")
    p.add_argument("--progress", action="store_true")
    p.set_defaults(func=_exact)

    p = sub.add_parser("figures", help="regenerate every figure and table")
    p.add_argument("--out", default="figures")
    p.add_argument("--quick", action="store_true", help="small sizes, for tests (under a minute)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--only", default="", help="comma-separated figure names (default: all)")
    p.add_argument("--format", choices=["text", "json"], default="text", help="list of written files")
    p.set_defaults(func=_figures)

    for name in PLUGINS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # that part of biaslab is not built yet
            raise
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (EstimatorError, ModelError, EnumerationTooLarge, ValueError, FileNotFoundError) as exc:
        print(f"biaslab {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
