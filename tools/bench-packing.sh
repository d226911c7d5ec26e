#!/bin/sh
# Packing and the teacher cache, measured with `laco-train bench` (docs/results.md, "Packing and the
# teacher cache: measured"). Runs adjacent pairs so that a drifting machine compares like with
# like, and prints one JSON line per run (tokens/s, padding fraction, peak RSS).
#
#   tools/bench-packing.sh [tiny|smollm2] [PAIRS]
#
# Needs: target/release/laco-train (cargo build --release); the length-mix data in
# runs/lengths (made here with tools/make-length-mix.py if missing: python3 with pyarrow, e.g.
# `python3 -m venv .venv && .venv/bin/pip install pyarrow`, then PYTHON=.venv/bin/python); for
# smollm2, ./smollm2-135m (tools/fetch-smollm2.sh smollm2-135m).
# Settings (environment): MAX_SEQ_LEN (1024), BATCH (8 rows), STEPS (tiny 12, smollm2 4),
# WARMUP (tiny 2, smollm2 1), TOP_K (64), SECTIONS ("packing cache": which comparisons to run).
set -eu
cd "$(dirname "$0")/.."
MODEL=${1:-tiny}
PAIRS=${2:-3}
BIN=target/release/laco-train
PYTHON=${PYTHON:-python3}
MAX_SEQ_LEN=${MAX_SEQ_LEN:-1024}
BATCH=${BATCH:-8}
TOP_K=${TOP_K:-64}
SECTIONS=${SECTIONS:-packing cache}
case "$MODEL" in
  tiny) CONFIG=configs/tiny.toml; BASE=tests/fixtures/tiny-qwen3; STEPS=${STEPS:-12}; WARMUP=${WARMUP:-2} ;;
  smollm2) CONFIG=configs/smollm2-135m.toml; BASE=smollm2-135m; STEPS=${STEPS:-4}; WARMUP=${WARMUP:-1} ;;
  *) echo "usage: $0 [tiny|smollm2] [PAIRS]" >&2; exit 2 ;;
esac
OUT=runs/bench-packing-$MODEL
mkdir -p "$OUT"
DATA="runs/lengths/alpaca-lengths.parquet runs/lengths/openorca-lengths.parquet"
[ -f runs/lengths/openorca-lengths.parquet ] || "$PYTHON" tools/make-length-mix.py --out runs/lengths

# The config at MAX_SEQ_LEN and BATCH rows, on the length-mix data (absolute paths, as the
# copy lives in $OUT), training top-k forward KL where the cache is compared.
cfg() { # NAME DIVERGENCE
  sed -e "s|^max_seq_len = .*|max_seq_len = $MAX_SEQ_LEN|" \
      -e "s|^batch_size = .*|batch_size = $BATCH|" \
      -e "s|^divergence = .*|divergence = \"$2\"\ntop_k = $TOP_K|" \
      -e "s|\"\.\./|\"$PWD/|g" "$CONFIG" > "$OUT/$1.toml"
  echo "$OUT/$1.toml"
}
FKL=$(cfg forward_kl forward_kl)
TOPK=$(cfg top_k top_k_forward_kl)
# The pruned student (the config's [laco] settings) once, reused by every run.
STUDENT=$OUT/student
[ -f "$STUDENT/config.json" ] || "$BIN" prune --model "$BASE" --config "$FKL" --out "$STUDENT" >/dev/null

bench() { # CONFIG LABEL ARGS...
  c=$1; label=$2; shift 2
  printf '%s load %s ' "$label" "$(cut -d' ' -f1 /proc/loadavg)"
  line=$("$BIN" bench --config "$c" --student "$STUDENT" --data $DATA --steps "$STEPS" --warmup "$WARMUP" --json "$@" 2>"$OUT/$label.err" | tail -1) || true
  echo "${line:-failed: see $OUT/$label.err}"
}

case " $SECTIONS " in *" packing "*)
echo "== packing: $MODEL, $BATCH rows, max_seq_len $MAX_SEQ_LEN, $STEPS steps ($WARMUP warm-up), pairs of adjacent runs"
i=0
while [ $i -lt "$PAIRS" ]; do
  bench "$FKL" padded --packing false
  bench "$FKL" packed --packing true
  i=$((i + 1))
done ;;
esac

case " $SECTIONS " in *" cache "*)
echo "== teacher cache: top-$TOP_K, packed; online top-k / cached / online forward KL"
CACHE=$OUT/cache
"$BIN" teacher-cache --config "$TOPK" --data $DATA --max-steps "$STEPS" --top-k "$TOP_K" --out "$CACHE" --json 2>/dev/null | tail -1
i=0
while [ $i -lt "$PAIRS" ]; do
  bench "$TOPK" online-top-k
  bench "$TOPK" cached --teacher-cache "$CACHE"
  bench "$FKL" online-forward-kl
  i=$((i + 1))
done ;;
esac
