#!/usr/bin/env bash
# The first generation of the bundled shapes model (shipped until the second replaced it; its numbers stay
# in docs/models.md as the baseline), end to end with the project's own commands: stage 1
# (configs/shapes-autoencoder.yaml), stage 2 (configs/shapes-ldm.yaml), its ControlNet
# (configs/shapes-controlnet.yaml), its few-step version (configs/shapes-lcm.yaml) and its tiny decoder
# (configs/shapes-tiny.yaml), then fp16 exports into ~/runs/shapes-first-generation. Resumable: after an
# interruption, run it again and each stage continues from its last checkpoint. Run folders are the
# configs' run.dir (~/runs/shapes-ae, ~/runs/shapes-ldm). Its tables come from
# recipes/shapes-first-generation-eval.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=~/runs/shapes-first-generation
mkdir -p "$OUT"

# --resume when a run folder already holds checkpoints
resume() { if compgen -G "$1/checkpoints/step-*.pt" > /dev/null; then echo --resume; fi; }

AE=~/runs/shapes-ae
LDM=~/runs/shapes-ldm
CN=~/runs/shapes-controlnet
LCM=~/runs/shapes-lcm
[ -f "$AE/autoencoder.safetensors" ] || ldmkit train-autoencoder --config configs/shapes-autoencoder.yaml $(resume "$AE")
[ -f "$LDM/model.safetensors" ] || ldmkit train --config configs/shapes-ldm.yaml $(resume "$LDM")
ldmkit convert "$LDM/model.safetensors" "$OUT/shapes.safetensors" --to single-file --dtype fp16
[ -f "$CN/controlnet.safetensors" ] || ldmkit train-controlnet --config configs/shapes-controlnet.yaml $(resume "$CN")
ldmkit convert "$CN/controlnet.safetensors" "$OUT/shapes-canny.safetensors" --to single-file --dtype fp16
[ -f "$LCM/model.safetensors" ] || ldmkit distill-lcm --config configs/shapes-lcm.yaml $(resume "$LCM")
ldmkit convert "$LCM/model.safetensors" "$OUT/shapes-fast.safetensors" --to single-file --dtype fp16
TINY=~/runs/shapes-tiny  # the tiny decoder (TAESD architecture) of the bundled autoencoder
[ -f "$TINY/tiny-autoencoder.safetensors" ] || ldmkit distill-tiny-autoencoder --config configs/shapes-tiny.yaml $(resume "$TINY")
python recipes/fp16.py "$TINY/tiny-autoencoder.safetensors" "$OUT/shapes-tiny.safetensors"
ls -l "$OUT"
