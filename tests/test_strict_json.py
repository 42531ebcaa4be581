"""Every ``--format json`` output of every subcommand, and every JSON file biaslab writes, is strict JSON: no bare
NaN / Infinity (``JSON.parse`` in Node and jq reject or corrupt them). Non-finite values are ``null``; where it
matters a sibling field says why (an unbounded interval at small n)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from biaslab.cli import main

EST = "examples/my_estimators.py:k3"


def strict(text: str):
    def refuse(constant: str):
        raise ValueError(f"non-strict JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def nulls(obj, path=""):
    """Paths of every null in ``obj``."""
    if obj is None:
        yield path
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from nulls(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from nulls(v, f"{path}[{i}]")


COMMANDS = {
    "table": (["table", "--vocab", "2", "--length", "2", "--estimators", "k1,k3"], 0),
    "table-undefined": (["table", "--vocab", "2", "--length", "2", "--estimators", "k3", "--kl-scale", "0"], 0),
    "check-exact": (["check", EST, "--placement", "loss", "--models", "1"], 1),
    "check-exact-undefined": (["check", EST, "--placement", "loss", "--models", "1", "--kl-scale", "0"], 2),
    "check-mc": (["check", EST, "--placement", "both", "--models", "1", "--mode", "mc", "--samples", "300"], 0),
    "check-mc-undefined": (["check", EST, "--placement", "both", "--models", "1", "--mode", "mc", "--samples", "300",
                            "--kl-scale", "0"], 2),
    "audit": (["audit", "--framework", "openrlhf", "--no-search"], 0),
    "train": (["train", "--vocab", "2", "--length", "2", "--steps", "5", "--reward", "binary:2"], 0),
    "train-mc": (["train", "--vocab", "2", "--length", "2", "--steps", "3", "--reward", "binary:2", "--mode", "mc",
                  "--samples", "16"], 0),
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_json_output_is_strict(name, capsys):
    args, code = COMMANDS[name]
    assert main([*args, "--format", "json"]) == code
    strict(capsys.readouterr().out)


def test_exact_npz_and_figures_json_are_strict(tmp_path, capsys):
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {f"{who}_{t}": rng.normal(size=(2**t, 2)) for who in ("policy", "ref") for t in range(2)}
    arrays.update({f"ref_{t}": arrays[f"policy_{t}"] for t in range(2)})  # policy == reference: undefined, nan
    np.savez(tmp_path / "m.npz", **arrays)
    assert main(["exact", "--logits", str(tmp_path / "m.npz"), "--format", "json"]) in (0, 1)
    out = strict(capsys.readouterr().out)
    assert {r["verdict"] for r in out["rows"]} == {"undefined"} and any(r["rel_bias"] is None for r in out["rows"])
    assert main(["figures", "--quick", "--only", "table1,values", "--out", str(tmp_path / "f"), "--no-progress",
                 "--format", "json"]) == 0
    strict(capsys.readouterr().out)
    files = list((tmp_path / "f").glob("*.json"))
    assert files
    for f in files:
        strict(f.read_text())


@pytest.mark.filterwarnings("ignore")
def test_llm_json_is_strict_and_says_why_an_interval_is_unbounded(tmp_path, capsys):
    """At n = 16, close to the reference, on the tiny random model Fieller intervals are unbounded: their ends are
    null and the row's ``unbounded`` field names the interval and the reason; the files written beside it parse
    strictly too."""
    pytest.importorskip("transformers")
    args = ["llm", "--model", "tiny-random", "--samples", "16", "--direction-samples", "8", "--max-new-tokens", "3",
            "--configs", "k1:reward,k3:loss", "--perturb", "0.01", "--bootstrap", "200", "--no-progress",
            "--out", str(tmp_path),
            "--format", "json"]
    assert main(args) == 0
    report = strict(capsys.readouterr().out)
    for row in report["configs"]:
        for lo, hi, name in (("ci_low", "ci_high", "ci"), ("toward_ci_low", "toward_ci_high", "toward_ci")):
            bounded = row[lo] is not None and row[hi] is not None
            assert bounded == (name not in row["unbounded"]), row
    assert any(row["unbounded"] for row in report["configs"])  # the case the JSON must carry
    assert all(math.isfinite(row["p_value"]) for row in report["configs"])
    for f in Path(tmp_path).glob("*.json"):
        strict(f.read_text())
