#!/usr/bin/env bash
# Reproduces the bundled shapes models from a fresh clone with the project's own commands:
# recipes/shapes-f2-canonical.sh trains them (the canonical-caption UNet on the f = 2 autoencoder with its
# taught MiniLM tower, trained on with captions without colours; its few-step version, ControlNet and tiny
# decoder; see there), then they are exported
# in fp16 into src/ldmkit/bundled as shapes, shapes-fast (its UNet alone: it shares shapes' autoencoder and
# tower, bundled.Bundled.shares), shapes-canny and shapes-tiny. Resumable: run it again and each stage
# continues from its last checkpoint. docs/models.md says how each was chosen and how good it is.
# The first generation, shipped before it: recipes/shapes-first-generation.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash recipes/shapes-f2-canonical.sh
B=src/ldmkit/bundled
LCM=~/runs/shapes-f2-lcm
ldmkit convert ~/runs/shapes-f2-uncoloured-tune-ldm/model.safetensors "$B/shapes.safetensors" --to single-file --dtype fp16
ldmkit convert "$LCM/model.safetensors" "$LCM/model-fp16.safetensors" --to single-file --dtype fp16
python recipes/unet_only.py "$LCM/model-fp16.safetensors" "$B/shapes.safetensors" "$B/shapes-fast.safetensors"
CN=~/runs/shapes-f2-controlnet/controlnet.safetensors
ldmkit convert "$CN" "$B/shapes-canny.safetensors" --to single-file --dtype fp16
python recipes/fp16.py ~/runs/shapes-f2-tiny/tiny-autoencoder.safetensors "$B/shapes-tiny.safetensors"
ls -l "$B"
