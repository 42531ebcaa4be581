"""The flags every subcommand spells the same way, their types and defaults, and the exit statuses.

``add_common_flags`` adds ``--format``, ``--progress``, ``--seed``, ``--vocab``/``--length``, ``--kl-scale``,
``--alpha`` and ``--out``; the argparse types (``positive_int``, ``vocab_size``, ``probability``, ``kl_scale``,
``output_dir``) refuse bad values with one line; ``record_defaults``/``changed_flags`` let a subcommand refuse the
flags its mode does not read instead of ignoring them.
"""

from __future__ import annotations

import argparse
import math
from argparse import SUPPRESS
from collections.abc import Callable, Sequence
from pathlib import Path

#: defaults shared by every subcommand that takes these flags.
DEFAULT_KL_SCALE = 1.0
DEFAULT_ALPHA = 0.01
DEFAULT_VOCAB = 3
DEFAULT_LENGTH = 4

#: the exit status of a run stopped by Ctrl-C (128 + SIGINT), and of one whose output pipe closed (128 + SIGPIPE).
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


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
    from ..core.io import check_output_dir

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
