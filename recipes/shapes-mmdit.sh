#!/usr/bin/env bash
# The transformer counterpart of the bundled shapes model (configs/shapes-mmdit-ldm.yaml): its autoencoder is
# the bundled model's own, written out once as a standalone file, then stage 2 is trained at the U-Net's
# training compute. Resumable: run it again after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
AE=~/runs/shapes-ae/autoencoder.safetensors
RUN=~/runs/shapes-mmdit
if [ ! -f "$AE" ]; then
  mkdir -p "$(dirname "$AE")"
  python -c "
from pathlib import Path
from ldmkit.bundled import resolve
from ldmkit.checkpoints.single_file import load_model
from ldmkit.training.autoencoder import save_autoencoder
save_autoencoder(load_model(resolve('shapes')[0]).vae.float(), Path('$AE'))"
fi
resume() { if compgen -G "$1/checkpoints/step-*.pt" > /dev/null; then echo --resume; fi; }
[ -f "$RUN/model.safetensors" ] || ldmkit train --config configs/shapes-mmdit-ldm.yaml $(resume "$RUN")
