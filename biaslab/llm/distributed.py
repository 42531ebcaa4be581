"""Several processes through torch.distributed (torchrun): NCCL on GPUs, gloo on CPU, exact merging.

The work is cut into global chunks of samples (chunk j holds samples [j B, (j + 1) B)); rank r takes the chunks
j = r mod world. Every sample has its own random stream (``sample.stream_seed``), so a chunk holds the same samples
whatever the number of processes. Each chunk's per-sample rows are gathered on every rank and concatenated in chunk
order (``run.collect``), so W processes compute bit for bit the numbers one process computes.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size): from the initialized process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str) -> tuple[int, int, str]:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment): NCCL for cuda, gloo for cpu.

    Returns (rank, world size, device); on cuda each process takes the GPU ``cuda:LOCAL_RANK``.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (dist.is_available() and dist.is_initialized()):
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
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


def shutdown() -> None:
    """Leave the process group (torchrun runs) so the processes exit cleanly: wait for every rank first, since a
    rank that tears its connections down while another still uses them aborts the other (gloo)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


__all__ = ["shutdown", "gather", "init_from_env", "my_chunks", "world"]
