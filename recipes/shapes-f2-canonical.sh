#!/usr/bin/env bash
# The second-generation shapes model as it is judged in docs/models.md: the canonical-caption UNet
# (configs/shapes-f2-canonical-tune-ldm.yaml, relations stated one way only) with a MiniLM tower taught
# that both wordings of a relation are one (configs/shapes-f2-canonical-text.yaml), that pair trained on
# with a share of its captions without colours (configs/shapes-f2-uncoloured-tune-ldm.yaml: the bundled
# shapes), then its few-step version (configs/shapes-f2-lcm.yaml), the ControlNet (configs/shapes-f2-controlnet.yaml,
# trained on the pair before the last fine-tune) and the tiny decoder of its autoencoder
# (configs/shapes-f2-tiny.yaml). Resumable: run it again and each stage continues from its last checkpoint.
# The uncoloured fine-tune starts from the pair as the package shipped it, kept in
# recipes/stage-checkpoints/shapes-f2-canonical-text.safetensors (fp16), as it was run.
#
# The UNet's 3,000 steps (about an hour on two threads, after 55 minutes of latent-cache encoding) are kept
# in recipes/stage-checkpoints/shapes-f2-canonical-tune-ldm.safetensors and copied into place instead;
# delete the copy (~/runs/shapes-f2-canonical-tune-ldm/model.safetensors) to retrain it with
# `bash recipes/shapes-f2-ldm.sh shapes-f2-canonical-tune-ldm`.
set -euo pipefail
cd "$(dirname "$0")/.."
resume() { if compgen -G "$1/checkpoints/step-*.pt" > /dev/null; then echo --resume; fi; }

UNET=~/runs/shapes-f2-canonical-tune-ldm
TEXT=~/runs/shapes-f2-canonical-text
LCM=~/runs/shapes-f2-lcm
KEPT=recipes/stage-checkpoints/shapes-f2-canonical-tune-ldm.safetensors
if [ ! -f "$UNET/model.safetensors" ]; then
  if [ -f "$KEPT" ]; then mkdir -p "$UNET" && cp "$KEPT" "$UNET/model.safetensors"
  else bash recipes/shapes-f2-ldm.sh shapes-f2-canonical-tune-ldm; fi
fi
[ -f "$TEXT/model.safetensors" ] || ldmkit train-text-encoder --config configs/shapes-f2-canonical-text.yaml $(resume "$TEXT") -q
UNC=~/runs/shapes-f2-uncoloured-tune-ldm
[ -f "$UNC/model.safetensors" ] || ldmkit train --config configs/shapes-f2-uncoloured-tune-ldm.yaml $(resume "$UNC") -q
[ -f "$LCM/model.safetensors" ] || ldmkit distill-lcm --config configs/shapes-f2-lcm.yaml $(resume "$LCM") -q
CN=~/runs/shapes-f2-controlnet
TINY=~/runs/shapes-f2-tiny
# the ControlNet reads the same 20,000 scenes through the same autoencoder as the few-step run: that run's
# latent cache is this one's (an encoder pass over 20,000 images saved)
if [ ! -e "$CN/latent-cache.pt" ] && [ -f "$LCM/latent-cache.pt" ]; then
  mkdir -p "$CN" && { ln "$LCM/latent-cache.pt" "$CN/latent-cache.pt" 2>/dev/null || cp "$LCM/latent-cache.pt" "$CN/"; }
fi
[ -f "$CN/controlnet.safetensors" ] || ldmkit train-controlnet --config configs/shapes-f2-controlnet.yaml $(resume "$CN") -q
[ -f "$TINY/tiny-autoencoder.safetensors" ] || ldmkit distill-tiny-autoencoder --config configs/shapes-f2-tiny.yaml $(resume "$TINY") -q
ls -l "$TEXT/model.safetensors" "$UNC/model.safetensors" "$LCM/model.safetensors" "$CN/controlnet.safetensors" "$TINY/tiny-autoencoder.safetensors"
