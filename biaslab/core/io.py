"""Atomic output files, valid JSON and deterministic CSV.

* ``jsonable(obj)`` / ``to_json(obj)``: strict JSON (non-finite floats become ``null``; numpy and torch values,
  paths, enums and dataclasses become plain JSON types). Strings are never rewritten.
* ``atomic_write_*``: a file is replaced whole or not at all; ``atomic_write_many`` replaces a set of files together
  (each written to a temporary name in its folder first; Ctrl-C is held back while they are renamed).
* ``csv_text``: CSV from a pandas DataFrame with floats printed to fixed rounding, so regenerated
  files are byte-identical.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

# ---------------------------------------------------------------------------------------------- JSON


def jsonable(obj: object, default: Callable[[object], object] | None = None) -> object:
    """``obj`` as plain JSON types: float NaN/inf become None (recursively, also inside numpy/torch arrays), numpy
    and torch scalars and arrays become numbers and lists, paths become strings, enums their values, dataclasses
    dicts, tuples and sets lists. Strings pass through unchanged. Anything else is ``default(obj)`` (e.g. ``str``)
    or a TypeError."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k) if not isinstance(k, str) else k: jsonable(v, default) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [jsonable(v, default) for v in items]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, enum.Enum):
        return jsonable(obj.value, default)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}, default)
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy arrays and scalars, torch tensors
        return jsonable(obj.tolist(), default)
    if hasattr(obj, "item") and callable(obj.item):
        return jsonable(obj.item(), default)
    if default is not None:
        return default(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON: {obj!r}")


def to_json(obj: object, default: Callable[[object], object] | None = None) -> str:
    """Strict JSON text of ``obj`` (see ``jsonable``): never a bare NaN or Infinity, user strings untouched."""
    return json.dumps(jsonable(obj, default), indent=2, allow_nan=False)


# ---------------------------------------------------------------------------------------------- files


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask  # mkstemp creates 0600; give the file the mode a plain open() would


def _write_temp(path: Path, data: bytes) -> str:
    """Write ``data`` to a new temporary file next to ``path``; return its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, _file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return tmp


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) inside the block and raise KeyboardInterrupt after it (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[object] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    except ValueError:  # signals unavailable here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


def atomic_write_many(files: Mapping[str | os.PathLike, bytes]) -> list[Path]:
    """Replace every file of ``files`` (path -> bytes) as one set: all are written to temporary names in their
    folders first, then renamed with Ctrl-C held back. A failure before the renames leaves every earlier file
    untouched and no temporary file behind."""
    temps: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            temps.append((_write_temp(Path(path), data), Path(path)))
        with interrupts_deferred():
            for tmp, path in temps:
                os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    return [path for _, path in temps]


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same folder and an atomic rename.

    A failure leaves any earlier file at ``path`` untouched.
    """
    return atomic_write_many({path: text.encode()})[0]


def atomic_write_figure(out: str | os.PathLike, stem: str, png: bytes, csv: str, meta: object) -> list[Path]:
    """``<out>/<stem>.png``, ``.csv`` and ``.json`` (strict JSON of ``meta``) replaced as one set."""
    out = Path(out)
    return atomic_write_many({out / f"{stem}.png": png, out / f"{stem}.csv": csv.encode(),
                              out / f"{stem}.json": (to_json(meta) + "\n").encode()})


def check_output_dir(path: str | os.PathLike) -> Path:
    """``path`` as a folder that output can be written to, checked before any work is done.

    Raises ``OSError`` with a one-line reason when ``path`` is a file, lies under a file, or its folder (or the
    nearest existing parent, where it would be created) is not writable. Nothing is created.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--out {path}: is a file, not a folder")
    probe = path
    while not probe.exists() and probe.parent != probe:  # the nearest existing parent
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"--out {path}: {probe} is a file, not a folder")
    where = "" if probe == path else f" (it would be created in {probe})"
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {path}: folder is not writable{where}")
    try:  # os.access can say yes on read-only file systems and to root: try it
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".biaslab-probe.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise PermissionError(f"--out {path}: cannot write there{where}: {exc.strerror or exc}") from None
    return path


# ---------------------------------------------------------------------------------------------- CSV


def csv_text(rows: Iterable[Mapping[str, object]], fields: list[str]) -> str:
    """CSV text (header + one line per row, "\\n" line ends) of ``rows`` restricted to ``fields``, written by
    ``DataFrame.to_csv`` with cells formatted by ``_fmt``."""
    import pandas as pd

    frame = pd.DataFrame([{k: _fmt(r.get(k)) for k in fields} for r in rows], columns=fields, dtype=object)
    return frame.to_csv(index=False, lineterminator="\n")


class Rows(list):
    """A list of row dicts (a sweep, a grid of results) with ``to_frame()``: a pandas DataFrame, one row each."""

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(list(self))


def markdown_table(frame) -> str:
    """A pandas DataFrame as a markdown table (no extra dependency), cells formatted as in the CSVs."""
    cols = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join("" if v is None else str(_fmt(v)) for v in row) + " |")
    return "\n".join(lines)


def _fmt(v: object) -> object:
    """Floats to 10 significant digits after rounding to 12 decimals, so round-off (~1e-16) prints as 0 and
    regenerated files are byte-identical across runs."""
    if isinstance(v, float):
        return f"{round(v, 12) + 0.0:.10g}" if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)):
        return ";".join(str(x) for x in v)
    return v
