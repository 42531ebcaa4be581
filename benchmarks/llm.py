"""Speed of the real-LLM statistics pass (``biaslab.llm``), as ratios to baselines measured in the same run.

For one batch of B responses of L tokens the statistics pass scores them under pi_ref and pi_theta and computes
the per-sample gradient of every configuration (plus the reference and the token-level forward direction) on the
parameter subset. It is compared with

* one plain forward + backward of the same batch (the cost of a training step's KL term, no per-sample gradients);
* the naive per-sample loop: the same per-sample gradients from one backward pass per sample and configuration.

Prints sequences/s and tokens/s of each, the ratios, and the device (the GPU's name when one is used).

    python benchmarks/llm.py                                # tiny random Llama, CPU (or CUDA when available)
    python benchmarks/llm.py --model smollm2 --batch 8 --max-new-tokens 16 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import platform
import time

import torch


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"cuda: {torch.cuda.get_device_name(torch.device(device))}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    from biaslab.llm.policy import reference_mode
    from biaslab.llm.run import LLMOptions, _generate, build, masked_logp, sample_grads
    from biaslab.llm.sample import score_logits
    from biaslab.placements import TokenBatch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--params", default="lora")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=256, help="tiny random models only")
    args = ap.parse_args()

    opts = LLMOptions(model=args.model, samples=args.batch, batch_size=args.batch, max_new_tokens=args.max_new_tokens,
                      params=args.params, device=args.device, dtype=args.dtype, vocab_size=args.vocab,
                      prompt_length=8, progress=False)
    setup = build(opts, args.device)
    model, psg = setup.loaded.model, setup.psg
    gen = _generate(setup, opts, 0, args.batch, 1)
    n_seq, n_tok = args.batch, gen.n_tokens
    first_cfg = next(iter(setup.configs.values()))

    def plain() -> None:  # one forward + backward of one configuration's summed surrogate
        with torch.no_grad(), reference_mode(model):
            lr = torch.log_softmax(score_logits(model, gen, args.dtype), -1)
        for p in psg.subset.params:
            p.requires_grad_(True)
            p.grad = None
        lp = torch.log_softmax(score_logits(model, gen, args.dtype), -1)
        mask = gen.mask.to(lp.dtype)
        first_cfg.surrogate(TokenBatch(gen.completion, masked_logp(lp, lr.to(lp.dtype), mask), lr)).sum().backward()

    def stats_pass() -> dict:
        psg.subset.method = method
        return sample_grads(setup, gen, args.dtype)[0]

    method = psg.subset.method
    t_plain = timed(plain, args.device, args.repeats)
    t_stats = timed(stats_pass, args.device, args.repeats)
    fast = stats_pass()
    method = "loop"
    t_loop = timed(stats_pass, args.device, max(1, args.repeats // 2))
    slow = stats_pass()
    err = max(float((fast[k] - slow[k]).abs().max() / slow[k].abs().max().clamp_min(1e-30)) for k in fast)

    n_grads = len(fast)
    print(f"device: {device_name(args.device)}; model {args.model} ({setup.loaded.info['class']}), dtype {args.dtype}")
    print(f"batch {n_seq} sequences, {n_tok} response tokens; params {args.params}: {psg.subset.numel} numbers"
          + (f" projected on {psg.sketch.k}" if psg.sketch is not None else "")
          + f"; {n_grads} per-sample gradient sets ({len(setup.configs)} configurations + reference + forward-token)")
    rows = [("plain forward+backward (1 config)", t_plain), ("statistics pass (hooks)", t_stats),
            ("naive per-sample loop", t_loop)]
    for name, t in rows:
        print(f"  {name:36s} {t * 1e3:10.1f} ms  {n_seq / t:9.2f} seq/s  {n_tok / t:10.1f} tok/s")
    print(f"ratio statistics pass / plain forward+backward: {t_stats / t_plain:.2f}x the time "
          f"({t_stats / t_plain / n_grads:.2f}x per gradient set)")
    print(f"ratio naive per-sample loop / statistics pass: {t_loop / t_stats:.2f}x (speed-up of the hooks)")
    print(f"max relative difference hooks vs loop: {err:.2e}")


if __name__ == "__main__":
    main()
