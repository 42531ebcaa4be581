"""Benchmark Monte Carlo: throughput (samples per CPU-second) and memory per sample of the neural toy V=50, T=20.

Measured (public API only: ``biaslab.engines.montecarlo.MonteCarloEngine``, ``biaslab.make_config``, the CLI):
  * in process: ``MonteCarloEngine.sample`` and ``sample_grads`` of k3 in reward + loss on n samples;
  * the process ``biaslab check biaslab.core.estimators:k3 --placement both --mode mc --vocab 50 --length 20
    --models 1 --samples n`` at two sizes n1 < n2: wall, CPU and peak RSS (``os.wait4``; tracemalloc does not see
    torch's tensor memory). The RSS slope (rss(n2) - rss(n1)) / (n2 - n1) is the memory per sample; extrapolated to
    1,000,000 samples it is compared with the target. The check streams samples in chunks of 4,096, so both sizes
    must be at least two chunks: below that the slope measures the chunks filling up (and the allocator's first
    high-water marks), not storage per sample (250 vs 1,000 samples read 163 KiB/sample, 4,096 vs 8,192 about
    20 KiB/sample; 8,192 vs 24,576 about 2 KiB/sample).
    (The toy is not enumerable, so the check also samples the reference directions.)
Target (issue #13): ``check --mode mc --vocab 50 --length 20 --samples 1000000`` within 24 GiB.

    python benchmarks/mc.py [--quick] [--samples 1000] [--cli-samples 8192,24576] [--threads auto|1|2] [--no-cli]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Targets, apply_threads, base_parser, fmt_bytes, header, measure, measure_cli  # noqa: E402

from biaslab import make_config, make_pair  # noqa: E402
from biaslab.engines.montecarlo import MonteCarloEngine  # noqa: E402

TARGET_SAMPLES = 1_000_000
TARGET_BYTES = 24 * 2**30


def main() -> None:
    ap = base_parser(__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=1000, help="in-process samples per timed call (default 1000)")
    ap.add_argument("--cli-samples", default="8192,24576",
                    help="the two CLI sizes n1,n2, both >= two streaming chunks of 4096 (default 8192,24576)")
    ap.add_argument("--no-cli", action="store_true", help="skip the CLI memory measurement")
    args = ap.parse_args()
    V, T = (10, 5) if args.quick else (50, 20)
    n = 200 if args.quick else args.samples
    n1, n2 = (50, 200) if args.quick else (int(s) for s in args.cli_samples.split(","))
    apply_threads(args.threads, n * T * V)
    header(f"Monte Carlo, neural toy V={V}, T={T}", args)
    targets = Targets()

    policy, ref = make_pair("neural", V, T, seed=0, kl_scale=0.5)
    mc = MonteCarloEngine(policy, ref)
    config = make_config("k3", "both", "token", "rtg")
    gen = torch.Generator().manual_seed(0)
    samp = measure(f"sample {n} sequences", lambda: mc.sample(n, gen), repeats=args.repeats, warmup=args.warmup)
    grads = measure(f"sample_grads {n} samples, P={mc.n_params}", lambda: mc.sample_grads(config, n, gen),
                    repeats=args.repeats, warmup=args.warmup)
    print(f"{'sampling throughput':<46} {n / samp.cpu_min:10.0f} samples/CPU-s  {n / samp.min:10.0f} samples/s")
    print(f"{'gradient throughput (sampling included)':<46} {n / grads.cpu_min:10.0f} samples/CPU-s"
          f"  {n / grads.min:10.0f} samples/s")

    if not args.no_cli:
        runs = {}
        for m in (n1, n2):
            cli = ["check", "biaslab.core.estimators:k3", "--placement", "both", "--mode", "mc", "--vocab", str(V),
                   "--length", str(T), "--models", "1", "--samples", str(m)]
            runs[m] = measure_cli(f"process: check --mode mc --samples {m}", cli, repeats=1, warmup=0)
        a, b = runs[n1], runs[n2]
        per_sample = max(b.peak_rss - a.peak_rss, 0) / (n2 - n1)
        cpu_rate = (n2 - n1) / max(b.cpu_min - a.cpu_min, 1e-9)
        projected = a.peak_rss + per_sample * (TARGET_SAMPLES - n1)
        print(f"{'check: memory per sample (RSS slope)':<46} {fmt_bytes(per_sample):>12}/sample")
        print(f"{'check: marginal throughput':<46} {cpu_rate:10.1f} samples/CPU-s  (start-up excluded)")
        print(f"{'check: projected peak RSS at 1e6 samples':<46} {fmt_bytes(projected):>12}  "
              f"(projected CPU {(TARGET_SAMPLES / cpu_rate) / 3600:.1f} h per model)")
        targets.add("check --mode mc 1e6 samples, peak memory", fmt_bytes(projected), "<= 24 GiB",
                    projected <= TARGET_BYTES if not args.quick else None)
    targets.print()


if __name__ == "__main__":
    main()
