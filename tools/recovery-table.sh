#!/bin/sh
# The recovery table (issue 20): a pruned student distilled for a fixed wall-time budget
# (`distill --max-time BUDGET`: the run fixes its steps, the final evaluation and adapter
# included), one run per variant and depth, with the teacher's and the pruned student's
# perplexity beside the recovered one, on two texts no run trains on: Hamlet (the training
# data's domain) and Milton's Areopagitica (prose outside it). Prints a Markdown table.
#
#   tools/recovery-table.sh [BUDGET (15m)] [VARIANTS (all of them)] [DEPTHS ("config 22i3")]
#
# BUDGET is wall time (`distill --max-time`), or a number of steps (`--max-steps`): variants
# whose steps cost the same compared at equal steps, free of how loaded the machine was while
# a timed run measured its first steps.
#
# Depths: `config` prunes with the config's [laco] settings (SmolLM2-135M: 30 -> 26 layers); a
# number N prunes to N layers with `--merge-mode last --threshold 0 --max-compression F`, F the
# share of the layers to remove (22 of 30: 0.27), and the config's interval; NiK the same with
# `--interval K` (22i3: four disjoint merges of three layers, where interval 2 collapses layers
# 19-27 into one). Pruning is not counted in the budget: each depth is pruned once into
# OUT/DEPTH/student.
#
# Variants (each a set of config edits, SECTION.KEY=VALUE):
#   logits              today's recipe: KD on the logits and CE
#   hidden-W-LAYERS     + the hidden-state term, weight W, layers all | merged | last (cosine)
#   hidden-1-all-mse    + the hidden-state term, MSE on RMS-normalised states
#   topk-online         top-64 forward KL from the online teacher (the control of the teacher
#                       cache's recovery)
#   lr-X, r-N, seq-256  learning rate, LoRA rank (alpha = 2r), 256-token sequences at 4 a step
#   kd-X                loss.alpha = X: X KD + (1 - X) CE (the config's: 0.5)
#   drop-0              no LoRA dropout (the config's: 0.05)
#   prose               CONFIG's data files plus datasets/text-format-prose.parquet (encyclopedia
#                       and King James prose, tools/make-prose-mix.py) at the mean of their weights
#                       (with the two bundled instruction files: a third each)
#   A+B                 the edits of A and of B (e.g. lr-1e-3+prose)
# MODEL=dir (default ./smollm2-135m, made by tools/fetch-smollm2.sh), CONFIG=file (default
# configs/smollm2-135m.toml), OUT=dir (default runs/recovery-table), BIN (default
# target/release/laco-train), EVAL_TOKENS (default 4096), MMLU_LIMIT (output.mmlu_limit; default:
# the config's). A dry run on the bundled tiny model:
#   MODEL=tests/fixtures/tiny-qwen3 CONFIG=configs/tiny.toml MMLU_LIMIT=0 tools/recovery-table.sh 20s "logits hidden-1-all" "config 6"
# Run it on a quiet machine: the budget is wall time.
set -eu
cd "$(dirname "$0")/.."
BUDGET=${1:-15m}
case $BUDGET in
  *[!0-9]*) budget="--max-time $BUDGET" ;;
  *) budget="--max-steps $BUDGET" ;;
esac
VARIANTS=${2:-"logits hidden-1-all hidden-1-merged hidden-1-last hidden-0.3-all hidden-3-all hidden-1-all-mse topk-online lr-5e-4 lr-2e-3 r-16 r-64 seq-256 prose"}
DEPTHS=${3:-"config 22i3"}
MODEL=${MODEL:-smollm2-135m}
CONFIG=${CONFIG:-configs/smollm2-135m.toml}
OUT=${OUT:-runs/recovery-table}
BIN=${BIN:-target/release/laco-train}
EVAL_TOKENS=${EVAL_TOKENS:-4096}
MMLU_LIMIT=${MMLU_LIMIT:-}
IN_DOMAIN=$PWD/datasets/text_shakespeare_hamlet.txt
OUT_DOMAIN=$PWD/datasets/text_milton_areopagitica.txt
[ "$MODEL" != smollm2-135m ] || [ -f smollm2-135m/config.json ] || tools/fetch-smollm2.sh smollm2-135m
mkdir -p "$OUT"

# The edits of a variant, one SECTION.KEY=VALUE a line; A+B: A's, then B's.
edits() {
  case $1 in
    *+*) edits "${1%%+*}"; edits "${1#*+}" ;;
    logits) ;;
    hidden-1-all-mse) printf 'loss.hidden_weight=1.0\nloss.hidden_distance="mse"\n' ;;
    hidden-*-all|hidden-*-merged|hidden-*-last) w=${1#hidden-}; printf 'loss.hidden_weight=%s\nloss.hidden_layers="%s"\n' "${w%-*}" "${w#*-}" ;;
    topk-online) printf 'loss.divergence="top_k_forward_kl"\nloss.top_k=64\n' ;;
    lr-*) printf 'optim.lr=%s\n' "${1#lr-}" ;;
    r-*) printf 'lora.r=%s\nlora.alpha=%s.0\n' "${1#r-}" "$((2 * ${1#r-}))" ;;
    seq-256) printf 'data.max_seq_len=256\noptim.batch_size=4\n' ;;
    kd-*) printf 'loss.alpha=%s\n' "${1#kd-}" ;;
    drop-0) printf 'lora.dropout=0.0\n' ;;
    prose) printf 'data.files+="%s/datasets/text-format-prose.parquet"\n' "$PWD" ;;
    *) echo "unknown variant $1" >&2; exit 2 ;;
  esac
}

