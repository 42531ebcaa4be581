"""``biaslab``: the parser of every subcommand and ``main``, which maps errors to exit statuses.

``main`` turns every error a user can fix (bad input, unknown names, enumeration too large, an unwritable ``--out``)
into one line on stderr and exit status 2, Ctrl-C into "biaslab: interrupted" and status 130, and a closed output
pipe (``biaslab table | head -1``) into a quiet exit. Estimators registered by other code become usable by name
through ``--plugin FILE_OR_MODULE`` (repeatable) or the entry-point group ``biaslab.estimators``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from .._version import __version__
from ..core.estimators import EstimatorError
from ..engines.exact import EnumerationTooLarge
from ..engines.toy import ModelError
from ..workflows.plugins import ENTRY_POINT_GROUP, PluginError, load_entry_points, load_plugin
from .flags import (
    EXIT_BROKEN_PIPE,
    EXIT_INTERRUPTED,
    HelpFormatter,
    _has_default,
    kl_scale,
    output_dir,
    positive_int,
    probability,
    vocab_size,
)

#: one module per subcommand, each with ``add_commands(subparsers)``, in the order ``--help`` lists them
SUBCOMMANDS = ("biaslab.cli.table", "biaslab.cli.figures", "biaslab.cli.check", "biaslab.cli.audit",
               "biaslab.cli.llm", "biaslab.cli.train")


def _known_plugins(argv: Sequence[str]) -> list[str]:
    """The values of ``--plugin`` given before the subcommand (``--plugin X`` or ``--plugin=X``)."""
    pre = argparse.ArgumentParser(prog="biaslab", add_help=False, allow_abbrev=False)
    pre.add_argument("--plugin", action="append", default=[])
    known, _ = pre.parse_known_args(list(argv))
    return known.plugin


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="biaslab",
        description="Exact and statistical bias/variance of the KL-divergence gradient estimators used in RL "
        "training of LLMs.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"biaslab {__version__}")
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="FILE_OR_MODULE",
        help="import this Python file or module first, so that the estimators it registers (register_estimator) "
        "can be named; repeatable. Installed packages can also declare estimators in the entry-point group "
        f"{ENTRY_POINT_GROUP}.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name in SUBCOMMANDS:
        importlib.import_module(name).add_commands(sub)
    for p in sub.choices.values():
        p.formatter_class = HelpFormatter
        for action in p._actions:
            if action.help is None and action.option_strings and _has_default(action):
                action.help = "default: %(default)s"  # argparse shows no line at all for an option without help
    return parser


#: errors a user can fix: one line, exit status 2.
USER_ERRORS = (EstimatorError, ModelError, EnumerationTooLarge, PluginError, ValueError, OSError)


def _check_values(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """The same limits on every subcommand, also for flags declared without the shared types."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    sub = subparsers[0].choices.get(args.command, parser) if subparsers else parser
    checks = (("vocab", vocab_size), ("length", positive_int), ("alpha", probability), ("kl_scale", kl_scale))
    for dest, kind in checks:
        value = getattr(args, dest, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                kind(str(value))
            except argparse.ArgumentTypeError as exc:
                sub.error(f"argument --{dest.replace('_', '-')}: {exc}")
    out = getattr(args, "out", None)
    if isinstance(out, str) and out:
        try:
            output_dir(out)
        except argparse.ArgumentTypeError as exc:
            sub.error(f"argument --out: {exc}")
    if hasattr(args, "progress") and args.progress is None:
        args.progress = sys.stderr.isatty()
    if hasattr(args, "no_progress") and not hasattr(args, "progress"):
        args.progress = not args.no_progress


def _quiet_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so that the interpreter's final flush stays silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = "biaslab"
    try:
        for spec in _known_plugins(argv):
            load_plugin(spec)
        load_entry_points()
        parser = build_parser()
        args = parser.parse_args(argv)
        command = f"biaslab {args.command}"
        _check_values(args, parser)
        if args.command in ("table", "exact", "check", "audit", "train"):  # toy problems: the thread policy
            from ..engines.threads import thread_policy, work_size

            V, T = getattr(args, "vocab", None) or 3, getattr(args, "length", None) or 3
            thread_policy(work_size(V ** min(T, 40), T, V))
        status = int(args.func(args) or 0)
        sys.stdout.flush()
        return status
    except KeyboardInterrupt:
        print("biaslab: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except USER_ERRORS as exc:
        message = str(exc) or type(exc).__name__
        if isinstance(exc, OSError) and exc.filename and exc.strerror:
            message = f"{exc.filename}: {exc.strerror}"
        print(f"{command}: error: {message}".replace("\n", " "), file=sys.stderr)
        return 2
