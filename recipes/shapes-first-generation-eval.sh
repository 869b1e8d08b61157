#!/usr/bin/env bash
# The first generation's numbers (docs/models.md, docs/few-step.md), reproduced: the guidance study and the
# sampler choice on the validation split, then the chosen defaults (euler_a, 20 steps, scale 2) on new seeds
# of seen combinations (val) and on held-out combinations; its few-step version (shapes-fast of
# recipes/shapes-first-generation.sh, the lcm sampler at scale 2) against it. Reports land in reports/ (JSON,
# with the command that made each).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p reports
MODEL=${MODEL:-recipes/stage-checkpoints/shapes-first-generation.safetensors}
FAST=${FAST:-$HOME/runs/shapes-first-generation/shapes-fast.safetensors}
DEFAULTS=(--samplers euler_a --cfg 2)  # its defaults, which a file outside the package does not carry
N=${N:-100}
ldmkit eval --model "$MODEL" --split val --n "$N" --seeds 2 --cfg 1,2,3,5,7.5,10 --steps 20 \
    --samplers dpmpp_2m_karras -q --out reports/shapes-first-generation-cfg-val.json > /dev/null
# the samplers at 20 steps and the scale chosen from the first table; then, for the best sampler,
# fewer and more steps and the neighbouring scales
ldmkit eval --model "$MODEL" --split val --n "$N" --seeds 2 --cfg 2 --steps 20 \
    --samplers dpmpp_2m_karras,euler_a,ddim,unipc -q --out reports/shapes-first-generation-samplers-val.json > /dev/null
ldmkit eval --model "$MODEL" --split val --n "$N" --seeds 2 --cfg 2 --steps 10,25 \
    --samplers euler_a -q --out reports/shapes-first-generation-steps-val.json > /dev/null
ldmkit eval --model "$MODEL" --split val --n "$N" --seeds 2 --cfg 3,5 --steps 20 \
    --samplers euler_a -q --out reports/shapes-first-generation-euler-cfg-val.json > /dev/null
for split in val heldout; do
    ldmkit eval --model "$MODEL" "${DEFAULTS[@]}" --steps 20 --split "$split" --seed 1 --n 200 --seeds 2 -q \
        --out "reports/shapes-first-generation-default-$split.json" > /dev/null
done
# few-step: the guidance scale for the distilled model at 4 steps (val, seed 0); then, on new seeds,
# the distilled model at 1, 2, 4 and 8 steps against the teacher at 25 and 50 with its default sampler
ldmkit eval --model "$FAST" --split val --n "$N" --seeds 2 --cfg 1.5,2,3,5 --steps 4 \
    --samplers lcm -q --out reports/shapes-first-generation-fast-cfg-val.json > /dev/null
ldmkit eval --model "$FAST" --samplers lcm --cfg 2 --split val --seed 1 --n 200 --seeds 2 --steps 1,2,4,8 -q \
    --out reports/shapes-first-generation-fast-val.json > /dev/null
ldmkit eval --model "$MODEL" "${DEFAULTS[@]}" --split val --seed 1 --n 200 --seeds 2 --steps 25,50 -q \
    --out reports/shapes-first-generation-teacher-val.json > /dev/null
# seconds per image, warm, batch 1 (one seed per prompt), model load excluded
ldmkit eval --model "$FAST" --samplers lcm --cfg 2 --split val --seed 2 --n 50 --seeds 1 --steps 1,2,4,8 -q \
    --out reports/shapes-first-generation-fast-time.json > /dev/null
ldmkit eval --model "$MODEL" "${DEFAULTS[@]}" --split val --seed 2 --n 50 --seeds 1 --steps 20,25,50 -q \
    --out reports/shapes-first-generation-teacher-time.json > /dev/null
ls -l reports/
