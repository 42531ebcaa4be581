"""Atomic output files and the ``--logits`` .npz contract for user-supplied tabular models."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from .toy import ModelError, TabularAR


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and an atomic rename.

    A failure leaves any earlier file at ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the mode a plain open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: object) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def csv_text(rows: Iterable[Mapping[str, object]], fields: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(r.get(k)) for k in fields})
    return buf.getvalue()


def _fmt(v: object) -> object:
    """Floats to 10 significant digits after rounding to 12 decimals, so round-off (~1e-16) prints as 0 and
    regenerated files are byte-identical across runs."""
    if isinstance(v, float):
        return f"{round(v, 12) + 0.0:.10g}"
    if isinstance(v, list):
        return ";".join(str(x) for x in v)
    return v


def load_logits_npz(path: str | os.PathLike) -> tuple[TabularAR, TabularAR]:
    """(policy, reference) from an .npz holding policy_0..policy_{T-1} and ref_0..ref_{T-1}.

    Level t has shape (V**t, V); the row of a prefix is its base-V number, first token most significant.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ModelError(f"{path}: not a readable .npz file ({exc})") from exc
    keys = set(data.files)
    T = 0
    while f"policy_{T}" in keys:
        T += 1
    if T == 0:
        raise ModelError(
            f"{path}: expected arrays policy_0 .. policy_{{T-1}} and ref_0 .. ref_{{T-1}}; found {sorted(keys)}"
        )
    T_ref = 0
    while f"ref_{T_ref}" in keys:
        T_ref += 1
    if T_ref != T:
        raise ModelError(f"{path}: policy has {T} levels but reference has {T_ref}; lengths must match")
    extra = keys - {f"policy_{t}" for t in range(T)} - {f"ref_{t}" for t in range(T)}
    if extra:
        raise ModelError(f"{path}: unexpected arrays {sorted(extra)}")
    pol = [np.asarray(data[f"policy_{t}"], dtype=np.float64) for t in range(T)]
    ref = [np.asarray(data[f"ref_{t}"], dtype=np.float64) for t in range(T)]
    if pol[0].ndim != 2 or ref[0].ndim != 2:
        raise ModelError(f"{path}: level 0 must have shape (1, V)")
    if pol[0].shape[-1] != ref[0].shape[-1]:
        raise ModelError(f"{path}: vocabularies differ: policy V={pol[0].shape[-1]}, reference V={ref[0].shape[-1]}")
    try:
        policy, reference = TabularAR(pol), TabularAR(ref)
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from None
    policy.check_finite("policy")
    reference.check_finite("reference", reference=True)
    reference.requires_grad_(False)
    return policy, reference
