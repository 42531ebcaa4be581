"""Benchmark the exact engine: the full table for V = 4, T = 8 (65,536 sequences, every row, with variances).

Baselines measured in the same run:
  (a) the naive per-sequence autograd loop (one forward + backward per sequence and configuration), timed on a
      random subset of sequences and scaled linearly to all of them;
  (b) one vectorized forward pass over all sequences (the policy's next-token log-probabilities, (N, T, V)).
Targets (2 CPU cores): >= 100x faster than (a); the table within 20x of (b); under 10 s. Ratios print last.

    python benchmarks/exact.py [--vocab 4] [--length 8] [--subset 200]
"""

from __future__ import annotations

import argparse
import time

import torch

from biaslab import ExactEngine, all_configs, make_pair
from biaslab.exact import enumerate_sequences
from biaslab.placements import TokenBatch


def best_of(fn, repeats=3):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def naive_loop(policy, ref, configs, seqs):
    params = list(policy.parameters())
    for y in seqs:
        y = y[None]
        lp = policy.log_probs(y)
        with torch.no_grad():
            lr = ref.log_probs(y)
        batch = TokenBatch(y, lp, lr)
        for cfg in configs:
            g = torch.autograd.grad(cfg.surrogate(batch)[0], params, retain_graph=True)
            float(sum((x * x).sum() for x in g))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=4)
    ap.add_argument("--length", type=int, default=8)
    ap.add_argument("--subset", type=int, default=200)
    args = ap.parse_args()
    V, T = args.vocab, args.length
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; V={V}, T={T}, N={V**T}")
    policy, ref = make_pair("tabular", V, T, seed=0, kl_scale=0.5)
    configs = all_configs(("k1", "k2", "k3", "abs"))
    tokens = enumerate_sequences(V, T)

    t_fwd = best_of(lambda: policy.log_probs_enumerated(tokens))

    def table():
        engine = ExactEngine(policy, ref)
        engine.truths()
        return engine.evaluate_all(configs)

    t_table = best_of(table)
    g = torch.Generator().manual_seed(0)
    subset = tokens[torch.randperm(tokens.shape[0], generator=g)[: args.subset]]
    t_sub = best_of(lambda: naive_loop(policy, ref, configs, subset), repeats=1)
    t_naive = t_sub * tokens.shape[0] / args.subset

    print(f"rows: {len(configs)} configurations")
    print(f"one vectorized forward pass:   {t_fwd * 1e3:9.1f} ms")
    print(f"naive loop ({args.subset} seqs, scaled): {t_naive:9.1f} s   (measured {t_sub:.2f} s)")
    print(f"exact table (all rows):        {t_table:9.3f} s")
    print(f"speed-up over naive loop:      {t_naive / t_table:9.0f}x   (target >= 100x)")
    print(f"table / one forward pass:      {t_table / t_fwd:9.1f}x   (target <= 20x)")
    print(f"table wall time:               {t_table:9.3f} s   (target < 10 s)")


if __name__ == "__main__":
    main()
