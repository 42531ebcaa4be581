"""Compare what two CPUs (or kernel dispatches, or thread counts) computed: fingerprints and figure CSVs.

Verdicts, directions, labels, counts and every other string or integer must be equal. Floats follow the tolerance
of their kind (stated here, and in the README's "Same answers on any machine"):

* exact numbers: E[g] to ``EXACT_RTOL`` x the update's size sqrt(E||g||^2) (a zero-verdict E[g] is itself
  round-off, so its own norm is no scale), variances to ``EXACT_RTOL`` x size^2, relative quantities (relative bias,
  scale, cosines) to ``EXACT_RTOL`` absolute;
* seeded Monte Carlo statistics (p-values, interval ends): ``MC_ATOL`` absolute;
* figure CSV cells: ``CSV_RTOL`` relative plus the CSV's rounding quantum (12 decimals), except the Monte Carlo
  training figures, whose trajectories amplify round-off over hundreds of noisy steps (``CSV_RTOL_MC_TRAIN``).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

EXACT_RTOL = 1e-9
MC_ATOL = 1e-6
CSV_RTOL = 1e-8
CSV_QUANTUM = 2e-12
CSV_RTOL_MC_TRAIN = 1e-3
MC_TRAIN_FIGURES = ("train_collapse_beta.csv", "train_lag_grid.csv")
MC_KEYS = ("p_value", "ci_low", "ci_high")


def _close(a: float | None, b: float | None, atol: float) -> bool:
    if a is None or b is None:  # strict JSON writes non-finite values as null
        return a is b
    return abs(a - b) <= atol


def _vector_diff(a: list[float], b: list[float]) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b))) if len(a) == len(b) else math.inf


def compare_row(a: dict, b: dict, where: str, mc: bool = False) -> list[str]:
    """Differences between two result rows (dicts of strings, ints and floats, maybe nested)."""
    out = []
    if set(a) != set(b):
        return [f"{where}: fields differ: {sorted(set(a) ^ set(b))}"]
    size = max(a.get("size") or 0.0, b.get("size") or 0.0)
    for k in a:
        x, y = a[k], b[k]
        here = f"{where}.{k}"
        if isinstance(x, dict) and isinstance(y, dict):
            out += compare_row(x, y, here, mc)
        elif isinstance(x, list) and x and isinstance(x[0], dict):
            if len(x) != len(y):
                out.append(f"{here}: {len(x)} rows against {len(y)}")
            else:
                for i, (u, v) in enumerate(zip(x, y)):
                    out += compare_row(u, v, f"{here}[{i}]", mc)
        elif k == "expected_grad":
            d = _vector_diff(x, y)
            if not d <= EXACT_RTOL * size:
                out.append(f"{here}: differs by {d:.3g} (tolerance {EXACT_RTOL * size:.3g})")
        elif k == "variance" or k == "size":
            scale = size**2 if k == "variance" and size else max(abs(x or 0), abs(y or 0))
            if not _close(x, y, EXACT_RTOL * scale):
                out.append(f"{here}: {x!r} against {y!r}")
        elif isinstance(x, float) or isinstance(y, float):
            tol = MC_ATOL if mc and k in MC_KEYS else EXACT_RTOL
            if not _close(x, y, tol):
                out.append(f"{here}: {x!r} against {y!r} (tolerance {tol:g})")
        elif x != y:
            out.append(f"{here}: {x!r} against {y!r}")
    return out


def compare_fingerprints(a: dict, b: dict) -> list[str]:
    out = []
    for name, rows in a["exact"].items():
        if name not in b["exact"] or len(rows) != len(b["exact"][name]):
            out.append(f"exact.{name}: missing or of another length")
            continue
        for i, (u, v) in enumerate(zip(rows, b["exact"][name])):
            out += compare_row(u, v, f"exact.{name}[{i}] {u.get('label')}")
    if len(a["audit"]) != len(b["audit"]):
        out.append("audit: another number of rows")
    for i, (u, v) in enumerate(zip(a["audit"], b["audit"])):
        out += compare_row(u, v, f"audit[{i}] {u.get('framework')} / {u.get('scenario')}")
    for name, rep in a["mc"].items():
        out += compare_row(rep, b["mc"].get(name, {}), f"mc.{name}", mc=True)
    return out


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def compare_csv(a: Path, b: Path) -> list[str]:
    """Cell by cell: strings and integers equal, floats within the file's tolerance (module docstring)."""
    rtol = CSV_RTOL_MC_TRAIN if a.name in MC_TRAIN_FIGURES else CSV_RTOL
    ra, rb = (list(csv.reader(p.open())) for p in (a, b))
    if len(ra) != len(rb) or (ra and ra[0] != rb[0]):
        return [f"{a.name}: another header or number of rows"]
    out = []
    for i, (u, v) in enumerate(zip(ra[1:], rb[1:]), start=2):
        for col, x, y in zip(ra[0], u, v):
            if x == y:
                continue
            fx, fy = _number(x), _number(y)  # counts differ by >= 1, more than any tolerance here allows
            if fx is None or fy is None:
                out.append(f"{a.name}:{i} {col}: {x!r} against {y!r}")
            elif not (math.isnan(fx) and math.isnan(fy)) and abs(fx - fy) > rtol * max(abs(fx), abs(fy)) + CSV_QUANTUM:
                out.append(f"{a.name}:{i} {col}: {x} against {y} (tolerance {rtol:g} relative)")
    return out


def compare_figures(ours: Path, committed: Path) -> list[str]:
    out = []
    for f in sorted(committed.glob("*.csv")):
        mine = ours / f.name
        out += compare_csv(f, mine) if mine.exists() else [f"{f.name}: not written"]
    for f in sorted(committed.glob("*.md")):  # the verdict tables: strings, compared whole
        mine = ours / f.name
        if not mine.exists() or mine.read_text() != f.read_text():
            out.append(f"{f.name}: differs")
    return out
