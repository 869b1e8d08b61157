#!/usr/bin/env bash
# Stage 2 of the second-generation shapes model, chosen by measurement: the U-Net with attention at 8x8
# and 4x4 (configs/shapes-f2-ldm.yaml) against the same with attention at 16x16 too
# (configs/shapes-f2-attn16-ldm.yaml), both on the f = 2 autoencoder of recipes/shapes-autoencoders.sh.
# Both train side by side, one thread each, to COMPARE_AT steps; both are judged on val (200 prompts x 2
# seeds, guidance 2 and 5, 20 steps); the one whose relation prompts come out right more often goes on
# alone, on both threads, to its config's steps. Reports land in reports/shapes-f2-ldm-*.json.
# Resumable: run it again and each run continues from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p reports
COMPARE_AT=${COMPARE_AT:-3000}
AE=~/runs/shapes-f2-ae/autoencoder.safetensors
[ -f "$AE" ] || { echo "error: $AE missing: copy recipes/stage-checkpoints/shapes-f2-autoencoder.safetensors" \
  "there, or run recipes/shapes-autoencoders.sh" >&2; exit 2; }
resume() { if compgen -G "$1/checkpoints/step-*.pt" > /dev/null; then echo --resume; fi; }
run_dir() { echo ~/runs/"$1"; }
at_compare() { echo "$(run_dir "$1")/model-step-$COMPARE_AT.safetensors"; }
train() {  # NAME THREADS STEPS: in the background, its pid in $pid
  ldmkit train --config "configs/$1.yaml" $(resume "$(run_dir "$1")") --threads "$2" --steps "$3" -q \
      >> "$(run_dir "$1").log" 2>&1 &
  pid=$!
}
pids=()
for name in shapes-f2-ldm shapes-f2-attn16-ldm; do
  if [ ! -f "$(at_compare "$name")" ]; then train "$name" 1 "$COMPARE_AT"; pids+=("$pid"); fi
done
for p in "${pids[@]}"; do wait "$p"; done
for name in shapes-f2-ldm shapes-f2-attn16-ldm; do
  [ -f "$(at_compare "$name")" ] || cp "$(run_dir "$name")/model.safetensors" "$(at_compare "$name")"
  report="reports/$name-step-$COMPARE_AT-val.json"
  [ -f "$report" ] || ldmkit eval --model "$(at_compare "$name")" --split val --n 200 --seeds 2 --cfg 2,5 \
      --steps 20 --samplers euler_a -q --out "$report" > /dev/null
done
# the better share of relation prompts right on val, at its better guidance scale
CHOSEN=$(python - "$COMPARE_AT" <<'PY'
import json, sys
def score(name):
    s = json.load(open(f"reports/{name}-step-{sys.argv[1]}-val.json"))["settings"]
    return max((r["by_kind"]["relation"]["fully_correct"], r["fully_correct"]) for r in s)
print(max(["shapes-f2-ldm", "shapes-f2-attn16-ldm"], key=score))
PY
)
echo "chosen: $CHOSEN"
train "$CHOSEN" 2 "$(python -c "import yaml; print(yaml.safe_load(open('configs/$CHOSEN.yaml'))['run']['steps'])")"
wait "$pid"
