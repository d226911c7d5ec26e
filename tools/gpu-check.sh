#!/usr/bin/env bash
# The prepared GPU check of laco-train (docs/gpu.md): given a laco-train binary
# built with `--features cuda`, on one GPU it
#   a. checks CUDA parity on the bundled tiny Qwen3: `eval --task ppl` in f32 (1e-4 relative of
#      transformers' golden) and bf16 (1%), MMLU log-likelihoods of 3 questions (f32 1e-4, bf16 0.1);
#   b. makes a Qwen3-8B-shaped checkpoint with random weights (bf16, sharded, the Qwen3 tokenizer)
#      with torch on the GPU;
#   c. runs `prune` with the model card's LaCo settings (threshold 0: random weights, and the
#      flagship's 36 -> 26 layers), then `bench` with configs/distill-qwen3-8b.toml's LoRA and loss
#      at batch 4 x 1024 tokens (12 steps, 2 of warm-up): tokens/s, GPU memory;
#   d. runs the same step in PyTorch + PEFT (transformers, sdpa, bf16, same shapes) for the ratio;
#   e. writes every figure to one JSON file, $OUT/gpu-check.json (and the logs beside it).
# Needs: bash, python3 with torch, transformers, peft and safetensors; nvidia-smi for the memory
# of the whole device; no Rust toolchain and no network. Runs from anywhere; the repository (its
# fixtures, configs and datasets) is the one this script is in.
#
#   tools/gpu-check.sh --bin target/release/laco-train [--out DIR] [--device cuda:0] [--python python3]
#   tools/gpu-check.sh --bin target/debug/laco-train --dry-run     # on a CPU, small shapes
#
# --dry-run runs every step on the CPU with a small model (hidden 64, the same 36 layers and
# vocabulary), batch 2 x 128 and 3 steps, to test the script before GPU time is spent.
# The bench runs three times: with layer recompute (activation checkpointing, the GPU default),
# without it (--activation-checkpointing false), for memory and speed side by side, and with
# `--generic-ops` (burn's decomposed attention instead of the flash attention kernels of
# src/kernels/cube): the kernels' parity on the GPU (the same final loss) and their memory saving. --mpi (a binary built with
# `--features cuda,mpi`, and Open MPI's mpirun) adds the bench as one rank under `mpirun -n 1`:
# the gradients go through the NCCL all-reduce; its loss must equal the plain bench's.
# --keep keeps the checkpoints under $OUT/work.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
HELPERS="$REPO/tools/gpu_check"
BIN="" OUT="${OUT:-}" DEVICE="cuda:0" PY="python3" DRY=0 KEEP=0 MPI=0
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) BIN="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --device) DEVICE="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --keep) KEEP=1; shift ;;
    --mpi) MPI=1; shift ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "gpu-check: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$BIN" ] || { echo "gpu-check: --bin PATH (a laco-train built with --features cuda) is required" >&2; exit 2; }
[ -x "$BIN" ] || { echo "gpu-check: $BIN is not an executable" >&2; exit 2; }
BIN="$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")"
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$OUT/work"
mkdir -p "$WORK"
"$PY" -c "import torch, transformers, peft, safetensors" \
  || { echo "gpu-check: $PY lacks torch, transformers, peft or safetensors" >&2; exit 2; }

if [ "$DRY" = 1 ]; then
  DEVICE=cpu SHAPE=small BATCH=2 SEQ=128 STEPS=3 WARMUP=1 TORCH_DEVICE=cpu TORCH_DTYPE=float32
else
  SHAPE=qwen3-8b BATCH=4 SEQ=1024 STEPS=12 WARMUP=2 TORCH_DEVICE="${DEVICE}" TORCH_DTYPE=bfloat16
fi
TINY="$REPO/tests/fixtures/tiny-qwen3"
GOLDEN="$REPO/tests/fixtures/golden"
STEP=0
measure() { # NAME CMD...: runs CMD under measure.py, its JSON line to $OUT/NAME.json
  local name="$1"; shift
  STEP=$((STEP + 1))
  echo "gpu-check [$STEP] $name: $*" >&2
  "$PY" "$HELPERS/measure.py" --log "$OUT/$name.log" -- "$@" > "$OUT/$name.json"
  "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); print('  rc', r['rc'], '%.1f s' % r['wall_s'])" "$OUT/$name.json" >&2
}

