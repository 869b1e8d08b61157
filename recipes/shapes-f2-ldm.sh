#!/usr/bin/env bash
# Stage 2 of the second-generation shapes model: the U-Net of configs/shapes-f2-ldm.yaml (attention at
# 8x8 and 4x4) on the f = 2 autoencoder of recipes/shapes-autoencoders.sh, trained to its config's steps.
# `bash recipes/shapes-f2-ldm.sh shapes-f2-zsnr-ldm` trains the same U-Net with zero terminal SNR and
# v-prediction instead (configs/shapes-f2-zsnr-ldm.yaml says why), and `... shapes-f2-zsnr-tune-ldm`
# fine-tunes the finished epsilon model (recipes/stage-checkpoints/shapes-f2-ldm.safetensors) to that
# schedule in 3,000 steps.
#
# Chosen against the same U-Net with attention at 16x16 too (configs/shapes-f2-attn16-ldm.yaml) by EMA
# validation loss per CPU-second, both trained side by side at one thread each on an Intel Xeon with AMX
# (2026-12-02): with 16x16 the loss was lower at equal steps (0.0834/0.0364/0.0255/0.0206 against
# 0.0856/0.0393/0.0278/0.0225 at steps 500/1,000/1,500/2,000) but each step took about 2.4 s against
# 1.8 s, so at equal time the loss was lower without it (0.0193 at step 2,500, about 4,500 s, against
# 0.0206 at step 2,000, about 4,800 s).
#
# Resumable: run it again and it continues from its last checkpoint. With no checkpoint in the run folder
# it starts from the newest training checkpoint in recipes/stage-checkpoints/ (see the README there), if
# one is kept. The latent cache (100,000 scenes) is encoded first, about 55 minutes on two threads, unless
# the other config's run folder has one.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${1:-shapes-f2-ldm}  # or shapes-f2-zsnr-ldm / shapes-f2-zsnr-tune-ldm: on a zero-terminal-SNR schedule
AE=~/runs/shapes-f2-ae/autoencoder.safetensors
RUN=~/runs/$NAME
if [ ! -f "$AE" ]; then
  mkdir -p "$(dirname "$AE")"
  cp recipes/stage-checkpoints/shapes-f2-autoencoder.safetensors "$AE"
fi
kept=$(ls recipes/stage-checkpoints/$NAME-step-*.pt 2>/dev/null | sort | tail -1 || true)
if ! compgen -G "$RUN/checkpoints/step-*.pt" > /dev/null && [ -n "$kept" ]; then
  mkdir -p "$RUN/checkpoints"
  cp "$kept" "$RUN/checkpoints/$(basename "$kept" | sed "s/^$NAME-//")"
fi
# All read the same scenes (captions aside) through the same autoencoder: one latent cache serves every run
for other in ~/runs/shapes-f2-ldm ~/runs/shapes-f2-zsnr-ldm ~/runs/shapes-f2-zsnr-tune-ldm ~/runs/shapes-f2-canonical-tune-ldm; do
  if [ ! -f "$RUN/latent-cache.pt" ] && [ -f "$other/latent-cache.pt" ]; then
    mkdir -p "$RUN"
    ln "$other/latent-cache.pt" "$RUN/latent-cache.pt" 2>/dev/null || cp "$other/latent-cache.pt" "$RUN/"
  fi
done
resume=$(compgen -G "$RUN/checkpoints/step-*.pt" > /dev/null && echo --resume || true)
ldmkit train --config "configs/$NAME.yaml" $resume -q >> "$RUN.log" 2>&1
