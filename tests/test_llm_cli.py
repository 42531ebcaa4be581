"""``biaslab llm`` end to end on the tiny random model (JSON, text, figure files) and its one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers", reason="the llm extra is not installed: pip install -e '.[llm]'")

from biaslab.cli import main  # noqa: E402
from biaslab.llm.run import DEFAULT_CONFIGS  # noqa: E402

TINY = ["llm", "--model", "tiny-random", "--samples", "8", "--max-new-tokens", "3", "--batch-size", "8",
        "--no-progress"]


def test_tiny_model_end_to_end(tmp_path, capsys):
    assert main([*TINY, "--format", "json", "--out", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["config"].split(":")[:2] for r in report["configs"]] == [c.split(":")[:2] for c in DEFAULT_CONFIGS]
    for row in report["configs"]:
        assert row["n"] == 8 and row["ci_low"] <= row["rel_bias_along_reference"] <= row["ci_high"]
        assert row["variance"] > 0 and 0 <= row["p_value"] <= 1
        for key in ("cos_reverse", "cos_forward", "cos_forward_token"):
            assert -1 - 1e-9 <= row[key] <= 1 + 1e-9
    assert report["sequence_kl"]["mean"] > 0 and report["mean_response_tokens"] == 3
    assert report["parameters"]["per_sample_method"] == "hooks"
    # k1 in loss at token and sequence level have the same per-sample gradient: identical rows
    rows = {r["config"]: r for r in report["configs"]}
    assert math.isclose(rows["k1:loss:token"]["variance"], rows["k1:loss:sequence"]["variance"], rel_tol=1e-9)
    for suffix in ("png", "csv", "json"):
        assert (tmp_path / f"llm.{suffix}").stat().st_size > 0
    assert json.loads((tmp_path / "llm.json").read_text())["options"]["seed"] == 0
    assert (tmp_path / "llm.csv").read_text().count("\n") == len(DEFAULT_CONFIGS) + 1
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary file


def test_text_output_and_reproducible(tmp_path, capsys):
    args = [*TINY, "--configs", "k3:loss,k1:reward", "--params", "last-layer", "--max-dense", "64",
            "--projections", "16", "--out", ""]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "k3 in loss (token)" in first and "projected on 16" in first and "sequence KL" in first
    assert main(args) == 0
    assert capsys.readouterr().out == first  # same seed, same numbers


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--configs", "k9:loss"], "unknown estimator"),
        (["--configs", "k3"], "estimator:placement"),
        (["--configs", "k3:inside"], "unknown placement"),
        (["--model", "/no/such/model"], "not a known model"),
        (["--samples", "2"], "--samples"),
        (["--params", "no_such_param*"], "no parameter matches"),
        (["--prompts", "prompts.txt"], "tokenizer"),
        (["--dtype", "bfloat16", "--device", "cuda"], "cuda"),
    ],
)
def test_user_errors_are_one_line_exit_2(extra, needle, capsys):
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda is valid here")
    assert main([*TINY, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err and err.startswith("biaslab llm: error:")