# a. parity on the tiny model (f32 and bf16): perplexity and MMLU log-likelihoods
for dtype in f32 bf16; do
  measure "ppl-$dtype" "$BIN" eval --task ppl --model "$TINY" \
    --text "$REPO/datasets/text_milton_areopagitica.txt" --max-tokens 4096 --window 256 \
    --device "$DEVICE" --dtype "$dtype" --json
  measure "mmlu-$dtype" "$BIN" eval --task mmlu --model "$TINY" --subjects abstract_algebra \
    --limit 3 --log-samples "$OUT/mmlu-$dtype.samples.jsonl" --device "$DEVICE" --dtype "$dtype" --json
done

# b. the Qwen3-8B-shaped checkpoint (bf16, sharded, random weights)
MODEL="$WORK/model"
measure make-model "$PY" "$HELPERS/make_model.py" --out "$MODEL" --shape "$SHAPE" \
  --tokenizer "$REPO/tests/fixtures/qwen3-tokenizer" --device "$TORCH_DEVICE" \
  $([ "$DRY" = 1 ] && echo --shard-gb 0.02)

# c. LaCo with the card's settings, then the distillation benchmark
STUDENT="$WORK/student"
measure prune "$BIN" prune --model "$MODEL" --out "$STUDENT" \
  --config "$REPO/configs/laco-qwen3-8b.toml" --threshold 0 --device "$DEVICE" --force --json
CONFIG="$WORK/distill.toml"
# configs/distill-qwen3-8b.toml with this checkpoint, the long plain-text rows (every row longer
# than 1024 tokens, so every batch is batch x seq tokens) and the check's batch.
sed -e "s|^base = .*|base = \"$MODEL\"|" \
    -e "s|\"\.\./|\"$REPO/|g" \
    -e "s|^files = .*|files = [\"$HELPERS/long-text.parquet\"]|" \
    -e "s|^weights = .*|weights = [1.0]|" \
    -e "s|^max_seq_len = .*|max_seq_len = $SEQ|" \
    -e "s|^batch_size = .*|batch_size = $BATCH|" \
    -e "s|^grad_accum = .*|grad_accum = 1|" \
    -e "s|^run_dir = .*|run_dir = \"$WORK/run\"|" \
    "$REPO/configs/distill-qwen3-8b.toml" > "$CONFIG"
measure bench "$BIN" bench --config "$CONFIG" --student "$STUDENT" --steps "$STEPS" \
  --warmup "$WARMUP" --device "$DEVICE" --out "$WORK/bench-run" --json
measure bench-kept "$BIN" bench --config "$CONFIG" --student "$STUDENT" --steps "$STEPS" \
  --warmup "$WARMUP" --device "$DEVICE" --out "$WORK/bench-kept-run" --activation-checkpointing false --json
measure bench-generic "$BIN" bench --config "$CONFIG" --student "$STUDENT" --steps "$STEPS" \
  --warmup "$WARMUP" --device "$DEVICE" --out "$WORK/bench-generic-run" --generic-ops --json
if [ "$MPI" = 1 ]; then
  # One rank (its own run directory); mpirun refuses root without these two variables.
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  measure bench-mpi mpirun -n 1 "$BIN" bench --config "$CONFIG" --student "$STUDENT" \
    --steps "$STEPS" --warmup "$WARMUP" --device "$DEVICE" --out "$WORK/bench-mpi-run" --json
fi

# d. the same step in PyTorch + PEFT
measure torch "$PY" "$HELPERS/torch_kd_step.py" --teacher "$MODEL" --student "$STUDENT" \
  --batch "$BATCH" --seq "$SEQ" --steps "$STEPS" --warmup "$WARMUP" \
  --device "$TORCH_DEVICE" --dtype "$TORCH_DTYPE"

# e. one JSON
"$PY" "$HELPERS/summarize.py" --out "$OUT" --golden "$GOLDEN" --dry-run "$DRY" \
  --binary "$BIN" --device "$DEVICE" > "$OUT/gpu-check.json"
[ "$KEEP" = 1 ] || rm -rf "$WORK"
echo "gpu-check: $OUT/gpu-check.json" >&2
"$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); print(json.dumps(r['checks'], indent=1)); sys.exit(0 if r['passed'] else 1)" "$OUT/gpu-check.json"
