"""The same answers under every kernel dispatch and thread count this CPU offers (``make test-portable``).

    python tests/portable/run.py                    # every variant; exit 1 on any difference
    python tests/portable/run.py --write-reference  # rewrite tests/portable/reference.json from this machine

Variants: ATEN_CPU_CAPABILITY = ``default`` (plain C++ kernels, no SIMD) and this machine's best (avx512, avx2,
...), times 1 and 2 intra-op threads (BIASLAB_THREADS and OMP_NUM_THREADS), plus the fingerprint alone at the
levels in between (avx2 on an AVX-512 machine). In each variant, in a fresh process:

1. the fingerprint (``fingerprint.py``): exact engine rows, every framework default's audit, seeded Monte Carlo
   checks, compared with the committed ``tests/portable/reference.json``;
2. ``biaslab figures`` into a temporary folder, compared with the committed ``figures/`` cell by cell;
3. the fast test selection (engines, verdicts, statistics, oracles, audit, training), which must pass.

Tolerances are ``compare.py``'s. The fingerprint and figures of every variant are left in ``--out`` for a look.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
from compare import compare_figures, compare_fingerprints  # noqa: E402

REFERENCE = HERE / "reference.json"
FAST_TESTS = [f"tests/{name}.py" for name in (
    "test_verdicts", "test_exact", "test_stats", "test_roundoff", "test_group_oracle", "test_eos_offpolicy_oracle",
    "test_estimators", "test_recipes", "test_montecarlo", "test_audit", "test_train", "test_toy",
)]


def best_capability() -> str:
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                         capture_output=True, text=True, check=True, env={**os.environ, "ATEN_CPU_CAPABILITY": ""})
    return out.stdout.strip().lower()


def variants(threads: list[int]) -> list[tuple[str, int]]:
    caps = ["default"] + ([best_capability()] if best_capability() != "default" else [])
    return [(c, t) for c in caps for t in threads]


def between(best: str) -> list[str]:
    """Kernel levels between ``default`` and ``best`` (avx2 on an AVX-512 CPU): checked by the fingerprint alone."""
    return ["avx2"] if best == "avx512" else []


def variant_env(cap: str, threads: int) -> dict[str, str]:
    return {**os.environ, "ATEN_CPU_CAPABILITY": cap, "BIASLAB_THREADS": str(threads),
            "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONHASHSEED": "0"}


def run(cmd: list[str], env: dict[str, str], what: str) -> bool:
    t = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    ok = res.returncode == 0
    print(f"    {what}: {'ok' if ok else f'FAILED (exit {res.returncode})'} ({time.perf_counter() - t:.0f} s)",
          flush=True)
    if not ok:
        print((res.stdout + res.stderr)[-4000:])
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for each variant's outputs (default: temporary)")
    ap.add_argument("--threads", default="1,2", help="thread counts to try (default 1,2)")
    ap.add_argument("--no-figures", action="store_true", help="skip regenerating the figures")
    ap.add_argument("--no-tests", action="store_true", help="skip the fast test selection")
    ap.add_argument("--write-reference", action="store_true", help="write reference.json from this machine's best "
                    "kernels on one thread, then compare every variant with it")
    args = ap.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="biaslab-portable-"))
    todo = variants([int(t) for t in args.threads.split(",")])
    print(f"biaslab portability: {len(todo)} variants (ATEN_CPU_CAPABILITY x threads: "
          f"{', '.join(f'{c}/{t}' for c, t in todo)}); outputs in {out}", flush=True)
    if args.write_reference:
        cap = todo[-1][0]
        if not run([sys.executable, str(HERE / "fingerprint.py"), str(REFERENCE)], variant_env(cap, 1),
                   f"reference ({cap}, 1 thread)"):
            return 1
    reference = json.loads(REFERENCE.read_text())
    failures: list[str] = []
    for cap, threads in todo:
        name = f"{cap}-{threads}t"
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        env = variant_env(cap, threads)
        print(f"  {name}", flush=True)
        if run([sys.executable, str(HERE / "fingerprint.py"), str(d / "fingerprint.json")], env, "fingerprint"):
            diffs = compare_fingerprints(reference, json.loads((d / "fingerprint.json").read_text()))
            failures += [f"{name}: {x}" for x in diffs]
            print(f"      against reference.json: {len(diffs)} differences", flush=True)
        else:
            failures.append(f"{name}: fingerprint failed")
        if not args.no_figures:
            if run([sys.executable, "-m", "biaslab", "figures", "--out", str(d / "figures"), "--no-progress"], env,
                   "figures"):
                diffs = compare_figures(d / "figures", ROOT / "figures")
                failures += [f"{name}: {x}" for x in diffs]
                print(f"      against figures/: {len(diffs)} differences", flush=True)
            else:
                failures.append(f"{name}: figures failed")
        if not args.no_tests and not run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                          *FAST_TESTS], env, "fast tests"):
            failures.append(f"{name}: fast tests failed")
    for cap in between(todo[-1][0]):
        d = out / f"{cap}-1t"
        d.mkdir(parents=True, exist_ok=True)
        print(f"  {cap}-1t", flush=True)
        if run([sys.executable, str(HERE / "fingerprint.py"), str(d / "fingerprint.json")], variant_env(cap, 1),
               "fingerprint"):
            diffs = compare_fingerprints(reference, json.loads((d / "fingerprint.json").read_text()))
            failures += [f"{cap}-1t: {x}" for x in diffs]
            print(f"      against reference.json: {len(diffs)} differences", flush=True)
        else:
            failures.append(f"{cap}-1t: fingerprint failed")
    for f in failures[:60]:
        print("  DIFF", f)
    print(f"biaslab portability: {'OK' if not failures else f'{len(failures)} differences'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
