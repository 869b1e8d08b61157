#!/usr/bin/env bash
# The transformer counterpart of the first-generation bundled shapes model (configs/shapes-mmdit-ldm.yaml):
# its autoencoder is that model's own (recipes/stage-checkpoints/shapes-autoencoder.safetensors rounded to
# fp16, as the bundled file stores it: equal to the bundled weights bit for bit), written out once as a
# standalone file, then stage 2 is trained at the U-Net's training compute. Resumable: run it again after
# an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
AE=~/runs/shapes-ae/autoencoder.safetensors
RUN=~/runs/shapes-mmdit
if [ ! -f "$AE" ]; then
  mkdir -p "$(dirname "$AE")"
  python -c "
from pathlib import Path
from ldmkit.checkpoints.single_file import load_vae_file
from ldmkit.training.autoencoder import save_autoencoder
vae = load_vae_file('recipes/stage-checkpoints/shapes-autoencoder.safetensors')
save_autoencoder(vae.half().float(), Path('$AE'))"
fi
resume() { if compgen -G "$1/checkpoints/step-*.pt" > /dev/null; then echo --resume; fi; }
[ -f "$RUN/model.safetensors" ] || ldmkit train --config configs/shapes-mmdit-ldm.yaml $(resume "$RUN")
