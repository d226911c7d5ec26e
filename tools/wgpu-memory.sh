#!/bin/sh
# Peak GPU memory of a distillation step on wgpu against the tokens a row (issue 19): the tiny
# model's golden LaCo student (4 layers) on one packed row of 256, 512, 1024 and 2048 tokens,
# layers recomputed (the GPU default), with the flash attention kernels (src/kernels/cube) and
# with burn's generic ops instead (`--generic-ops`: scores, additive mask and softmax as
# tensors). Prints a Markdown table of cubecl's peak memory in use (`gpu_mem_peak_gb`, read every
# millisecond by the sampler thread of src/device/gpu.rs) beside the memory plan's peak
# (`memory_plan_gb`).
#
#   tools/wgpu-memory.sh [BIN (target/release/laco-train, built with --features wgpu)] [TOKENS]
#
# Needs a Vulkan driver (Mesa's llvmpipe does: apt-get install mesa-vulkan-drivers). STEPS
# (default 3) steps a run, the first left out of tokens/s.
set -eu
cd "$(dirname "$0")/.."
BIN=${1:-target/release/laco-train}
TOKENS=${2:-256 512 1024 2048}
STEPS=${STEPS:-3}
OUT=${OUT:-runs/wgpu-memory}
mkdir -p "$OUT"
echo "| tokens a row | flash attention: peak GPU memory | plan | tokens/s | generic ops: peak GPU memory | plan | tokens/s |"
echo "|---|---|---|---|---|---|---|"
for t in $TOKENS; do
  sed -e "s|^max_seq_len = .*|max_seq_len = $t\npacking = true|" \
      -e "s|^batch_size = .*|batch_size = 1|" \
      -e "s|\"\.\./|\"$PWD/|g" configs/tiny.toml > "$OUT/tiny-$t.toml"
  row="| $t"
  for ops in "" --generic-ops; do
    # shellcheck disable=SC2086
    "$BIN" bench --config "$OUT/tiny-$t.toml" --student tests/fixtures/golden/laco-last \
      --steps "$STEPS" --warmup 1 --device wgpu --activation-checkpointing true $ops --json \
      2>"$OUT/tiny-$t$ops.log" | tail -1 > "$OUT/tiny-$t$ops.json"
    row="$row | $(python3 -c "import json; d=json.load(open('$OUT/tiny-$t$ops.json')); print(f'{d[\"gpu_mem_peak_gb\"] * 1000:.1f} MB | {d[\"memory_plan_gb\"] * 1000:.1f} MB | {d[\"tokens_per_sec\"]:.0f}')")"
  done
  echo "$row |"
done
