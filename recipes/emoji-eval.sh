#!/usr/bin/env bash
# The bundled emoji model's numbers and gallery (docs/models.md), reproduced: ldmkit eval-emoji at the
# default guidance scale for the shipped model and for the 11,000-step model it continues (2,000 training
# captions and the 203 held-out ones; about 20 minutes each on 2 cores), the guidance study over four
# scales, made on the 11,000-step model (about an hour), then the gallery of prompts the model never saw
# verbatim. The reports land in reports/ with the commands that made them.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p reports docs
DATA=${DATA:-~/data/emoji}
[ -d "$DATA" ] || ldmkit emoji-data --out "$DATA"
ldmkit eval-emoji --model emoji --data "$DATA" --cfg 3 -q --out reports/emoji-eval-3.json > /dev/null
ldmkit eval-emoji --model recipes/stage-checkpoints/emoji-ldm-step-11000.safetensors --data "$DATA" --cfg 3 -q \
    --out reports/emoji-eval-11000-3.json > /dev/null
ldmkit eval-emoji --model recipes/stage-checkpoints/emoji-ldm-step-11000.safetensors --data "$DATA" \
    --cfg 1,3,5,7.5 -q --out reports/emoji-eval.json > /dev/null
python recipes/grid.py --model emoji --prompt "a smiling cat, twemoji style" --prompt "red apple" \
    --prompt "rocket" --prompt "a dog face, noto style" --prompt "pizza" --prompt "red heart" \
    --prompt "thumbs up, dark skin tone" --prompt "sun with face, twemoji style" --seeds 0,1,2,3 \
    --out docs/emoji-gallery.png
