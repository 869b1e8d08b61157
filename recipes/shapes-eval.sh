#!/usr/bin/env bash
# The bundled shapes models' numbers (docs/models.md, few-step.md, controlnet.md, generating.md),
# reproduced: the guidance study on the validation split, then the defaults (euler_a, 20 steps, scale 3) on
# new seeds of seen combinations (val) and of held-out ones; README's first prompt; the few-step version at
# 1, 2, 4 and 8 steps and its speed against the model's; the ControlNet's edges; the tiny decoder.
# Reports land in reports/ (JSON, with the command that made each). The first generation's:
# recipes/shapes-first-generation-eval.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p reports
ldmkit eval --model shapes --split val --n 100 --seeds 2 --cfg 1,2,3,5,7.5 --steps 20 --samplers euler_a -q \
    --out reports/shapes-cfg-val.json > /dev/null
for split in val heldout; do
    ldmkit eval --model shapes --split "$split" --seed 1 --n 200 --seeds 2 -q \
        --out "reports/shapes-default-$split.json" > /dev/null
    ldmkit eval --model shapes-fast --split "$split" --seed 1 --n 200 --seeds 2 -q \
        --out "reports/shapes-fast-default-$split.json" > /dev/null
done
python benchmarks/first_prompt.py shapes > reports/shapes-first-prompt.json
python benchmarks/first_prompt.py shapes-fast > reports/shapes-fast-first-prompt.json
python benchmarks/shape_swaps.py shapes > reports/shapes-swaps.json
ldmkit eval --model shapes-fast --split val --seed 1 --n 200 --seeds 2 --steps 1,2,4,8 -q \
    --out reports/shapes-fast-val.json > /dev/null
# seconds per image, warm, batch 1 (one seed per prompt), model load excluded
ldmkit eval --model shapes-fast --split val --seed 2 --n 50 --seeds 1 --steps 1,2,4,8 -q \
    --out reports/shapes-fast-time.json > /dev/null
ldmkit eval --model shapes --split val --seed 2 --n 50 --seeds 1 --steps 20,25 -q \
    --out reports/shapes-teacher-time.json > /dev/null
ldmkit eval --control canny --split heldout --n 100 -q --out reports/shapes-controlnet-heldout.json \
    --grid docs/shapes-controlnet.png > /dev/null
python benchmarks/bundled_tiny_decoder.py 256 20 > reports/shapes-tiny-decoder.json
ldmkit eval --split val --seed 1 --n 200 --seeds 2 --tiny-decoder src/ldmkit/bundled/shapes-tiny.safetensors -q \
    --out reports/shapes-tiny-val.json > /dev/null
ls -l reports/
