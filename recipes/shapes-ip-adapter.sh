#!/usr/bin/env bash
# Image prompts for the first generation of the bundled shapes model
# (recipes/stage-checkpoints/shapes-first-generation.safetensors), from a fresh clone: the image tower, then the adapter, then
# the judge -- the image alone (empty text) at two scales, the image against another scene's text, and the
# text-prompt baseline on the same scenes. Reports land in reports/ (JSON, with the command in each).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p reports
TOWER=~/runs/shapes-image-encoder/image-encoder
ADAPTER=~/runs/shapes-ip-adapter/shapes-ip-adapter.safetensors
[ -f "$TOWER/model.safetensors" ] || ldmkit train-image-encoder --config configs/shapes-image-encoder.yaml
[ -f "$ADAPTER" ] || ldmkit train-ip-adapter --config configs/shapes-ip-adapter.yaml
N=${N:-100}
BASE=recipes/stage-checkpoints/shapes-first-generation.safetensors
ldmkit eval --model "$BASE" --samplers euler_a --steps 20 --split val --n "$N" --seed 1 --cfg 3 \
  --ip-adapter "$ADAPTER" --image-encoder "$TOWER" \
  --ip-scales 0.5,1 -q --out reports/shapes-ip-adapter-val.json > /dev/null
ldmkit eval --model "$BASE" --samplers euler_a --steps 20 --split val --n "$N" --seed 1 --seeds 1 --cfg 3 -q \
  --out reports/shapes-ip-adapter-text-baseline.json > /dev/null
