#!/bin/sh
# Recovery per CPU-minute (docs/results.md, "Recovery per CPU-minute"): SmolLM2-135M with
# configs/smollm2-135m.toml, each variant one `distill` run of BUDGET seconds of wall time in all
# (loading, the baseline and final evaluations and the training steps; pruning is excluded:
# every variant reuses one pruned student), reporting teacher / pruned / recovered held-out
# Hamlet perplexity. The steps that fit are found by timing each variant first (a short bench
# for the seconds per step, a 1-step run for the fixed costs).
#
#   tools/recovery-per-cpu-minute.sh [BUDGET_SECONDS (900)] [VARIANTS ("padded packed packed-cache")]
#
# Variants:
#   padded        today's recipe: 8 sequences of at most 128 tokens per step, right-padded
#   packed        packing, rows of MAX_SEQ_LEN (512) tokens, ROWS (2) rows per step: about the
#                 same positions per step, but no example is cut at 128 tokens (at 128 the
#                 bundled examples, 54-202 tokens, fit one per row: packing changes little)
#   packed-cache  packed, top-64 forward KL from a teacher cache of one epoch of the data, made
#                 beforehand (its time is printed, not counted: a cache serves every later run)
# DATA="a.parquet b.parquet" trains on other files (e.g. tools/make-length-mix.py's) instead of
# the config's. Needs target/release/laco-train and ./smollm2-135m (made here with
# tools/fetch-smollm2.sh: python3 and pip). Run it on a quiet machine: the budget is wall time.
set -eu
cd "$(dirname "$0")/.."
BUDGET=${1:-900}
VARIANTS=${2:-"padded packed packed-cache"}
BIN=target/release/laco-train
OUT=runs/recovery
DATA=${DATA:-}
MAX_SEQ_LEN=${MAX_SEQ_LEN:-512}
ROWS=${ROWS:-2}
[ -f smollm2-135m/config.json ] || tools/fetch-smollm2.sh smollm2-135m
mkdir -p "$OUT"
STUDENT=$OUT/student
[ -f "$STUDENT/config.json" ] || "$BIN" prune --model smollm2-135m --config configs/smollm2-135m.toml --out "$STUDENT" >/dev/null
json() { python3 -c "import json,sys; d=json.loads(sys.stdin.read().splitlines()[-1]); print($1)"; }
now() { date +%s.%N; }
DATA_ARGS=""
[ -z "$DATA" ] || DATA_ARGS="--data $DATA"

for variant in $VARIANTS; do
  packing=true; divergence='"forward_kl"'; cache=""; len=$MAX_SEQ_LEN; rows=$ROWS
  case $variant in
    padded) packing=false; len=128; rows=8 ;;
    packed) ;;
    packed-cache) divergence='"top_k_forward_kl"\ntop_k = 64'; cache="$PWD/$OUT/cache" ;;
    *) echo "unknown variant $variant" >&2; exit 2 ;;
  esac
  cfg=$OUT/$variant.toml
  # Absolute paths; no periodic evaluation (only the final one), so that both variants spend
  # the budget alike.
  sed -e "s|\"\.\./|\"$PWD/|g" -e "s|^seed = 0|seed = 0\npacking = $packing|" \
      -e "s|^max_seq_len = .*|max_seq_len = $len|" -e "s|^batch_size = .*|batch_size = $rows|" \
      -e "s|^divergence = .*|divergence = $divergence|" -e "s|^eval_every = .*|eval_every = 0|" \
      configs/smollm2-135m.toml > "$cfg"
  started=$(now)
  if [ -n "$cache" ]; then
    # One epoch of the data (every distinct sequence): an epoch or more of any run.
    printf '[teacher]\ncache = "%s"\n' "$cache" >> "$cfg"
    "$BIN" teacher-cache --config "$cfg" $DATA_ARGS --max-steps 100000 --out "$cache" --json 2>/dev/null | tail -1 > "$OUT/$variant-cache.json"
  fi
  cache_s=$(python3 -c "print($(now) - $started)")
  per_step=$("$BIN" bench --config "$cfg" --student "$STUDENT" $DATA_ARGS --steps 5 --warmup 2 --json 2>/dev/null | json 'd["seconds_per_step"]')
  t0=$(now)
  "$BIN" distill --config "$cfg" --student "$STUDENT" $DATA_ARGS --max-steps 1 --save-every 0 --out "$OUT/$variant-calibration" >/dev/null 2>&1
  fixed=$(python3 -c "print($(now) - $t0 - $per_step)")
  steps=$(python3 -c "print(max(1, int(($BUDGET - $fixed) / $per_step)))")
  rm -rf "$OUT/$variant"
  t0=$(now)
  "$BIN" distill --config "$cfg" --student "$STUDENT" $DATA_ARGS --max-steps "$steps" --save-every 0 --out "$OUT/$variant" --json 2>"$OUT/$variant.log" | tail -1 > "$OUT/$variant.json"
  wall=$(python3 -c "print(round($(now) - $t0))")
  json "f'$variant: {$steps} steps in ${wall} s (cache {$cache_s:.0f} s, {$per_step:.2f} s/step), teacher {d[\"ppl_teacher\"]:.2f}, pruned {d[\"ppl_student\"]:.2f}, recovered {d[\"ppl_recovered\"]:.2f}, {d[\"tokens_per_sec\"]:.0f} tokens/s'" < "$OUT/$variant.json"
done
