#!/usr/bin/env bash
# Reproduces the bundled emoji model (src/ldmkit/bundled/emoji.safetensors) with the project's own
# commands: the data (ldmkit emoji-data, from the npm registry), stage 1 (configs/emoji-autoencoder.yaml)
# and its no-GAN baseline (configs/emoji-nogan-autoencoder.yaml), stage 2 (configs/emoji-ldm.yaml, 11,000
# steps, its EMA weights kept in fp16 as a stage checkpoint) and its continuation to 16,000 steps
# (configs/emoji-more-ldm.yaml), then the fp16 export. Resumable: after an interruption, run it again and
# each stage continues from its last checkpoint. README's emoji autoencoder numbers come from benchmarks/emoji_autoencoders.py.
set -euo pipefail
cd "$(dirname "$0")/.."

resume() { if compgen -G "$1/checkpoints/step-*.pt" > /dev/null; then echo --resume; fi; }

DATA=~/data/emoji
AE=~/runs/emoji-ae
NOGAN=~/runs/emoji-ae-nogan
LDM=~/runs/emoji-ldm
MORE=~/runs/emoji-more-ldm
STAGE=recipes/stage-checkpoints/emoji-ldm-step-11000.safetensors
[ -d "$DATA" ] || ldmkit emoji-data --out "$DATA"
[ -f "$AE/autoencoder.safetensors" ] || ldmkit train-autoencoder --config configs/emoji-autoencoder.yaml $(resume "$AE")
if [ ! -f "$NOGAN/autoencoder.safetensors" ]; then
  if ! compgen -G "$NOGAN/checkpoints/step-*.pt" > /dev/null; then
    mkdir -p "$NOGAN/checkpoints"
    cp "$AE/checkpoints/step-00004000.pt" "$NOGAN/checkpoints/"
  fi
  ldmkit train-autoencoder --config configs/emoji-nogan-autoencoder.yaml --resume
fi
if [ ! -f "$STAGE" ]; then
  [ -f "$LDM/model.safetensors" ] || ldmkit train --config configs/emoji-ldm.yaml $(resume "$LDM")
  ldmkit convert "$LDM/model.safetensors" "$STAGE" --to single-file --dtype fp16
fi
[ -f "$MORE/model.safetensors" ] || ldmkit train --config configs/emoji-more-ldm.yaml $(resume "$MORE")
ldmkit convert "$MORE/model.safetensors" src/ldmkit/bundled/emoji.safetensors --to single-file --dtype fp16
ls -l src/ldmkit/bundled/
