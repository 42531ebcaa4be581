"""Speed and peak memory of the real-LLM statistics pass (``biaslab.llm``), as ratios to baselines measured in the
same run.

For one batch of B responses of L tokens the statistics pass scores them under pi_ref and pi_theta and computes
the per-sample gradient of every configuration and of the reference on the parameter subset (token coefficients
that coincide share one backward pass). It is compared with

* one plain forward + backward of the same batch (the cost of a training step's KL term, no per-sample gradients);
* the same pass with one backward pass from the logits per distinct cotangent (``--no-stacked``: the former path);
* the naive per-sample loop: the same per-sample gradients from one backward pass per sample and configuration.

The statistics pass (stacked) takes every cotangent through the output head analytically (one (B, L, V) matmul
shared by all token coefficients) and runs ONE batched backward pass from the hidden states for all gradient sets
(``torch.autograd.grad(..., is_grads_batched=True)``). Targets: throughput >= 0.3x a plain forward+backward
(time ratio <= 3.3x) and >= 8x the per-sample loop, on SmolLM2 with a batch of 16 (the defaults; ``--quick``: the
tiny random Llama, batch 8). Peak memory against ``--samples``: two ``biaslab llm --model tiny-random`` processes
(``--samples`` 256 and 1024), peak RSS from ``os.wait4``; the target is memory independent of ``--samples``.

Each is run once to warm up, then ``--repeats`` (>= 5) times; min and median are printed with sequences/s and
tokens/s, the thread setting, the device (the GPU's name when one is used) and peak memory: the CUDA allocator's
peak per phase on a GPU, the process's resident high-water mark (ru_maxrss, cumulative) on CPU.

    OMP_NUM_THREADS=1 python benchmarks/llm.py                      # SmolLM2, batch 16, CPU (a few minutes)
    OMP_NUM_THREADS=1 python benchmarks/llm.py --quick              # tiny random Llama (vocab 4096), batch 8
    python benchmarks/llm.py --model smollm2 --batch 8 --max-new-tokens 64 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Targets, fmt_bytes, measure_cli  # noqa: E402


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"cuda: {torch.cuda.get_device_name(torch.device(device))}"
    return f"cpu: {platform.processor() or platform.machine()}"


def peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def timed(fn, device: str, repeats: int) -> tuple[float, float, float]:
    """(min, median) seconds over ``repeats`` runs after one warm-up, and the phase's peak memory in GiB."""
    fn()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times), peak_memory_gib(device)


