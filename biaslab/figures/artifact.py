"""One figure's files: ``<stem>.png|.md``, ``<stem>.csv`` and ``<stem>.json`` (configuration, seeds, version),
kept in memory and replaced together (atomic renames), plus the two helpers every figure family shares: the CSV read
back as written (plots are drawn from the rounded numbers) and a new constrained-layout matplotlib figure."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .._version import __version__
from ..core.io import atomic_write_many, csv_text, to_json
from .plotting import png_bytes


@dataclass
class Artifact:
    """The files of one figure, ``<stem>.png|.md``, ``<stem>.csv`` and ``<stem>.json`` in ``out``, replaced together.

    ``add_*`` keep each file's bytes in memory; ``commit`` writes them all to temporary names in ``out`` and then
    renames them (``biaslab.core.io.atomic_write_many``), so an interrupted run leaves every figure's files from one
    run.
    """

    out: Path
    stem: str
    files: dict[Path, bytes] = field(default_factory=dict)

    def add(self, suffix: str, data: bytes | str) -> Path:
        path = self.out / f"{self.stem}{suffix}"
        self.files[path] = data.encode() if isinstance(data, str) else data
        return path

    def add_csv(self, rows: list[dict], fields: list[str]) -> list[dict]:
        """Add the CSV (from a DataFrame) and return its rows parsed back, numbers rounded as written."""
        text = csv_text(rows, fields)
        self.add(".csv", text)
        return read_csv(text)

    def add_png(self, fig) -> Path:
        return self.add(".png", png_bytes(fig))

    def add_meta(self, config: dict, seed: object = None) -> Path:
        """The JSON record: figure name, biaslab version, seed(s) and the configuration (strict JSON)."""
        meta = {"figure": self.stem, "biaslab_version": __version__, "seed": seed, **config}
        return self.add(".json", to_json(meta) + "\n")

    def commit(self) -> list[Path]:
        return atomic_write_many(self.files)


def read_csv(text: str) -> list[dict]:
    """Rows of a CSV text with numeric cells as floats: plots are drawn from exactly what the CSV says."""
    import csv
    import io

    def conv(v: str) -> object:
        try:
            return float(v)
        except ValueError:
            return v

    return [{k: conv(v) for k, v in r.items()} for r in csv.DictReader(io.StringIO(text))]


def new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")
