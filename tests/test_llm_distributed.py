"""Two processes (torch.distributed, gloo, as under torchrun) give bit for bit the statistics of one process.

Each rank computes its share of the global chunks of each sample set (rank 0: chunks 0 and 2, rank 1: chunk 1);
every sample has its own counter-based random stream, so the per-sample gradient rows gathered in sample order,
and every number of the report, are identical to a single process's.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("transformers", reason="the llm extra is not installed: pip install -e '.[llm]'")

from biaslab.llm.run import LLMOptions, collect, summarize  # noqa: E402

OPTS = dict(model="tiny-random", vocab_size=16, max_new_tokens=4, samples=12, direction_samples=12, batch_size=4,
            params="last-layer", max_dense=256, projections=32, configs=("k1:reward", "k3:loss", "k2:loss:sequence"),
            progress=False, bootstrap=200, numeric_floor=False, generation_batch=4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import warnings


    warnings.simplefilter("ignore")
    torch.set_default_dtype(torch.float64)  # as the test process (conftest): results must not depend on it
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        opts = LLMOptions(**OPTS)
        rows, setup, timing = collect(opts)
        if rank == 0:
            torch.save({"rows": rows, "report": summarize(rows, setup, opts, timing)}, out)
    finally:
        from biaslab.llm.distributed import shutdown

        shutdown()  # a barrier, then leave the group: no rank tears down connections another still uses


@pytest.mark.filterwarnings("ignore:--samples")
def test_two_processes_equal_one(tmp_path):
    out = str(tmp_path / "rank0.pt")
    mp.start_processes(_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="spawn")
    two = torch.load(out, weights_only=False)
    assert two["report"]["timing"]["world_size"] == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers
    try:
        opts = LLMOptions(**OPTS)
        rows, setup, timing = collect(opts)
    finally:
        torch.set_num_threads(threads)
    assert setup.psg.sketch is not None and setup.psg.subset.method == "hooks"
    assert set(rows) == set(two["rows"])
    for part, d in rows.items():
        assert set(d) == set(two["rows"][part])
        for key, t in d.items():
            assert torch.equal(t, two["rows"][part][key]), (part, key)
    one = summarize(rows, setup, opts, timing)
    assert one["configs"] == two["report"]["configs"]
    assert one["sequence_kl"] == two["report"]["sequence_kl"] and one["values"] == two["report"]["values"]
    assert rows["main"]["values"].shape == (12, 8)


def _train_worker(rank: int, world: int, port: int, out: str) -> None:
    """Build the policy with --train-steps under 2 processes; rank 1's training is made to differ (as GPU kernels
    that are not bitwise reproducible would), so only the broadcast makes both ranks sample the same pi_theta."""
    import warnings

    import biaslab.llm.setup as run_mod  # build() trains the adapter there
    from biaslab.llm.policy import lora_modules

    warnings.simplefilter("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train = run_mod.train_lora

    def diverging(model, *args, **kw):
        history = train(model, *args, **kw)
        with torch.no_grad():
            for m in lora_modules(model).values():
                m.lora_B.add_(0.01 * (rank + 1))  # a different adapter on each rank before the broadcast
        own = [m.lora_B.detach().clone() for m in lora_modules(model).values()]
        torch.save(own, f"{out}.before{rank}")
        return history

    run_mod.train_lora = diverging
    try:
        from biaslab.llm import distributed as D

        opts = LLMOptions(**{**OPTS, "train_steps": 2})
        opts.validate()
        D.init_from_env(opts.device)
        setup = run_mod.build(opts, "cpu")
        after = [t.detach().clone() for m in lora_modules(setup.loaded.model).values() for t in (m.lora_A, m.lora_B)]
        torch.save(after, f"{out}.after{rank}")
    finally:
        from biaslab.llm.distributed import shutdown

        shutdown()


def test_train_steps_broadcast_rank0s_adapter(tmp_path):
    out = str(tmp_path / "adapter")
    mp.start_processes(_train_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="spawn")
    before = [torch.load(f"{out}.before{r}") for r in range(2)]
    after = [torch.load(f"{out}.after{r}") for r in range(2)]
    assert any(not torch.equal(a, b) for a, b in zip(*before))  # the ranks trained different adapters
    for a, b in zip(*after):
        assert torch.equal(a, b)  # both ranks end with the same adapter ...
    rank0_b = after[0][1::2]
    for a, b in zip(rank0_b, before[0]):
        assert torch.equal(a, b)  # ... rank 0's