def main() -> None:
    from biaslab.core.placements import TokenBatch
    from biaslab.llm.run import LLMOptions, _generate, _ref_logp_full, build, masked_logp, parse_config, sample_grads
    from biaslab.llm.sample import score_logits

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="default smollm2 (tiny-random with --quick)")
    ap.add_argument("--batch", type=int, default=None, help="default 16 (8 with --quick)")
    ap.add_argument("--quick", action="store_true", help="the tiny random Llama, batch 8; targets not compared")
    ap.add_argument("--memory-samples", default="256,1024",
                    help="the two --samples of the peak-memory processes (tiny-random); empty: skip")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--params", default="auto")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--loop-repeats", type=int, default=1, help="repeats of the slow naive loop (after a warm-up)")
    ap.add_argument("--vocab", type=int, default=4096, help="tiny random models only")
    args = ap.parse_args()
    if args.repeats < 5:
        ap.error("--repeats must be >= 5")
    args.model = args.model or ("tiny-random" if args.quick else "smollm2")
    args.batch = args.batch or (8 if args.quick else 16)
    full_size = args.model == "smollm2" and args.batch == 16
    # the processes first: a child forked later would inherit this process's resident high-water mark (Linux keeps
    # ru_maxrss across fork and exec), so its peak would read as at least the loaded model's
    memory_row = None
    if args.memory_samples:
        n1, n2 = (int(x) for x in args.memory_samples.split(","))
        rss = {}
        for n in (n1, n2):
            run = measure_cli(f"process: biaslab llm --model tiny-random --samples {n}",
                              ["llm", "--model", "tiny-random", "--samples", str(n), "--no-progress", "--out",
                               f"/tmp/biaslab_bench_llm_{os.getpid()}_{n}"], repeats=1, warmup=0)
            rss[n] = run.peak_rss
        slope = (rss[n2] - rss[n1]) / (n2 - n1)
        print(f"peak RSS slope: {fmt_bytes(slope)}/sample (per-sample rows of every gradient set are kept for the "
              "paired bootstrap of the calibrated intervals)")
        memory_row = ("llm peak RSS vs --samples", f"{fmt_bytes(rss[n1])} -> {fmt_bytes(rss[n2])}",
                      "independent of n", slope <= 4096)

    opts = LLMOptions(model=args.model, samples=args.batch, batch_size=args.batch, max_new_tokens=args.max_new_tokens,
                      params=args.params, device=args.device, dtype=args.dtype, vocab_size=args.vocab,
                      prompt_length=8, progress=False)
    setup = build(opts, args.device)
    model, psg = setup.loaded.model, setup.psg
    gen = _generate(setup, opts, 0, args.batch, 1)
    n_seq, n_tok = args.batch, gen.n_tokens
    first = parse_config(opts.configs[0]).recipe

    def plain() -> None:  # one forward + backward of one configuration's summed surrogate
        lr = _ref_logp_full(setup, gen, args.dtype)
        for p in psg.subset.params:
            p.requires_grad_(True)
            p.grad = None
        lp = torch.log_softmax(score_logits(model, gen, args.dtype), -1)
        mask = gen.mask.to(lp.dtype)
        first.surrogate(TokenBatch(gen.completion, masked_logp(lp, lr.to(lp.dtype), mask), lr)).sum().backward()

    def stats_pass() -> dict:
        psg.subset.method = method
        return sample_grads(setup, gen, args.dtype, stacked=stacked)[0]

    method, stacked = psg.subset.method, True
    t_plain = timed(plain, args.device, args.repeats)
    t_stats = timed(stats_pass, args.device, args.repeats)
    fast = stats_pass()
    stacked = False
    t_seq = timed(stats_pass, args.device, args.repeats)
    seq = stats_pass()
    method = "loop"
    t_loop = timed(stats_pass, args.device, args.loop_repeats)
    slow = stats_pass()
    err = max(float((fast[k] - slow[k]).abs().max() / slow[k].abs().max().clamp_min(1e-30)) for k in fast)
    err_seq = max(float((fast[k] - seq[k]).abs().max() / seq[k].abs().max().clamp_min(1e-30)) for k in fast)

    n_grads = len(fast)
    print(f"device: {device_name(args.device)}; torch threads {torch.get_num_threads()} "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); model {args.model} "
          f"({setup.loaded.info['class']}, vocab {setup.loaded.vocab_size}), dtype {args.dtype}")
    print(f"batch {n_seq} sequences, {n_tok} response tokens; params {psg.subset.numel} numbers"
          + (f" projected on {psg.sketch.k}" if psg.sketch is not None else "")
          + f"; {n_grads} per-sample gradient sets ({len(setup.configs)} configurations + reference + forward-token)")
    print(f"  {'phase':36s} {'min ms':>10s} {'median ms':>10s} {'seq/s':>9s} {'tok/s':>10s} {'peak GiB':>9s}")
    for name, (t_min, t_med, mem) in (("plain forward+backward (1 config)", t_plain),
                                      ("statistics pass (stacked)", t_stats),
                                      ("statistics pass (1 backward/cotangent)", t_seq),
                                      ("naive per-sample loop", t_loop)):
        print(f"  {name:36s} {t_min * 1e3:10.1f} {t_med * 1e3:10.1f} {n_seq / t_med:9.2f} {n_tok / t_med:10.1f} "
              f"{mem:9.3f}")
    print(f"throughput statistics pass / plain forward+backward (medians): {t_plain[1] / t_stats[1]:.2f}x "
          f"(target >= 0.3x; {t_stats[1] / t_plain[1] / n_grads:.2f}x the time per gradient set)")
    print(f"stacked vs one backward per cotangent (medians): {t_seq[1] / t_stats[1]:.2f}x faster")
    print(f"throughput vs the naive per-sample loop (medians): {t_loop[1] / t_stats[1]:.2f}x (target >= 8x)")
    print(f"max relative difference stacked vs per-cotangent: {err_seq:.2e}; stacked vs loop: {err:.2e}")
    if not args.device.startswith("cuda"):
        print("peak memory on CPU is the process's resident high-water mark so far (cumulative over phases)")
    targets = Targets()
    ratio_plain, ratio_loop = t_plain[1] / t_stats[1], t_loop[1] / t_stats[1]
    what = f"{args.model}, batch {args.batch}"
    targets.add(f"stats pass / plain fwd+bwd ({what})", f"{ratio_plain:.2f}x", ">= 0.3x",
                ratio_plain >= 0.3 if full_size else None)
    targets.add(f"stats pass / per-sample loop ({what})", f"{ratio_loop:.2f}x", ">= 8x",
                ratio_loop >= 8 if full_size else None)
    if memory_row is not None:
        targets.add(*memory_row)
    targets.print()


if __name__ == "__main__":
    main()
