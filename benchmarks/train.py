"""Benchmark ``biaslab train``: steps per second of the exact expected-update flow and of Monte Carlo training.

* exact flow, V=3 T=4 tabular toy (81 sequences): one enumeration and one step function reused for every step;
  target: 20,000 steps in a few seconds;
* baseline measured in the same run: rebuilding ``ExactEngine`` and calling ``expected_grad`` at every step;
* Monte Carlo: all seeds as one batched tensor (N = 8 samples per seed and step).

Each measurement: one warm-up, then ``--repeats`` (>= 5) timed repeats; min and median are printed with the thread
setting (set OMP_NUM_THREADS=1 on shared machines).

    python benchmarks/train.py [--steps 2000] [--repeats 5] [--seeds 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from biaslab import ExactEngine, TabularAR, make_config, make_pair
from biaslab.workflows.train import ExactFlow, MonteCarloTrainer, TabularProblem, parse_config, parse_reward


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def report(name: str, times: list[float], steps: int) -> float:
    best, med = min(times), statistics.median(times)
    print(
        f"{name:44s} {steps / best:10.0f} steps/s (min {best * 1e3:8.1f} ms, median {med * 1e3:8.1f} ms "
        f"for {steps} steps)"
    )
    return steps / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=64)
    args = ap.parse_args()
    repeats = max(5, args.repeats)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()} (OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}), {args.repeats} repeats after one warm-up"
    )

    policy, ref = make_pair("tabular", 3, 4, seed=0)
    reward = parse_reward("binary:10", 3, 4, seed=0)
    problem = TabularProblem(ref, reward)
    start = problem.stack([lvl.detach() for lvl in policy.levels])
    rates = {}
    for spec in ("k1:reward", "k3:loss", "k3:both"):
        flow = ExactFlow(problem, parse_config(spec), 0.3)

        def run(flow=flow) -> None:
            flow.run(start, steps=args.steps, tol=0.0, record=False)

        rates[spec] = report(f"exact flow {spec} (V=3, T=4)", timed(run, repeats), args.steps)

    # baseline: a fresh engine each step (enumeration and forward pass rebuilt every time)
    config = make_config("k1", "reward")
    naive_steps = max(20, args.steps // 50)

    def naive() -> None:
        levels = [lvl.detach().clone() for lvl in policy.levels]
        for _ in range(naive_steps):
            model = TabularAR(levels)
            g = ExactEngine(model, ref).expected_grad(config)
            offset = 0
            for lvl in levels:
                n = lvl.numel()
                lvl -= 0.3 * g[offset : offset + n].view_as(lvl)  # only the KL part; speed, not dynamics
                offset += n

    naive_rate = report("baseline: new ExactEngine each step (k1:reward)", timed(naive, repeats), naive_steps)

    mc = MonteCarloTrainer(problem, parse_config("k3:reward"), 1.0, samples=8, seeds=args.seeds, lr=0.1)
    mc_steps = max(20, args.steps // 10)
    mc_rate = report(
        f"mc k3:reward, {args.seeds} seeds x 8 samples", timed(lambda: mc.run(start, mc_steps), repeats), mc_steps
    )
    print(
        f"\n20,000 exact steps (k1:reward): {20_000 / rates['k1:reward']:.2f} s; "
        f"{rates['k1:reward'] / naive_rate:.1f}x the rebuild-each-step baseline; "
        f"mc: {mc_rate * args.seeds:.0f} seed-steps/s"
    )


if __name__ == "__main__":
    main()
