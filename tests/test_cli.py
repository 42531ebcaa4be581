"""The command line: table, exact, figures; errors exit with status 2 and one clear line."""

import json
import subprocess
import sys

import numpy as np

from biaslab.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "biaslab", *args], capture_output=True, text=True)


def test_table_json_rows_and_verdicts(capsys):
    assert main(["table", "--vocab", "2", "--length", "3", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {(r["estimator"], r["placement"], r["level"], r["credit"]): r for r in out["rows"]}
    assert len(rows) == 40 and out["kl_reverse"] > 0
    assert rows[("k3", "loss", "sequence", None)]["matches"] == "forward_kl"
    assert rows[("k1", "reward", "token", "rtg")]["verdict"] == "unbiased"
    assert rows[("k1", "loss", "token", None)]["verdict"] == "zero"


def test_table_text_is_the_markdown(capsys):
    assert main(["table", "--vocab", "2", "--length", "2", "--estimators", "k1", "--format", "text"]) == 0
    text = capsys.readouterr().out
    assert main(["table", "--vocab", "2", "--length", "2", "--estimators", "k1", "--format", "md"]) == 0
    assert capsys.readouterr().out == text and text.startswith("# Exact KL-gradient table")


def test_table_markdown_and_csv(capsys):
    assert main(["table", "--vocab", "2", "--length", "2", "--model", "neural", "--estimators", "k3"]) == 0
    md = capsys.readouterr().out
    assert "| k3 | loss | sequence | - |" in md and "forward_kl" in md
    assert main(["table", "--vocab", "2", "--length", "2", "--format", "csv", "--estimators", "k1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("estimator,placement,level,credit,rel_bias") and len(lines) == 11


def test_exact_from_npz(tmp_path, capsys):
    g = np.random.default_rng(1)
    V, T = 2, 3
    arrays = {f"policy_{t}": g.normal(size=(V**t, V)) for t in range(T)}
    arrays |= {f"ref_{t}": g.normal(size=(V**t, V)) for t in range(T)}
    np.savez(tmp_path / "m.npz", **arrays)
    assert main(["exact", "--logits", str(tmp_path / "m.npz"), "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    n_params = sum(V**t * V for t in range(T))
    assert len(out["true_grad"]) == n_params and len(out["forward_grad"]) == n_params
    for key in ("kl_reverse", "kl_forward", "rows"):
        assert key in out
    row = out["rows"][0]
    assert {"estimator", "placement", "level", "expected_grad", "variance", "rel_bias", "verdict", "matches"} <= set(
        row
    )
    assert len(row["expected_grad"]) == n_params
    # k1 in reward is unbiased: its expected gradient is the true gradient
    k1 = next(r for r in out["rows"] if r["estimator"] == "k1" and r["placement"] == "reward")
    assert np.allclose(k1["expected_grad"], out["true_grad"], atol=1e-12)


def test_errors_exit_2_with_a_clear_message(tmp_path):
    r = run("table", "--vocab", "50", "--length", "20", "--model", "neural")
    assert r.returncode == 2 and "Monte Carlo" in r.stderr and "Traceback" not in r.stderr
    r = run("table", "--estimators", "k1,k7")
    assert r.returncode == 2 and "unknown estimator 'k7'" in r.stderr
    r = run("exact", "--logits", str(tmp_path / "nope.npz"))
    assert r.returncode == 2 and "no such file" in r.stderr


def test_figures_quick_writes_table1(tmp_path, capsys):
    assert main(["figures", "--quick", "--out", str(tmp_path), "--only", "table1", "--no-progress"]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / f"table1{s}") for s in (".md", ".csv", ".json")]
    md = (tmp_path / "table1.md").read_text()
    assert "forward_kl" in md and (tmp_path / "table1.csv").exists()
    meta = json.loads((tmp_path / "table1.json").read_text())
    assert meta["biaslab_version"] and meta["models"] and meta["seed"] == [0]
