#!/usr/bin/env bash
# Reproduces the bundled shapes model (src/ldmkit/bundled/shapes.safetensors) end to end with the
# project's own commands: stage 1 (configs/shapes-autoencoder.yaml), stage 2 (configs/shapes-ldm.yaml),
# its ControlNet (configs/shapes-controlnet.yaml), its few-step version (configs/shapes-lcm.yaml) and its
# tiny decoder (configs/shapes-tiny.yaml), then fp16 exports. Resumable: after an interruption, run it
# again and each stage continues from its last checkpoint. Run folders are the configs' run.dir (~/runs/shapes-ae, ~/runs/shapes-ldm).
# The tables in README come from recipes/shapes-eval.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

# --resume when a run folder already holds checkpoints
resume() { if compgen -G "$1/checkpoints/step-*.pt" > /dev/null; then echo --resume; fi; }

AE=~/runs/shapes-ae
LDM=~/runs/shapes-ldm
CN=~/runs/shapes-controlnet
LCM=~/runs/shapes-lcm
[ -f "$AE/autoencoder.safetensors" ] || ldmkit train-autoencoder --config configs/shapes-autoencoder.yaml $(resume "$AE")
[ -f "$LDM/model.safetensors" ] || ldmkit train --config configs/shapes-ldm.yaml $(resume "$LDM")
ldmkit convert "$LDM/model.safetensors" src/ldmkit/bundled/shapes.safetensors --to single-file --dtype fp16
[ -f "$CN/controlnet.safetensors" ] || ldmkit train-controlnet --config configs/shapes-controlnet.yaml $(resume "$CN")
ldmkit convert "$CN/controlnet.safetensors" src/ldmkit/bundled/shapes-canny.safetensors --to single-file --dtype fp16
[ -f "$LCM/model.safetensors" ] || ldmkit distill-lcm --config configs/shapes-lcm.yaml $(resume "$LCM")
ldmkit convert "$LCM/model.safetensors" "$LCM/model-fp16.safetensors" --to single-file --dtype fp16
# its UNet alone: the autoencoder and text tower are shapes' (bundled.Bundled.shares)
python recipes/unet_only.py "$LCM/model-fp16.safetensors" src/ldmkit/bundled/shapes.safetensors src/ldmkit/bundled/shapes-fast.safetensors
TINY=~/runs/shapes-tiny  # the tiny decoder (TAESD architecture) of the bundled autoencoder
[ -f "$TINY/tiny-autoencoder.safetensors" ] || ldmkit distill-tiny-autoencoder --config configs/shapes-tiny.yaml $(resume "$TINY")
python -c "import sys; from safetensors import safe_open; from safetensors.torch import save_file
with safe_open(sys.argv[1], 'pt') as f: save_file({k: f.get_tensor(k).half() for k in f.keys()}, sys.argv[2], f.metadata())" \
    "$TINY/tiny-autoencoder.safetensors" src/ldmkit/bundled/shapes-tiny.safetensors  # fp16, as every bundled file
ls -l src/ldmkit/bundled/
