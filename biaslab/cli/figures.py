"""``biaslab figures``: regenerate every figure and table (``biaslab.figures``)."""

from __future__ import annotations

import argparse

from .flags import add_common_flags


def _figures(args: argparse.Namespace) -> int:
    from ..core.io import to_json
    from ..figures import make_figures

    only = [n.strip() for n in args.only.split(",") if n.strip()] or None
    written = make_figures(args.out, quick=args.quick, progress=args.progress, only=only)
    if args.format == "json":
        print(to_json({"out": str(args.out), "quick": args.quick, "written": [str(p) for p in written]}))
    else:
        for path in written:
            print(path)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "figures",
        help="regenerate every figure and table",
        description="Regenerate every figure: per figure a PNG (or markdown), its CSV and a JSON of its "
        "configuration, written together.",
    )
    add_common_flags(p, formats=("text", "json"), out="figures")
    p.add_argument("--quick", action="store_true", help="small sizes, for tests (under a minute)")
    p.add_argument("--only", default="", help="comma-separated figure names (default: all)")
    p.set_defaults(func=_figures)
