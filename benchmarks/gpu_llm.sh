#!/usr/bin/env bash
# Self-contained GPU check of `biaslab llm` (issue #12): no network, no files beyond the repository.
#
# Builds a random Llama from a config with a realistic vocabulary (49152, SmolLM2's) in a temporary folder, then
#   1. `biaslab llm` with n = 2048 main samples (+ 1024 for the directions, 1024 from pi_ref), bf16 autocast of the
#      trunk with the head / log_softmax / KLs in float32, target sequence KL 0.5 nats;
#   2. that policy on 512 samples in float32 and in bf16 (same random streams): KLs against the reported floor;
#   3. benchmarks/llm.py: throughput (min/median of 5) and peak memory of the statistics pass.
# Writes llm.{png,csv,json}, cmp_float32.json, cmp_bfloat16.json, bench.txt, summary.txt, log.txt under $OUT (default ./gpu_llm_out), and
# prints the summary: the card, throughput, peak memory, and k3 in the loss's relative bias with its CI.
#
#   bash benchmarks/gpu_llm.sh            # GPU (cuda), about 5 minutes on one H100
#   bash benchmarks/gpu_llm.sh --tiny     # CPU, small sizes (a minute or two), to test the script itself
# Needs python3 with torch, transformers, scipy, matplotlib, tqdm, safetensors (the GPU image has them). Run from
# the repository root; no `pip install` is needed (PYTHONPATH points at the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_llm_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec > >(tee "$OUT/log.txt") 2>&1

if [[ "${1:-}" == "--tiny" ]]; then
  DEVICE=cpu; VOCAB=4096; HIDDEN=64; LAYERS=2; HEADS=2; SAMPLES=64; DIRS=32; FP32_SAMPLES=32; BATCH=16; LEN=16
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  DEVICE=cuda; VOCAB=49152; HIDDEN=576; LAYERS=8; HEADS=9; SAMPLES=2048; DIRS=1024; FP32_SAMPLES=512; BATCH=64; LEN=64
fi
MODEL=$(mktemp -d)/tiny-llama
"$PY" - "$MODEL" "$VOCAB" "$HIDDEN" "$LAYERS" "$HEADS" <<'PYEOF'
import sys, torch, transformers
path, vocab, hidden, layers, heads = sys.argv[1], *map(int, sys.argv[2:])
cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 3),
                               max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1,
                               pad_token_id=1, initializer_range=0.08)
torch.manual_seed(0)
transformers.LlamaForCausalLM(cfg).save_pretrained(path)
print(f"built a random Llama: vocab {vocab}, hidden {hidden}, {layers} layers -> {path}")
PYEOF

COMMON=(--model "$MODEL" --device "$DEVICE" --batch-size "$BATCH" --max-new-tokens "$LEN" --params lora --no-eos
        --no-progress)
echo "== 1. biaslab llm, bf16 autocast (fp32 head), n = $SAMPLES"
"$PY" -m biaslab llm "${COMMON[@]}" --target-kl 0.5 --samples "$SAMPLES" --direction-samples "$DIRS" --dtype bfloat16 \
  --out "$OUT"
SIGMA=$("$PY" -c "import json,sys; p=json.load(open(sys.argv[1]))['policy']; print(p['perturb'] * p['target_kl']['scale'])" "$OUT/llm.json")
echo "== 2. the same policy (LoRA sigma $SIGMA) on $FP32_SAMPLES samples, float32 and bf16: same random streams"
for DT in float32 bfloat16; do
  "$PY" -m biaslab llm "${COMMON[@]}" --perturb "$SIGMA" --samples "$FP32_SAMPLES" --direction-samples 64 \
    --dtype "$DT" --configs k3:loss --bootstrap 500 --out "" --format json > "$OUT/cmp_$DT.json"
done
echo "== 3. benchmark of the statistics pass"
"$PY" benchmarks/llm.py --model "$MODEL" --device "$DEVICE" --batch "$BATCH" --max-new-tokens "$LEN" \
  --dtype bfloat16 --params lora --repeats 5 | tee "$OUT/bench.txt"

"$PY" - "$OUT" <<'PYEOF' | tee "$OUT/summary.txt"
import json, sys
out = sys.argv[1]
bf = json.load(open(f"{out}/llm.json"))
c32, c16 = json.load(open(f"{out}/cmp_float32.json")), json.load(open(f"{out}/cmp_bfloat16.json"))
t = bf["timing"]
total = sum(bf["samples"].values())
print(f"device: {t.get('gpu', t['device'])}; torch threads {t['threads']}")
print(f"samples: {bf['samples']} in {t['seconds_rank0']:.1f} s = {total / t['seconds_rank0']:.1f} responses/s "
      f"(sample + score + all per-sample gradients); peak GPU memory {t.get('peak_gpu_memory_gib', float('nan')):.2f} GiB")
kl = bf["sequence_kl"]
print(f"sequence KL (n = {bf['samples']['main']}, bf16) {kl['mean']:.4f} +- {kl['se']:.2g}; numeric floor "
      f"{bf['numeric_floor']['nats']:.3g} nats (max per-sequence error of bf16 against float32)")
a, b = c32["sequence_kl"]["mean"], c16["sequence_kl"]["mean"]
fl = c16["numeric_floor"]["nats"]
print(f"same policy and streams, n = {c32['samples']['main']}: KL float32 {a:.5f}, bf16 {b:.5f}, |difference| "
      f"{abs(a - b):.3g} nats {'<=' if abs(a - b) <= fl else '>'} the bf16 run's floor {fl:.3g}")
for r in bf["configs"]:
    if r["config"] == "k3:loss:token":
        print(f"k3 in loss: relative bias along grad KL {r['rel_bias_along_reference']:+.3f} "
              f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}], toward the token-level forward KL "
              f"{r['rel_bias_toward_forward_token']:+.3f} [{r['toward_ci_low']:+.3f}, {r['toward_ci_high']:+.3f}], "
              f"|b|/|r| {r['rel_bias_norm']:.3f} [{r['rel_bias_norm_ci_low']:.3f}, {r['rel_bias_norm_ci_high']:.3f}], "
              f"p (Holm) {r['p_value']:.2g}: {r['verdict']}")
for w in bf["warnings"]:
    print("warning:", w)
PYEOF
echo "results in $OUT"
