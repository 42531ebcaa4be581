"""Two processes (torch.distributed, gloo, as under torchrun) give bit for bit the statistics of one process.

Each rank computes its share of the global chunks (rank 0: chunks 0 and 2, rank 1: chunk 1); every chunk's
``stats.Moments`` are gathered and merged in chunk order, so the merged sufficient statistics, and every number
of the report, are identical to a single process's on the same samples.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("transformers", reason="the llm extra is not installed: pip install -e '.[llm]'")

from biaslab.llm.run import LLMOptions, collect, summarize  # noqa: E402

OPTS = dict(model="tiny-random", vocab_size=16, max_new_tokens=4, samples=12, batch_size=4, params="last-layer",
            max_dense=256, projections=32, configs=("k1:reward", "k3:loss", "k2:loss:sequence"), progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_default_dtype(torch.float64)  # as the test process (conftest): results must not depend on it
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        opts = LLMOptions(**OPTS)
        merged, setup, timing = collect(opts)
        report = summarize(merged, setup, opts, timing)
        if rank == 0:
            torch.save({"states": {k: m.state() for k, m in merged.items()}, "report": report}, out)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    out = str(tmp_path / "rank0.pt")
    mp.start_processes(_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="spawn")
    two = torch.load(out, weights_only=False)
    assert two["report"]["timing"]["world_size"] == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers
    try:
        opts = LLMOptions(**OPTS)
        merged, setup, timing = collect(opts)
    finally:
        torch.set_num_threads(threads)
    assert setup.psg.sketch is not None and setup.psg.subset.method == "hooks"
    assert set(merged) == set(two["states"])
    for key, m in merged.items():
        for name, t in m.state().items():
            assert torch.equal(t, two["states"][key][name]), (key, name)
    one = summarize(merged, setup, opts, timing)
    for a, b in zip(one["configs"], two["report"]["configs"]):
        assert a == b
    assert one["sequence_kl"] == two["report"]["sequence_kl"] and one["values"] == two["report"]["values"]
    assert merged["values"].n == 12
