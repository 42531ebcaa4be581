"""Several processes through torch.distributed (torchrun): NCCL on GPUs, gloo on CPU, exact merging.

The work is cut into global chunks of samples (chunk j holds samples [j B, (j + 1) B)); rank r takes the chunks
j = r mod world. Every sample has its own random stream (``sample.stream_seed``), so a chunk holds the same samples
whatever the number of processes. Each chunk's sufficient statistics (``stats.Moments``) are gathered on every
rank and merged in chunk order, so W processes compute bit for bit the numbers one process computes.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..stats import Moments


def world() -> tuple[int, int]:
    """(rank, world size): from the initialized process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str) -> tuple[int, int, str]:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment): NCCL for cuda, gloo for cpu.

    Returns (rank, world size, device); on cuda each process takes the GPU ``cuda:LOCAL_RANK``.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        rank, size = world()
        return rank, size, _local_device(device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    rank, size = world()
    return rank, size, _local_device(device)


def _local_device(device: str) -> str:
    if device.startswith("cuda") and dist.is_available() and dist.is_initialized():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def my_chunks(n_samples: int, chunk: int, rank: int, size: int) -> list[tuple[int, int, int]]:
    """[(chunk index j, start, stop)] of the global chunks rank ``rank`` computes."""
    starts = range(0, n_samples, chunk)
    return [(j, s, min(s + chunk, n_samples)) for j, s in enumerate(starts) if j % size == rank]


def gather(obj: object) -> list[object]:
    """Every rank's ``obj`` (rank order) on every rank; [obj] without a process group."""
    rank, size = world()
    if size == 1:
        return [obj]
    out: list[object] = [None] * size
    dist.all_gather_object(out, obj)
    return out


def _to_cpu(states: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    return {k: {kk: v.detach().cpu() for kk, v in s.items()} for k, s in states.items()}


def merge_chunks(local: dict[int, dict[str, Moments]]) -> dict[str, Moments]:
    """Gather {chunk index: {key: Moments}} from all ranks and merge each key over the chunks in index order."""
    sent = {j: _to_cpu({k: m.state() for k, m in d.items()}) for j, d in local.items()}
    every: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for part in gather(sent):
        every.update(part)  # type: ignore[arg-type]
    merged: dict[str, Moments] = {}
    for j in sorted(every):
        for key, state in every[j].items():
            m = Moments.from_state(state)
            merged[key] = m if key not in merged else merged[key].merge(m)
    return merged


def shutdown() -> None:
    """Leave the process group (torchrun runs) so the processes exit cleanly: wait for every rank first, since a
    rank that tears its connections down while another still uses them aborts the other (gloo)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


__all__ = ["shutdown", "gather", "init_from_env", "merge_chunks", "my_chunks", "world"]
