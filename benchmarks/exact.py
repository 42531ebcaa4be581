"""Benchmark the exact engine: the full table (every configuration of k1, k2, k3, abs: 40 rows, with variances).

Measured (public API only: ``biaslab.workflows.table.exact_table``, ``biaslab.make_pair``,
``biaslab.enumerate_sequences``):
  * one vectorized forward pass over all V**T sequences (the tabular policy's next-token log-probabilities,
    ``log_probs_enumerated``, (N, T, V)), the yardstick of the tabular target;
  * the tabular table, V=4, T=8 (65,536 sequences);
  * the neural table, V=4, T=8 (torch.func per-sample gradients), as one ``biaslab table --model neural`` process
    (start-up included; killed at --neural-timeout, then reported as timed out).
Targets (issue #13): tabular table <= 20x one forward pass and < 1 s wall; neural table <= 30 s.

    python benchmarks/exact.py [--quick] [--repeats 5] [--threads auto|1|2] [--no-neural] [--neural-timeout 45]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Targets, apply_threads, base_parser, fmt_s, header, measure, measure_cli  # noqa: E402

from biaslab import enumerate_sequences, make_pair  # noqa: E402
from biaslab.workflows.table import exact_table  # noqa: E402

ESTIMATORS = ["k1", "k2", "k3", "abs"]


def main() -> None:
    ap = base_parser(__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=4)
    ap.add_argument("--length", type=int, default=8)
    ap.add_argument("--no-neural", action="store_true", help="skip the neural table")
    ap.add_argument("--neural-timeout", type=float, default=45.0, help="kill the neural table after it (default 45 s)")
    ap.add_argument("--budget", type=float, default=15.0, help="seconds of timed tabular-table repeats (default 15)")
    args = ap.parse_args()
    V, T = (3, 4) if args.quick else (args.vocab, args.length)
    full_size = (V, T) == (4, 8)
    apply_threads(args.threads, V**T * T * V)
    header(f"exact engine, V={V}, T={T}, N={V**T} sequences", args)
    targets = Targets()

    policy, ref = make_pair("tabular", V, T, seed=0, kl_scale=0.5)
    tokens = enumerate_sequences(V, T)  # (N, T)
    fwd = measure("one vectorized forward pass (tabular)", lambda: policy.log_probs_enumerated(tokens),
                  repeats=max(args.repeats, 20), warmup=args.warmup + 2)
    rows = len(exact_table(policy, ref, ESTIMATORS)[1])
    tab = measure(f"tabular table ({rows} rows)", lambda: exact_table(policy, ref, ESTIMATORS),
                  repeats=args.repeats, warmup=args.warmup, budget_s=args.budget)
    ratio = tab.min / fwd.min
    print(f"{'tabular table / one forward pass':<46} {ratio:8.1f}x  (min / min)")
    targets.add("tabular table / one forward pass", f"{ratio:.1f}x", "<= 20x", ratio <= 20 if full_size else None)
    targets.add("tabular table wall (min)", fmt_s(tab.min).strip(), "< 1 s", tab.min < 1 if full_size else None)

    if not args.no_neural:
        # one `biaslab table --model neural` process (a process per repeat would not fit the time budget of the
        # default run), killed at --neural-timeout (the engine may take minutes)
        cli = ["table", "--model", "neural", "--vocab", str(V), "--length", str(T), "--kl-scale", "0.5",
               "--estimators", ",".join(ESTIMATORS), "--format", "csv"]
        neu = measure_cli("process: biaslab table --model neural", cli, repeats=1,
                          warmup=0, timeout_s=args.neural_timeout, ok_status=(0,))
        shown = fmt_s(neu.min).strip() + (" (timed out)" if "TIMED OUT" in neu.note else "")
        targets.add("neural table, whole process (wall)", shown, "<= 30 s", neu.min <= 30 if full_size else None)
    targets.print()


if __name__ == "__main__":
    main()
