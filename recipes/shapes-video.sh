#!/usr/bin/env bash
# Text-to-video grown from the first generation of the bundled shapes model, from a fresh clone: train the
# temporal layers, then judge
# the clips of the val and held-out captions — the video model, and the image model frame by frame with the same
# noise (the baseline: the video model before its temporal layers learned anything) — and draw the samples.
# Reports land in reports/ (JSON, with the command in each). STEPS stops training early (the run resumes).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p reports
RUN=~/runs/shapes-video
VIDEO=$RUN/video.safetensors
if [ ! -f "$VIDEO" ]; then
  if [ -d "$RUN/checkpoints" ]; then resume=--resume; else resume=; fi
  ldmkit train-video --config configs/shapes-video.yaml $resume -q
fi
N=${N:-50}
for split in val heldout; do
  ldmkit eval-video --model "$VIDEO" --split "$split" --n "$N" -q --out "reports/shapes-video-$split.json" > /dev/null
  ldmkit eval-video --model recipes/stage-checkpoints/shapes-first-generation.safetensors --baseline \
    --split "$split" --n "$N" -q \
    --out "reports/shapes-video-baseline-$split.json" > /dev/null
done
python recipes/video_samples.py "$VIDEO" docs/shapes-video.png docs/shapes-video.gif
