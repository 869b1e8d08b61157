#!/usr/bin/env bash
# The bundled emoji model's README numbers and gallery, reproduced: ldmkit eval-emoji over four guidance
# scales (2,000 training captions and the 203 held-out ones at each; about an hour on 2 cores), then the
# gallery of prompts the model never saw verbatim. The report lands in reports/ with the command that made it.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p reports docs
DATA=${DATA:-~/data/emoji}
[ -d "$DATA" ] || ldmkit emoji-data --out "$DATA"
ldmkit eval-emoji --model emoji --data "$DATA" --cfg 1,3,5,7.5 -q --out reports/emoji-eval.json > /dev/null
python recipes/grid.py --model emoji --prompt "a smiling cat, twemoji style" --prompt "red apple" \
    --prompt "rocket" --prompt "a dog face, noto style" --prompt "pizza" --prompt "red heart" \
    --prompt "thumbs up, dark skin tone" --prompt "sun with face, twemoji style" --seeds 0,1,2,3 \
    --out docs/emoji-gallery.png