# CONFIG with absolute paths, the model, no periodic evaluation, and the edits $2 into file $1.
# `data.files+=FILE` appends FILE to the list, and to data.weights the mean of its weights.
config() {
  python3 - "$CONFIG" "$PWD" "$MODEL" "$EVAL_TOKENS" "$MMLU_LIMIT" "$1" "${2:-}" <<'EOF'
import json, re, sys
path, root, model, tokens, mmlu, out, extra = sys.argv[1:]
text = open(path).read().replace('"../', f'"{root}/')
model = model if model.startswith("/") else f"{root}/{model}"
edits = [("model.base", f'"{model}"'), ("output.eval_every", "0"), ("output.eval_tokens", tokens)]
if mmlu:
    edits.append(("output.mmlu_limit", mmlu))
edits += [tuple(l.split("=", 1)) for l in extra.split("\n") if l]

def value_of(section, name):
    body = re.search(rf"^\[{section}\][^\n]*\n((?:(?!\[)[^\n]*\n?)*)", text, re.M).group(1)
    found = re.search(rf"^{name}\s*=\s*(\[[^\]]*\])", body, re.M)
    return json.loads(found.group(1)) if found else None

for key, value in list(edits):
    if key.endswith("+"):
        files = value_of("data", "files")
        weights = value_of("data", "weights") or [1.0] * len(files)
        edits.remove((key, value))
        edits += [("data.files", json.dumps(files + [json.loads(value)])),
                  ("data.weights", json.dumps(weights + [sum(weights) / len(weights)]))]
for key, value in edits:
    section, name = key.split(".")
    head = re.search(rf"^\[{section}\][^\n]*\n", text, re.M)
    if head is None:
        text += f"\n[{section}]\n"
        head = re.search(rf"^\[{section}\][^\n]*\n", text, re.M)
    end = re.search(r"^\[", text[head.end():], re.M)
    end = head.end() + (end.start() if end else len(text) - head.end())
    body = text[head.end():end]
    line = rf"^{name}\s*=.*$"
    body = re.sub(line, f"{name} = {value}", body, count=1, flags=re.M) if re.search(line, body, re.M) else f"{name} = {value}\n" + body
    text = text[:head.end()] + body + text[end:]
open(out, "w").write(text)
EOF
}

json() { python3 -c "import json,sys; d=json.loads(sys.stdin.read().splitlines()[-1]); print($1)"; }
ppl_of() { text=$1; shift; "$BIN" eval --task ppl --text "$text" --max-tokens "$EVAL_TOKENS" --json "$@" 2>/dev/null | json 'round(d["ppl"], 2)'; }

teacher_out=$(ppl_of "$OUT_DOMAIN" --model "$MODEL")
echo "| layers | variant | steps | Hamlet: teacher / pruned / recovered (x teacher) | Areopagitica: teacher / pruned / recovered (x teacher) | tokens/s |"
echo "|---|---|---|---|---|---|"
for depth in $DEPTHS; do
  dir=$OUT/$depth
  student=$dir/student
  mkdir -p "$dir"
  if [ ! -f "$student/config.json" ]; then
    config "$dir/prune.toml"
    if [ "$depth" = config ]; then
      "$BIN" prune --model "$MODEL" --config "$dir/prune.toml" --out "$student" >/dev/null 2>&1
    else
      layers=$(python3 -c "import json; print(json.load(open('$MODEL/config.json'))['num_hidden_layers'])")
      share=$(python3 -c "print(($layers - ${depth%i*}) / $layers + 1e-9)")
      case $depth in *i*) interval="--interval ${depth#*i}" ;; *) interval= ;; esac
      # shellcheck disable=SC2086
      "$BIN" prune --model "$MODEL" --config "$dir/prune.toml" --merge-mode last --threshold 0 --max-compression "$share" $interval --out "$student" >/dev/null 2>&1
    fi
  fi
  got=$(python3 -c "import json; print(json.load(open('$student/config.json'))['num_hidden_layers'])")
  pruned_out=$(ppl_of "$OUT_DOMAIN" --model "$student")
  for variant in $VARIANTS; do
    cfg=$dir/$variant.toml
    config "$cfg" "$(edits "$variant")"
    run=$dir/$variant
    # shellcheck disable=SC2086
    "$BIN" distill --config "$cfg" --student "$student" $budget --save-every 0 --force --out "$run" --json 2>"$run.log" | tail -1 > "$run.json"
    recovered_out=$(ppl_of "$OUT_DOMAIN" --model "$student" --adapter "$run/adapter")
    json "f'| {$got} | $variant | {d[\"steps\"]} | {d[\"ppl_teacher\"]:.2f} / {d[\"ppl_student\"]:.2f} / {d[\"ppl_recovered\"]:.2f} ({d[\"ppl_recovered\"] / d[\"ppl_teacher\"]:.2f}x) | $teacher_out / $pruned_out / $recovered_out ({$recovered_out / $teacher_out:.2f}x) | {d[\"tokens_per_sec\"]:.0f} |'" < "$run.json"
  done
done
