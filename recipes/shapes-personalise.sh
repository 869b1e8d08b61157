#!/usr/bin/env bash
# The personalisation numbers, reproduced on the first generation of the bundled shapes model
# (recipes/stage-checkpoints/shapes-first-generation.safetensors, judged at its defaults,
# euler_a, 20 steps, scale 2): a LoRA teaches it a shape it has never
# drawn (the diamond), without and with prior preservation; an embedding teaches it a new word for a
# colour it knows ("dax" for red). The judge scores each before and after, and the LoRAs on the
# validation split to show what they keep.
# Reports land in reports/ (JSON, with the command that made each).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p reports
LORA=~/runs/shapes-lora-diamond/diamond.safetensors
PRIOR=~/runs/shapes-lora-diamond-prior/diamond.safetensors
DAX=~/runs/shapes-embedding-dax/dax.safetensors
[ -f "$LORA" ] || ldmkit train-lora --config configs/shapes-diamond-lora.yaml
[ -f "$PRIOR" ] || ldmkit train-lora --config configs/shapes-diamond-prior-lora.yaml
[ -f "$DAX" ] || ldmkit train-embedding --config configs/shapes-dax-embedding.yaml
N=${N:-100}
BASE=recipes/stage-checkpoints/shapes-first-generation.safetensors
run() {
  out=$1; shift
  ldmkit eval --model "$BASE" --samplers euler_a --steps 20 --cfg 2 --seed 1 --n "$N" --seeds 2 -q \
    --out "reports/$out.json" "$@" > /dev/null
}
# the new shape: the judge knows all five shapes in every measurement here
run diamond-before --split diamond --novel-shapes
run diamond-after --split diamond --novel-shapes --lora "$LORA"
run diamond-val-before --split val --novel-shapes
run diamond-val-after --split val --novel-shapes --lora "$LORA"
# the same LoRA trained with prior preservation (half of each batch from the training split)
run diamond-prior-after --split diamond --novel-shapes --lora "$PRIOR"
run diamond-prior-val-after --split val --novel-shapes --lora "$PRIOR"
# the new word: prompts that say "red" say "dax" instead; the judge still wants red
run dax-red --split val --word red=red
run dax-before --split val --word red=dax
run dax-after --split val --word red=dax --embedding "$DAX"
python recipes/table.py reports/diamond-*.json reports/dax-*.json
