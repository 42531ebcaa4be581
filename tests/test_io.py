"""biaslab.core.io: strict JSON, file sets replaced together, deterministic CSV, output folders checked up front."""

import csv
import io
import json
import math
import os
import signal
from enum import Enum
from pathlib import Path

import numpy as np
import pytest
import torch

from biaslab.core.io import (
    atomic_write_many,
    check_output_dir,
    csv_text,
    interrupts_deferred,
    jsonable,
    to_json,
)


def strict_loads(text: str):
    def bare(name):
        raise AssertionError(f"bare {name} in JSON")

    return json.loads(text, parse_constant=bare)


class Color(Enum):
    RED = "red"


def test_to_json_turns_non_finite_floats_into_null_and_keeps_strings():
    obj = {
        "nan": float("nan"),
        "inf": -math.inf,
        "nested": [1.5, {"x": float("nan")}, (np.float64("nan"), np.int64(3))],
        "text": "NaN is not a number; Infinity neither",
        "name_with_NaN": "NaN",
        "array": np.array([1.0, np.nan]),
        "tensor": torch.tensor([[np.inf, 2.0]]),
        "path": Path("a/b"),
        "enum": Color.RED,
        "flag": np.bool_(True),
    }
    out = strict_loads(to_json(obj))
    assert out == {
        "nan": None,
        "inf": None,
        "nested": [1.5, {"x": None}, [None, 3]],
        "text": "NaN is not a number; Infinity neither",
        "name_with_NaN": "NaN",
        "array": [1.0, None],
        "tensor": [[None, 2.0]],
        "path": "a/b",
        "enum": "red",
        "flag": True,
    }
    assert jsonable({"a": (1, 2)}) == {"a": [1, 2]}
    with pytest.raises(TypeError, match="cannot write object"):
        to_json({"x": object()})


def test_csv_text_is_deterministic_and_matches_the_csv_module():
    rows = [
        {"a": 0.1 + 0.2, "b": "x,y", "c": None, "d": [1, 2], "e": 3},
        {"a": 1e-17, "b": 'q"uote', "c": float("nan"), "d": [], "e": True},
    ]
    text = csv_text(rows, ["a", "b", "c", "d", "e"])
    assert text == csv_text(rows, ["a", "b", "c", "d", "e"])
    assert text.endswith("\n") and "\r" not in text
    back = list(csv.DictReader(io.StringIO(text)))
    assert back[0] == {"a": "0.3", "b": "x,y", "c": "", "d": "1;2", "e": "3"}
    assert back[1] == {"a": "0", "b": 'q"uote', "c": "nan", "d": "", "e": "True"}
    assert csv_text([], ["a", "b"]) == "a,b\n"


def test_a_file_set_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    names = [tmp_path / f"f.{ext}" for ext in ("png", "csv", "json")]
    atomic_write_many({p: b"old" for p in names})
    real_replace = os.replace
    calls = []

    def failing_replace(src, dst):  # every temporary file is written, then the first rename fails
        calls.append(dst)
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_many({p: b"new" for p in names})
    monkeypatch.setattr(os, "replace", real_replace)
    assert [p.read_bytes() for p in names] == [b"old"] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in names)  # no temporary left


def test_ctrl_c_is_held_back_while_a_set_is_renamed(tmp_path):
    names = [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            atomic_write_many({p: b"x" for p in names})
    assert [p.read_bytes() for p in names] == [b"x", b"x"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_check_output_dir(tmp_path):
    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # nothing is created by the check
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(NotADirectoryError, match="is a file"):
        check_output_dir(tmp_path / "file" / "sub")
    if Path("/proc/self").is_dir():  # a folder nobody may write to, also as root
        with pytest.raises(PermissionError, match="(not writable|cannot write)"):
            check_output_dir("/proc/self/out")
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            with pytest.raises(PermissionError):
                check_output_dir(ro)
        finally:
            ro.chmod(0o755)


def test_atomic_write_figure_replaces_the_three_files_as_a_set(tmp_path):
    """A failure while preparing the set (here: a JSON value that cannot be written) leaves the previous PNG, CSV
    and JSON all in place: no half-replaced figure."""
    from biaslab.core.io import atomic_write_figure

    first = atomic_write_figure(tmp_path, "fig", b"png-1", "a\n1\n", {"run": 1})
    assert sorted(p.name for p in first) == ["fig.csv", "fig.json", "fig.png"]
    before = {p.name: p.read_bytes() for p in first}
    with pytest.raises(TypeError):
        atomic_write_figure(tmp_path, "fig", b"png-2", "a\n2\n", {"run": object()})
    assert {p.name: p.read_bytes() for p in first} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.csv", "fig.json", "fig.png"]
