"""Shared timing harness of the benchmarks: warm-up, repeats, min and median, CPU time, peak memory, targets.

Every benchmark prints a header naming the machine (CPU model, cores, torch version, thread setting), then one
line per measurement, and at the end each target beside its measurement. Targets are goals, not tests: a missed
target prints "MISSED" and the script still exits 0 (a crash still exits non-zero).

Timing rules (the machine may be shared with other processes, which makes single timings erratic):
* ``warmup`` untimed calls first (caches, lazy imports, allocator), then ``repeats`` timed calls; the minimum is the
  figure of merit (the least disturbed run), the median shows the spread. A ``budget_s`` stops repeating early
  (at least one timed call) for measurements that take tens of seconds; the count actually done is printed.
* Wall time (``time.perf_counter``) and CPU time (``time.process_time``: all threads of this process) are both kept;
  under contention CPU time is the steadier of the two.
* Ratios are taken between measurements made in the same process, one right after the other.
* Subprocesses (the ``biaslab`` CLI) are timed with ``os.wait4``: their own wall, user + sys CPU and peak RSS.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def thread_setting() -> str:
    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "BIASLAB_THREADS") if k in os.environ}
    pinned = ", ".join(f"{k}={v}" for k, v in env.items()) or "no thread env vars"
    return f"torch threads {torch.get_num_threads()} ({pinned})"


def machine() -> str:
    """One line: CPU model, logical cores (usable by this process), torch and Python versions."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    load = ""
    if hasattr(os, "getloadavg"):
        load = f", load average {os.getloadavg()[0]:.2f}"
    return (
        f"{cpu_model()}, {os.cpu_count()} logical cores ({usable} usable){load}; torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def header(title: str, args: argparse.Namespace | None = None) -> None:
    print(f"== {title}")
    print(f"machine: {machine()}")
    print(f"threads: {thread_setting()}")
    if args is not None:
        print(f"options: {' '.join(f'{k}={v}' for k, v in vars(args).items())}")
    print("timings: min and median over the repeats after warm-up; other processes on this machine add noise")
    sys.stdout.flush()


@dataclass
class Timing:
    """Timed repeats of one measurement (seconds)."""

    name: str
    wall: list[float]
    cpu: list[float]
    threads: int
    peak_rss: int = 0  # bytes, subprocess measurements only
    note: str = ""

    @property
    def min(self) -> float:
        return min(self.wall)

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_min(self) -> float:
        return min(self.cpu)

    def line(self) -> str:
        s = (
            f"{self.name:<46} min {fmt_s(self.min)}  median {fmt_s(self.median)}  cpu min {fmt_s(self.cpu_min)}"
            f"  (n={len(self.wall)}, {self.threads} thr)"
        )
        if self.peak_rss:
            s += f"  peak RSS {fmt_bytes(self.peak_rss)}"
        return s + (f"  {self.note}" if self.note else "")


def fmt_s(t: float) -> str:
    return f"{t * 1e3:8.1f} ms" if t < 1 else f"{t:8.3f} s "


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1000 or unit == "TiB":  # (1000-1023 MiB read as 0.98-1 GiB, not "1e+03 MiB")
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g}"


def measure(
    name: str, fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1, budget_s: float | None = None
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then up to ``repeats`` timed ones (fewer once ``budget_s`` seconds
    of timed calls are spent; at least one)."""
    for _ in range(warmup):
        fn()
    wall: list[float] = []
    cpu: list[float] = []
    while len(wall) < repeats:
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if budget_s is not None and sum(wall) > budget_s:
            break
    t = Timing(name, wall, cpu, torch.get_num_threads())
    if len(wall) < repeats:
        t.note = f"(stopped after {len(wall)} of {repeats} repeats: time budget {budget_s:g} s)"
    print(t.line())
    sys.stdout.flush()
    return t


def measure_cli(
    name: str,
    args: Sequence[str],
    *,
    repeats: int = 5,
    warmup: int = 1,
    budget_s: float | None = None,
    timeout_s: float | None = None,
    ok_status: tuple[int, ...] = (0, 1),
    env: dict[str, str] | None = None,
) -> Timing:
    """Time the process ``python -m biaslab ARGS`` (start-up and imports included), like ``measure``. A process
    running past ``timeout_s`` is killed and recorded as taking ``timeout_s`` (``Timing.note`` says so; no more
    repeats). Raises RuntimeError when it exits with a status outside ``ok_status``."""
    wall: list[float] = []
    cpu: list[float] = []
    rss, note = 0, ""
    for i in range(warmup + repeats):
        status, w, c, r, out = _run_once(args, env, timeout_s)
        if status is None:
            wall, cpu, rss, note = [w], [c], r, f"TIMED OUT: killed after {timeout_s:g} s"
            break
        if status not in ok_status:
            raise RuntimeError(f"biaslab {' '.join(args)} exited with status {status}:\n{out[-2000:]}")
        if i < warmup:
            continue
        wall.append(w)
        cpu.append(c)
        rss = max(rss, r)
        if budget_s is not None and sum(wall) > budget_s:
            break
    t = Timing(name, wall, cpu, torch.get_num_threads(), rss)
    t.note = note or f"[{len(wall)} processes]" + (f" (time budget {budget_s:g} s)" if len(wall) < repeats else "")
    print(t.line())
    sys.stdout.flush()
    return t


def _run_once(
    args: Sequence[str], env: dict[str, str] | None, timeout_s: float | None = None
) -> tuple[int | None, float, float, int, str]:
    """One child process ``python -m biaslab ARGS``, reaped with os.wait4 for its own rusage: (exit status or None
    when killed at the timeout, wall s, user + sys CPU s, peak RSS bytes, output)."""
    cmd = [sys.executable, "-m", "biaslab", *args]
    with tempfile.TemporaryFile() as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=ROOT)
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if timeout_s is not None and time.perf_counter() - t0 > timeout_s:
                proc.kill()
                timed_out = True
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # (so that Popen does not wait for it again)
        log.seek(0)
        out = log.read().decode(errors="replace")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: KiB on Linux, bytes on macOS
    code = None if timed_out else proc.returncode
    return code, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * scale, out


@dataclass
class Targets:
    """Targets printed beside their measurements at the end of a benchmark."""

    rows: list[tuple[str, str, str, bool | None]] = field(default_factory=list)

    def add(self, what: str, measured: str, target: str, met: bool | None) -> None:
        """``met`` None: not comparable in this run (e.g. --quick sizes)."""
        self.rows.append((what, measured, target, met))

    def print(self) -> None:
        print("-- targets (goals, not tests: the exit status is 0 either way)")
        for what, measured, target, met in self.rows:
            verdict = "n/a (other sizes)" if met is None else ("met" if met else "MISSED")
            print(f"  {what:<44} {measured:>22}   target {target:<20} {verdict}")
        sys.stdout.flush()


def base_parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="small sizes (a few seconds); targets not compared")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats after warm-up (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up calls (default 1)")
    ap.add_argument(
        "--threads",
        default="",
        help="torch intra-op threads for in-process timings: an int, or 'auto' for biaslab's policy "
        "(biaslab.engines.threads); default: leave torch (and biaslab's engines) as they are",
    )
    return ap


def apply_threads(spec: str, work: int | None = None) -> None:
    """--threads: an int sets torch's count; 'auto' applies biaslab's thread policy for ``work`` elements."""
    if not spec:
        return
    if spec == "auto":
        from biaslab.engines.threads import thread_policy

        thread_policy(work)
    else:
        torch.set_num_threads(int(spec))
