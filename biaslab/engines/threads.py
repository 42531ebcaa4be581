"""Thread policy: run small problems on one CPU thread.

biaslab's tensors are small for most toys (the audit's V=3, T=3 holds a few hundred numbers). At that size torch's
intra-op parallelism costs more than it saves, and on a shared machine (other processes on the same cores) the
threads wait on each other: the V=4, T=8 exact table took 1.45-27 s with torch's default 2 threads against
0.49-1.08 s on one thread on the same 2-core machine. So below a work threshold biaslab asks torch for one thread.

Rules, in this order (``choose_threads``):

1. ``BIASLAB_THREADS=<k>`` (an int >= 1): use k threads, whatever the problem size. This is the explicit switch.
2. The user pinned the thread count: ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` is set, or ``torch.set_num_threads``
   was called with a value other than torch's default (the number of physical cores). Then biaslab changes nothing.
3. ``BIASLAB_THREADS`` unset, empty or ``auto``: one thread when ``work < SMALL_WORK`` elements; otherwise torch's
   default (restored if an earlier call of this policy lowered it).

``work`` is the number of elements of the largest tensor the problem builds, usually the (N, T, V) next-token
log-probabilities (N sequences or samples of a chunk, T positions, V tokens): see ``work_size``. ``work=None``
means "unknown": only rule 1 applies.

Use ``thread_policy(work)`` at a command's entry point (it stays in force) or ``with small_problem_threads(work):``
around a computation (the previous count comes back on exit).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import torch

ENV_VAR = "BIASLAB_THREADS"
#: below this many elements of the largest tensor, one thread (2**24 float64 numbers = 128 MiB; the V=4, T=8
#: enumeration, (65,536, 8, 4), is 2.1M elements).
SMALL_WORK = 2**24
_PINNING_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

_ours: int | None = None  # the count this module last set (so that it does not mistake it for a user's choice)


def work_size(n: int, length: int = 1, vocab: int = 1) -> int:
    """Elements of an (n, T, V) tensor: the usual measure of a problem's size for ``choose_threads``."""
    return int(n) * int(length) * int(vocab)


def requested_threads() -> int | None:
    """The int in ``BIASLAB_THREADS``, or None when unset, empty or ``auto``. Raises ValueError otherwise."""
    raw = os.environ.get(ENV_VAR, "").strip().lower()
    if raw in ("", "auto"):
        return None
    try:
        k = int(raw)
    except ValueError:
        k = 0
    if k < 1:
        raise ValueError(f"{ENV_VAR} must be a positive int or 'auto'; got {raw!r}")
    return k


@lru_cache(maxsize=1)
def default_threads() -> int:
    """torch's own default intra-op thread count when nothing pins it: the number of physical cores (Linux:
    distinct (physical id, core id) pairs of /proc/cpuinfo), else ``os.cpu_count()``."""
    try:
        with open("/proc/cpuinfo") as f:
            cores, phys = set(), "0"
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    phys = value.strip()
                elif key == "core id":
                    cores.add((phys, value.strip()))
        if cores:
            return len(cores)
    except OSError:
        pass
    return os.cpu_count() or 1


def user_pinned() -> bool:
    """True when the user chose the thread count: OMP_NUM_THREADS / MKL_NUM_THREADS set, or the current torch
    count is neither torch's default nor the one this module set."""
    if any(os.environ.get(name, "").strip() for name in _PINNING_ENV):
        return True
    current = torch.get_num_threads()
    return current != default_threads() and current != _ours


def choose_threads(work: int | None = None) -> int | None:
    """The intra-op thread count the policy wants for a problem of ``work`` elements, or None to leave torch as
    it is (see the module docstring for the rules)."""
    k = requested_threads()
    if k is not None:
        return k
    if work is None or user_pinned():
        return None
    return 1 if work < SMALL_WORK else default_threads()


def _set(k: int) -> None:
    global _ours
    if torch.get_num_threads() != k:
        torch.set_num_threads(k)
    _ours = k


def thread_policy(work: int | None = None) -> int:
    """Apply ``choose_threads(work)`` for the rest of the process; returns the thread count now in force."""
    k = choose_threads(work)
    if k is not None:
        _set(k)
    return torch.get_num_threads()


@contextmanager
def small_problem_threads(work: int | None = None) -> Iterator[int]:
    """``with small_problem_threads(work) as k:`` runs the block under ``choose_threads(work)`` threads (k) and
    restores the previous count on exit, exceptions included."""
    global _ours
    before, before_ours = torch.get_num_threads(), _ours
    try:
        yield thread_policy(work)
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
        _ours = before_ours
