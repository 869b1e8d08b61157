#!/usr/bin/env bash
# Stage 1 of the second-generation shapes model: f = 4 against f = 8 (configs/shapes-f4-autoencoder.yaml,
# configs/shapes-f8-autoencoder.yaml), trained side by side (one thread each), then both judged on their
# reconstructions of true renders at the steps STEPS lists (benchmarks/autoencoder_ceiling.py), the
# comparison in docs/models.md. Resumable: run it again and each run continues from its last checkpoint;
# a checkpoint at a multiple of 500 steps is kept in RUN/kept/ for the comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-"1000 2000 3000"}
mkdir -p ~/runs
resume() { if compgen -G "$1/checkpoints/step-*.pt" > /dev/null; then echo --resume; fi; }
keep() {  # copy each checkpoint at a multiple of 500 steps aside before keep_last removes it
  while kill -0 "$1" 2> /dev/null; do
    for p in "$2"/checkpoints/step-*.pt; do
      [ -f "$p" ] || continue
      s=$(basename "$p" .pt); n=$((10#${s#step-}))
      if [ $((n % 500)) = 0 ] && [ ! -f "$2/kept/$s.pt" ]; then mkdir -p "$2/kept"; cp "$p" "$2/kept/"; fi
    done
    sleep 30
  done
}
for f in 4 8; do
  run=~/runs/shapes-f$f-ae
  if [ ! -f "$run/autoencoder.safetensors" ]; then
    ldmkit train-autoencoder --config configs/shapes-f$f-autoencoder.yaml $(resume "$run") > "$run.log" 2>&1 &
    keep $! "$run" &
  fi
done
wait
mkdir -p reports
for s in $STEPS; do
  step=$(printf "step-%08d.pt" "$s")
  python benchmarks/autoencoder_ceiling.py 400 val,heldout,pink,teal,diamond \
      "f4=$HOME/runs/shapes-f4-ae/kept/$step" "f8=$HOME/runs/shapes-f8-ae/kept/$step"
done | tee reports/shapes-autoencoders.jsonl
