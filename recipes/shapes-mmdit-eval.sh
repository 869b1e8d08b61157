#!/usr/bin/env bash
# The shapes transformer (recipes/shapes-mmdit.sh) judged as the first-generation U-Net is
# (recipes/shapes-first-generation-eval.sh):
# the guidance scale chosen on the validation split (flow Euler, 20 steps, the flow model's sampler), then
# the chosen scale on new seeds of seen combinations (val) and on held-out combinations, 200 prompts x 2
# seeds each. Reports land in reports/ (JSON, with the command that made each).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p reports
MODEL=${MODEL:-~/runs/shapes-mmdit/model.safetensors}
N=${N:-100}
ldmkit eval --model "$MODEL" --split val --n "$N" --seeds 2 --cfg 2,3,5,7.5 --steps 20 \
    --samplers euler -q --out reports/shapes-mmdit-cfg-val.json > /dev/null
# the scale with the best fully-correct share on val
CFG=$(python -c "
import json
s = json.load(open('reports/shapes-mmdit-cfg-val.json'))['settings']
print(max(s, key=lambda r: r['fully_correct'])['cfg'])")
for split in val heldout; do
    ldmkit eval --model "$MODEL" --split "$split" --seed 1 --n 200 --seeds 2 --cfg "$CFG" --steps 20 \
        --samplers euler -q --out "reports/shapes-mmdit-default-$split.json" > /dev/null
done
