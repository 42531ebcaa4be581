"""Your own tabular model from a file (``biaslab exact --logits``): an .npz of ``policy_0 .. policy_{T-1}`` and
``ref_0 .. ref_{T-1}``, level t of shape (V**t, V), the row of a prefix its base-V number (first token most
significant). Every way such a file can be wrong is a ``ModelError`` naming the file and the problem."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .toy import ModelError, TabularAR


def load_logits_npz(path: str | os.PathLike) -> tuple[TabularAR, TabularAR]:
    """(policy, reference) from an .npz holding policy_0..policy_{T-1} and ref_0..ref_{T-1}.

    Level t has shape (V**t, V); the row of a prefix is its base-V number, first token most significant.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if path.is_dir():
        raise ModelError(f"{path}: is a folder; expected an .npz file")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ModelError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ModelError(
            f"{path}: holds a single array (a .npy file); expected an .npz archive of arrays policy_0 .. "
            "policy_{T-1} and ref_0 .. ref_{T-1}, as written by numpy.savez"
        )
    keys = set(data.files)

    def levels(prefix: str) -> int:  # how many of prefix_0, prefix_1, ... are present, in order
        t = 0
        while f"{prefix}_{t}" in keys:
            t += 1
        return t

    T, T_ref = levels("policy"), levels("ref")
    if T == 0:
        raise ModelError(
            f"{path}: expected arrays policy_0 .. policy_{{T-1}} and ref_0 .. ref_{{T-1}}; found {sorted(keys)}"
        )
    if T_ref != T:
        raise ModelError(f"{path}: policy has {T} levels but reference has {T_ref}; lengths must match")
    extra = keys - {f"policy_{t}" for t in range(T)} - {f"ref_{t}" for t in range(T)}
    if extra:
        raise ModelError(f"{path}: unexpected arrays {sorted(extra)}")
    arrays = {}
    for name in sorted(keys):
        try:
            arrays[name] = np.asarray(data[name], dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{path}: array {name} is not numeric ({exc})") from None
    pol = [arrays[f"policy_{t}"] for t in range(T)]
    ref = [arrays[f"ref_{t}"] for t in range(T)]
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
