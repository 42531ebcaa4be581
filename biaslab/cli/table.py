"""``biaslab table`` (a random toy) and ``biaslab exact`` (your own ``--logits`` model): the exact table."""

from __future__ import annotations

import argparse

from .._version import __version__
from ..core.estimators import EstimatorError, get_estimator
from .flags import add_common_flags


def _estimator_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise EstimatorError("--estimators: give at least one name")
    for name in names:
        get_estimator(name)  # an unknown name fails now, with the registered ones listed
    return names


def _table(args: argparse.Namespace) -> int:
    """``table`` (a random toy) and ``exact`` (``--logits``): the exact table as markdown, CSV or JSON."""
    from ..workflows.table import exact_table, to_csv, to_json, to_markdown

    names = _estimator_names(args.estimators)
    if args.command == "exact":
        from ..engines.logits import load_logits_npz

        policy, ref = load_logits_npz(args.logits)
        title, meta = f"Exact KL-gradient table for {args.logits}", {"logits": str(args.logits)}
    else:
        from ..engines.toy import make_pair

        policy, ref = make_pair(args.model, args.vocab, args.length, seed=args.seed, kl_scale=args.kl_scale)
        title = f"Exact KL-gradient table ({args.model} toy, seed {args.seed})"
        meta = {"model": args.model, "seed": args.seed, "kl_scale": args.kl_scale}
    engine, results = exact_table(policy, ref, names, progress=args.progress)
    if args.format == "json":
        print(to_json(results, engine, with_grad=args.command == "exact", meta={**meta, "version": __version__}))
    elif args.format == "csv":
        print(to_csv(results), end="")
    else:
        print(to_markdown(results, engine, title=title))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "table", help="exact bias/variance table on a random toy model", description="Exact bias/variance table of "
        "every estimator x placement x level x credit configuration on a random toy model (enumeration)."
    )
    add_common_flags(p, formats=("md", "text", "csv", "json"), seed=True, toy=True, kl_scale=True)
    p.add_argument("--model", choices=["tabular", "neural"], default="tabular", help="toy model family")
    p.add_argument("--estimators", default="k1,k2,k3,abs", help="comma-separated registered names")
    p.set_defaults(func=_table)

    p = sub.add_parser(
        "exact",
        help="exact table for your own tabular model (.npz of logits)",
        description="Exact bias/variance table for your own tabular model. text and md print the markdown table.",
    )
    p.add_argument("--logits", required=True, help="npz with policy_0..policy_{T-1}, ref_0..ref_{T-1}")
    p.add_argument("--estimators", default="k1,k2,k3,abs", help="comma-separated registered names")
    add_common_flags(p, formats=("json", "text", "md", "csv"))
    p.set_defaults(func=_table)
