"""Benchmark the largest enumeration: one exact check on the tabular toy V=2, T=23 (8,388,608 sequences).

Measured (the CLI only): the process ``biaslab check biaslab.core.estimators:k3 --placement loss --models 1 --model
tabular --vocab 2 --length 23`` (the configuration and the k1-in-reward baseline its variance ratio needs: two
configurations, the truths, every verdict): wall, CPU and peak RSS (``os.wait4``). Its (N, T, V) float64 arrays
would take 3.1 GiB each, beyond the engine's default 4 GiB budget for all of them, so the engine processes the
sequences in chunks with running sums (README "Limits").
Target (issue #13): V=2, T=23 or V=4, T=12 (>= 8M sequences) completes within 24 GiB and 10 minutes.

    python benchmarks/large.py [--quick] [--vocab 2] [--length 23] [--timeout 900]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Targets, apply_threads, base_parser, fmt_bytes, fmt_s, header, measure_cli  # noqa: E402

TARGET_S = 600
TARGET_BYTES = 24 * 2**30


def main() -> None:
    ap = base_parser(__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=2)
    ap.add_argument("--length", type=int, default=23)
    ap.add_argument("--timeout", type=float, default=900.0, help="kill the process after it (default 900 s)")
    args = ap.parse_args()
    V, T = (2, 16) if args.quick else (args.vocab, args.length)
    apply_threads(args.threads, V**T * T * V)
    header(f"largest enumeration: tabular V={V}, T={T}, N={V**T:,} sequences", args)
    cli = ["check", "biaslab.core.estimators:k3", "--placement", "loss", "--models", "1", "--model", "tabular",
           "--vocab", str(V), "--length", str(T), "--no-progress"]
    run = measure_cli(f"process: check k3 in loss, V={V} T={T}", cli, repeats=1, warmup=0, timeout_s=args.timeout)
    timed_out = "TIMED OUT" in run.note
    full_size = V**T >= 8_000_000
    targets = Targets()
    targets.add(f"{V**T / 1e6:.1f}M sequences, wall", fmt_s(run.min).strip() + (" (timed out)" if timed_out else ""),
                "<= 10 min", (run.min <= TARGET_S and not timed_out) if full_size else None)
    targets.add(f"{V**T / 1e6:.1f}M sequences, peak RSS", fmt_bytes(run.peak_rss), "<= 24 GiB",
                run.peak_rss <= TARGET_BYTES if full_size else None)
    targets.print()


if __name__ == "__main__":
    main()
