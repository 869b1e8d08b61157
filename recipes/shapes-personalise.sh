#!/usr/bin/env bash
# README "LoRA and textual inversion", measured on the shapes world: teach the bundled model a colour
# it has never drawn (pink, by a LoRA) and a word for another (teal, by textual inversion), from 48
# images each; then the judge before and after, on the new colour's prompts and on the old
# validation prompts (nothing forgotten). Reports land in reports/.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p reports
N=${N:-100}
resume() { if compgen -G "$1/checkpoints/step-*.pt" > /dev/null; then echo --resume; fi; }
LORA=~/runs/shapes-lora-pink
EMB=~/runs/shapes-embedding-teal
[ -f "$LORA/pink.safetensors" ] || ldmkit train-lora --config configs/shapes-lora-pink.yaml $(resume "$LORA")
[ -f "$EMB/teal.safetensors" ] || ldmkit train-embedding --config configs/shapes-embedding-teal.yaml $(resume "$EMB")
ev() { ldmkit eval --n "$N" --seeds 2 -q "$@" > /dev/null; }
ev --split pink --out reports/pink-before.json
ev --split pink --lora "$LORA/pink.safetensors" --out reports/pink-after.json
ev --split val --lora "$LORA/pink.safetensors" --out reports/pink-val-after.json
ev --split teal --out reports/teal-before.json
ev --split teal --embedding "$EMB/teal.safetensors" --out reports/teal-after.json
ev --split val --embedding "$EMB/teal.safetensors" --out reports/teal-val-after.json
ls -l reports/
