"""Command line: biaslab table | exact | figures (and the commands other modules register).

Each subcommand lives in a function ``add_<name>(subparsers)`` that sets ``func``. Shared flag types and flags for
every subcommand live here (``positive_int``, ``vocab_size``, ``probability``, ``kl_scale``, ``output_dir``,
``add_common_flags``). ``main`` turns every error a user can fix (bad input, unknown names, enumeration too large,
an unwritable ``--out``) into one line on stderr and exit status 2, Ctrl-C into "biaslab: interrupted" and status
130, and a closed output pipe (``biaslab table | head -1``) into a quiet exit.

Estimators registered by other code become usable by name through ``--plugin FILE_OR_MODULE`` (repeatable) or
through the entry-point group ``biaslab.estimators`` of any installed package.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import sys
from argparse import SUPPRESS
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

from . import __version__
from .estimators import Estimator, EstimatorError, get_estimator, register_estimator, registered_estimators
from .exact import EnumerationTooLarge
from .toy import ModelError

#: modules that add subcommands through ``add_commands(subparsers)``; missing ones are skipped.
PLUGINS = ("biaslab.check", "biaslab.frameworks.cli", "biaslab.llm.cli", "biaslab.train_cli")

#: entry-point group whose members register estimators (a function, an ``Estimator`` or a module).
ENTRY_POINT_GROUP = "biaslab.estimators"

#: defaults shared by every subcommand that takes these flags.
DEFAULT_KL_SCALE = 1.0
DEFAULT_ALPHA = 0.01
DEFAULT_VOCAB = 3
DEFAULT_LENGTH = 4

#: the exit status of a run stopped by Ctrl-C (128 + SIGINT), and of one whose output pipe closed (128 + SIGPIPE).
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

__all__ = [
    "DEFAULT_ALPHA", "DEFAULT_KL_SCALE", "HelpFormatter", "PluginError", "add_common_flags", "build_parser",
    "changed_flags", "kl_scale", "load_entry_points", "import_source", "load_plugin", "main", "nonnegative_int",
    "output_dir", "positive_int", "probability", "record_defaults", "vocab_size",
]


class PluginError(ValueError):
    """A ``--plugin`` file or a ``biaslab.estimators`` entry point could not be loaded."""


# ---------------------------------------------------------------------------------------------- flag types


def _number(text: str, kind: type, ok: Callable[[float], bool], requirement: str) -> float | int:
    """``text`` as a ``kind``; an argparse error "<requirement>, got <text>" unless ``ok(value)``."""
    try:
        value = kind(text)
    except (TypeError, ValueError):
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{requirement}, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _number(text, int, lambda v: v >= 1, "must be a positive integer")


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _number(text, int, lambda v: v >= 0, "must be an integer >= 0")


def vocab_size(text: str) -> int:
    """argparse type: a vocabulary size V >= 2 (with one token every distribution is the same)."""
    return _number(text, int, lambda v: v >= 2, "a vocabulary needs at least 2 tokens")


def probability(text: str) -> float:
    """argparse type: a level or probability strictly between 0 and 1 (e.g. ``--alpha``)."""
    return _number(text, float, lambda v: 0 < v < 1, "must lie strictly between 0 and 1")


def kl_scale(text: str) -> float:
    """argparse type: a finite scale >= 0 (``--kl-scale``: policy = reference + C * noise)."""
    return _number(text, float, lambda v: math.isfinite(v) and v >= 0, "must be a finite number >= 0")


def record_defaults(p: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    """Remember the defaults of the flags ``names`` (dest names), for ``changed_flags``."""
    p.set_defaults(flag_defaults={k: p.get_default(k) for k in names})


def changed_flags(args: argparse.Namespace, names) -> list[str]:
    """'--flag' for each of ``names`` set away from its default: a subcommand refuses those its mode does not read
    rather than silently ignoring them."""
    return ["--" + k.replace("_", "-") for k in names if getattr(args, k) != args.flag_defaults[k]]


def output_dir(text: str) -> Path | None:
    """argparse type: a folder output can be written to (checked now, before any computing); '' means none."""
    from .io import check_output_dir

    if text == "":
        return None
    try:
        return check_output_dir(text)
    except OSError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--out {text}: ")) from None


_kl_scale_type = kl_scale  # add_common_flags has a parameter of the same name


def _has_default(action: argparse.Action) -> bool:
    return not any(action.default is v for v in (None, SUPPRESS, False, True)) and action.default != []


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default (unless its help already names one) and strips reST backticks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower() or not _has_default(action):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)" if text else "default: %(default)s"
        return text

    def _format_text(self, text: str) -> str:
        return super()._format_text(text.replace("`", ""))

    def _expand_help(self, action: argparse.Action) -> str:
        return super()._expand_help(action).replace("`", "")


def add_common_flags(
    parser: argparse.ArgumentParser,
    *,
    formats: Sequence[str] | None = ("text", "json"),
    progress: bool = True,
    seed: bool = False,
    toy: bool = False,
    kl_scale: bool = False,
    alpha: bool = False,
    out: str | None = None,
) -> None:
    """Add the flags every subcommand spells the same way.

    formats: choices of ``--format`` (the first is the default); None for no ``--format``.
    progress: ``--progress/--no-progress`` (default: on when stderr is a terminal; ``main`` resolves it).
    seed: ``--seed`` (default 0). toy: ``--vocab`` (>= 2, default 3) and ``--length`` (>= 1, default 4).
    kl_scale: ``--kl-scale`` (default ``DEFAULT_KL_SCALE``). alpha: ``--alpha`` in (0, 1) (default
    ``DEFAULT_ALPHA``). out: ``--out FOLDER`` with this default, checked writable at parse time ('' = none).
    """
    if formats:
        parser.add_argument("--format", choices=list(formats), default=formats[0], help="output format")
    if progress:
        parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                            help="progress bars on stderr (default: on when stderr is a terminal)")
    if seed:
        parser.add_argument("--seed", type=int, default=0, help="random seed")
    if toy:
        parser.add_argument("--vocab", type=vocab_size, default=DEFAULT_VOCAB, help="vocabulary size V (>= 2)")
        parser.add_argument("--length", type=positive_int, default=DEFAULT_LENGTH, help="sequence length T (>= 1)")
    if kl_scale:
        parser.add_argument("--kl-scale", type=_kl_scale_type, default=DEFAULT_KL_SCALE,
                            help="policy = reference + C * noise")
    if alpha:
        parser.add_argument("--alpha", type=probability, default=DEFAULT_ALPHA,
                            help="family-wise false-alarm rate, in (0, 1)")
    if out is not None:
        parser.add_argument("--out", type=output_dir, default=out, help="output folder ('' for none)")


# ---------------------------------------------------------------------------------------------- plugins


def import_source(where: str, error: type[Exception] = PluginError, prefix: str = "") -> ModuleType:
    """Import ``where``: a Python file (a name ending in .py, or an existing path) or a module name, looked up in the
    current folder too (``check mine:k3`` finds mine.py). Failures raise ``error("<prefix>where: reason")``."""
    path = Path(where)
    if where.endswith(".py") or path.exists():
        if not path.is_file():
            raise error(f"{prefix}{where}: no such file")
        name = f"_biaslab_source_{abs(hash(str(path.resolve())))}"
        mod_spec = importlib.util.spec_from_file_location(name, path)
        if mod_spec is None or mod_spec.loader is None:
            raise error(f"{prefix}{where}: not a Python file")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module
        try:
            mod_spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise error(f"{prefix}{where}: importing it raised {type(exc).__name__}: {exc}") from exc
        return module
    sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(where)
    except Exception as exc:
        raise error(f"{prefix}{where}: cannot import it ({type(exc).__name__}: {exc})") from exc
    finally:
        sys.path.remove(os.getcwd())


def load_plugin(spec: str) -> None:
    """Import ``spec`` (a .py file or a module name) so that its ``register_estimator`` calls take effect."""
    import_source(spec, PluginError, "--plugin ")


def load_entry_points() -> list[str]:
    """Register the estimators that installed packages declare in the entry-point group ``ENTRY_POINT_GROUP``.

    An entry point ``name = package.module:obj`` registers ``obj`` (a function or an ``Estimator``) under ``name``;
    one naming a module (``name = package.module``) is imported for its own ``register_estimator`` calls. Returns
    the names loaded. One that fails to load, or would replace an estimator of another name's owner, is skipped
    with a one-line warning on stderr.
    """
    from importlib.metadata import entry_points

    loaded = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if isinstance(obj, Estimator) or (callable(obj) and not isinstance(obj, type)):
                existing = registered_estimators().get(ep.name)
                if existing is None:
                    register_estimator(ep.name, obj)
                elif existing.fn is not getattr(obj, "fn", obj):
                    owner = getattr(existing.fn, "__module__", None) or "another module"
                    raise PluginError(f"the name {ep.name!r} is already registered by {owner}")
        except Exception as exc:
            error = PluginError(f"entry point {ep.name!r} ({ep.value}) of group {ENTRY_POINT_GROUP}: {exc}")
            print(f"biaslab: warning: skipped {error}", file=sys.stderr)
            continue
        loaded.append(ep.name)
    return loaded


def _known_plugins(argv: Sequence[str]) -> list[str]:
    """The values of ``--plugin`` given before the subcommand (``--plugin X`` or ``--plugin=X``)."""
    pre = argparse.ArgumentParser(prog="biaslab", add_help=False, allow_abbrev=False)
    pre.add_argument("--plugin", action="append", default=[])
    known, _ = pre.parse_known_args(list(argv))
    return known.plugin


# ---------------------------------------------------------------------------------------------- subcommands


def _estimator_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise EstimatorError("--estimators: give at least one name")
    for name in names:
        get_estimator(name)  # an unknown name fails now, with the registered ones listed
    return names


def _table(args: argparse.Namespace) -> int:
    """``table`` (a random toy) and ``exact`` (``--logits``): the exact table as markdown, CSV or JSON."""
    from .table import exact_table, to_csv, to_json, to_markdown

    names = _estimator_names(args.estimators)
    if args.command == "exact":
        from .io import load_logits_npz

        policy, ref = load_logits_npz(args.logits)
        title, meta = f"Exact KL-gradient table for {args.logits}", {"logits": str(args.logits)}
    else:
        from .toy import make_pair

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


def _figures(args: argparse.Namespace) -> int:
    from .figures import make_figures
    from .io import to_json

    only = [n.strip() for n in args.only.split(",") if n.strip()] or None
    written = make_figures(args.out, quick=args.quick, progress=args.progress, only=only)
    if args.format == "json":
        print(to_json({"out": str(args.out), "quick": args.quick, "written": [str(p) for p in written]}))
    else:
        for path in written:
            print(path)
    return 0


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

    for name in PLUGINS:
        importlib.import_module(name).add_commands(sub)
    for p in sub.choices.values():
        p.formatter_class = HelpFormatter
        for action in p._actions:
            if action.help is None and action.option_strings and _has_default(action):
                action.help = "default: %(default)s"  # argparse shows no line at all for an option without help
    return parser


# ---------------------------------------------------------------------------------------------- main

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
            from .threads import thread_policy, work_size

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


if __name__ == "__main__":
    sys.exit(main())
