#!/usr/bin/env bash
# The bundled shapes model's numbers in README, reproduced: the guidance study and the sampler choice on
# the validation split, then the chosen defaults on new seeds of seen combinations (val) and on held-out
# combinations. Reports land in reports/ (JSON, with the command that made each).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p reports
MODEL=${MODEL:-shapes}
N=${N:-100}
ldmkit eval --model "$MODEL" --split val --n "$N" --seeds 2 --cfg 1,2,3,5,7.5,10 --steps 20 \
    --samplers dpmpp_2m_karras -q --out reports/shapes-cfg-val.json > /dev/null
# the samplers at 20 steps and the scale chosen from the first table; then, for the best sampler,
# fewer and more steps and the neighbouring scales
ldmkit eval --model "$MODEL" --split val --n "$N" --seeds 2 --cfg 2 --steps 20 \
    --samplers dpmpp_2m_karras,euler_a,ddim,unipc -q --out reports/shapes-samplers-val.json > /dev/null
ldmkit eval --model "$MODEL" --split val --n "$N" --seeds 2 --cfg 2 --steps 10,25 \
    --samplers euler_a -q --out reports/shapes-steps-val.json > /dev/null
ldmkit eval --model "$MODEL" --split val --n "$N" --seeds 2 --cfg 3,5 --steps 20 \
    --samplers euler_a -q --out reports/shapes-euler-cfg-val.json > /dev/null
for split in val heldout; do
    ldmkit eval --model "$MODEL" --split "$split" --seed 1 --n 200 --seeds 2 -q \
        --out "reports/shapes-default-$split.json" > /dev/null
done
# few-step: the guidance scale for the distilled model at 4 steps (val, seed 0); then, on new seeds,
# the distilled model at 1, 2, 4 and 8 steps against the teacher at 25 and 50 with its default sampler
ldmkit eval --model shapes-fast --split val --n "$N" --seeds 2 --cfg 1.5,2,3,5 --steps 4 \
    --samplers lcm -q --out reports/shapes-fast-cfg-val.json > /dev/null
ldmkit eval --model shapes-fast --split val --seed 1 --n 200 --seeds 2 --steps 1,2,4,8 -q \
    --out reports/shapes-fast-val.json > /dev/null
ldmkit eval --model shapes --split val --seed 1 --n 200 --seeds 2 --steps 25,50 -q \
    --out reports/shapes-teacher-val.json > /dev/null
# seconds per image, warm, batch 1 (one seed per prompt), model load excluded
ldmkit eval --model shapes-fast --split val --seed 2 --n 50 --seeds 1 --steps 1,2,4,8 -q \
    --out reports/shapes-fast-time.json > /dev/null
ldmkit eval --model shapes --split val --seed 2 --n 50 --seeds 1 --steps 20,25,50 -q \
    --out reports/shapes-teacher-time.json > /dev/null
ls -l reports/
