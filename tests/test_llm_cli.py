"""``biaslab llm`` end to end on the tiny random model (JSON, text, figure files, sweep), its one-line errors, the
headline check of the issue (k1 in the loss, whose true relative bias is exactly -1 along any direction, reads an
interval containing -1 at --samples 256), and a bf16 run whose KL matches the float32 run's within its floor."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers", reason="the llm extra is not installed: pip install -e '.[llm]'")

from biaslab.cli import main  # noqa: E402
from biaslab.llm.run import DEFAULT_CONFIGS  # noqa: E402

TINY = ["llm", "--model", "tiny-random", "--samples", "16", "--direction-samples", "8", "--max-new-tokens", "3",
        "--batch-size", "8", "--no-progress"]
pytestmark = pytest.mark.filterwarnings("ignore:--samples")


def test_tiny_model_end_to_end(tmp_path, capsys):
    assert main([*TINY, "--format", "json", "--out", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["config"].split(":")[:2] for r in report["configs"]] == [c.split(":")[:2] for c in DEFAULT_CONFIGS]
    for row in report["configs"]:
        assert row["n"] == 16 and row["ci_low"] <= row["rel_bias_along_reference"] <= row["ci_high"]
        assert row["variance"] > 0 and 0 <= row["p_value_raw"] <= row["p_value"] <= 1
        assert row["verdict"] == "biased" or row["verdict"].startswith("no bias detected (detectable >= ")
        for key in ("cos_reverse", "cos_forward", "cos_forward_token"):
            assert -1 - 1e-9 <= row[key] <= 1 + 1e-9
    assert report["samples"] == {"main": 16, "directions": 8, "forward": 8}
    assert report["sequence_kl"]["mean"] > 0 and report["mean_response_tokens"] == 3
    assert report["parameters"]["per_sample_method"] == "hooks"
    assert report["numeric_floor"]["against"] == "float64" and report["numeric_floor"]["nats"] < 1e-4
    assert any("below 256" in w for w in report["warnings"])  # under the calibrated sample size
    rows = {r["config"]: r for r in report["configs"]}
    assert rows["k1:loss:token"]["variance"] == rows["k1:loss:sequence"]["variance"]  # same per-sample gradient
    for suffix in ("png", "csv", "json"):
        assert (tmp_path / f"llm.{suffix}").stat().st_size > 0
    assert json.loads((tmp_path / "llm.json").read_text())["options"]["seed"] == 0
    assert (tmp_path / "llm.csv").read_text().count("\n") == len(DEFAULT_CONFIGS) + 1
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary file


def test_text_output_and_reproducible(capsys):
    args = [*TINY, "--configs", "k3:loss,k1:reward", "--params", "last-layer", "--max-dense", "64",
            "--projections", "16", "--out", ""]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "k3 in loss (token)" in first and "projected on 16" in first and "sequence KL" in first
    assert main(args) == 0
    assert capsys.readouterr().out == first  # same seed, same numbers


@pytest.mark.slow
def test_k1_in_loss_reads_minus_one_and_bf16_matches_float32_within_its_floor(capsys):
    """The issue's acceptance run: tiny-random, --samples 256, a realistic KL. k1 in the loss has E[g] = 0, so its
    relative bias along any direction is exactly -1: the row's interval must contain it. The same run under bf16
    autocast reports a numeric floor, and its KL agrees with the float32 run's within that floor (same perturbation,
    same random streams)."""
    base = ["llm", "--model", "tiny-random", "--samples", "256", "--perturb", "0.06", "--no-progress",
            "--format", "json", "--out", ""]
    assert main(base) == 0
    fp32 = json.loads(capsys.readouterr().out)
    assert 0.2 < fp32["sequence_kl"]["mean"] < 1.0 and not fp32["warnings"]
    rows = {r["config"]: r for r in fp32["configs"]}
    assert rows["k1:loss:token"]["ci_low"] <= -1 <= rows["k1:loss:token"]["ci_high"]
    assert rows["k1:loss:token"]["verdict"] == "biased"
    assert main([*base, "--dtype", "bfloat16", "--configs", "k1:reward"]) == 0
    bf16 = json.loads(capsys.readouterr().out)
    floor = bf16["numeric_floor"]
    assert floor["against"] == "float32" and floor["nats"] > 0
    assert abs(bf16["sequence_kl"]["mean"] - fp32["sequence_kl"]["mean"]) <= floor["nats"]


def test_sweep_writes_png_csv_json(tmp_path, capsys):
    args = [*TINY, "--configs", "k1:reward,k3:loss", "--sweep-kl", "0.2,0.8", "--perturb-seeds", "2",
            "--out", str(tmp_path), "--format", "json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["points"]) == 2 and all(p["n_seeds"] == 2 for p in report["points"])
    kls = [p["sequence_kl"] for p in report["points"]]
    assert kls[0] < kls[1]  # the perturbation was rescaled to the targets
    for suffix in ("png", "csv", "json"):
        assert (tmp_path / f"llm_sweep.{suffix}").stat().st_size > 0
    saved = json.loads((tmp_path / "llm_sweep.json").read_text())
    assert saved["biaslab_version"] and saved["options"]["seed"] == 0 and saved["sweep"]["n_seeds"] == 2
    assert (tmp_path / "llm_sweep.csv").read_text().count("\n") == 2 * 2 + 1


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
        (["--target-kl", "-1"], "--target-kl"),
        (["--sweep-kl", "a,b"], "--sweep-kl"),
        (["--dtype", "bfloat16", "--device", "cuda"], "cuda"),
    ],
)
def test_user_errors_are_one_line_exit_2(extra, needle, capsys):
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda is valid here")
    assert main([*TINY, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err and err.startswith("biaslab llm: error:")


def test_checkpoint_pair(tmp_path, capsys):
    """--policy/--reference: two saved tiny checkpoints (different seeds) as pi_theta and pi_ref, no LoRA."""
    from biaslab.llm.models import tiny_random_model

    for name, seed in (("pol", 0), ("ref", 1)):
        tiny_random_model("llama", vocab_size=16, seed=seed).save_pretrained(tmp_path / name)
    args = [*TINY, "--no-eos", "--policy", str(tmp_path / "pol"), "--reference", str(tmp_path / "ref"), "--params",
            "last-layer", "--max-dense", "64", "--projections", "16", "--configs", "k1:reward", "--format", "json",
            "--out", ""]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["policy"]["source"].startswith("checkpoint pair") and report["sequence_kl"]["mean"] > 0
    assert math.isfinite(report["configs"][0]["rel_bias_along_reference"])
    assert main([*args[:-4], "--params", "lora"]) == 2
    assert "no LoRA" in capsys.readouterr().err


def _sweep_report(kls_lengths: list[tuple[float, int]], n_seeds: int, ci: tuple[float, float]) -> dict:
    cfg = {"config": "k3-loss", "label": "k3 in loss (token)", "rel_bias_mean": -0.1, "rel_bias_spread": 0.05,
           "ci_low_mean": ci[0], "ci_high_mean": ci[1], "rel_bias_norm_mean": 0.1, "rel_variance_mean": 3.0,
           "biased_seeds": 0}
    points = [{"target_kl": kl, "max_new_tokens": L, "sequence_kl": kl, "n_seeds": n_seeds, "configs": [cfg]}
              for kl, L in kls_lengths]
    return {"kind": "sweep", "options": {"model": "tiny-random", "samples": 16, "params": "auto", "alpha": 0.05},
            "sweep": {"n_seeds": n_seeds}, "points": points}


@pytest.mark.parametrize("joint", [True, False])
def test_sweep_figure_panels(tmp_path, joint):
    """A truncation sweep (one point per length: KL and length move together) is one row of curves with the
    calibrated interval as bars (unbounded Fieller bounds clipped); a KL x length grid is one row per length."""
    from matplotlib import image

    from biaslab.llm.sweep import write_sweep

    if joint:
        rep = _sweep_report([(0.02, 16), (0.035, 32), (0.05, 64)], 1, (-math.inf, 0.3))
    else:
        rep = _sweep_report([(0.1, 8), (0.3, 8), (0.1, 16), (0.3, 16)], 2, (-0.3, 0.1))
    paths = write_sweep(rep, tmp_path)
    assert [p.suffix for p in paths] == [".png", ".csv", ".json"]
    h, w = image.imread(paths[0]).shape[:2]
    assert (h < w) if joint else (h > 0.6 * w)  # one row of two panels vs two rows


def test_cli_warnings_are_one_line_and_not_repeated():
    """A warning of the pass (here: fewer samples than the calibrated size) appears once, as one line, with no
    Python source location (a separate process: pytest would capture the warnings itself)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "biaslab", *TINY, "--out", ""], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    text = r.stdout + r.stderr
    assert text.count("below 256") == 1 and "UserWarning" not in text and ".py:" not in text
