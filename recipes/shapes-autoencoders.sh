#!/usr/bin/env bash
# Stage 1 of the second-generation shapes model: f = 4 against f = 8 (configs/shapes-f4-autoencoder.yaml,
# configs/shapes-f8-autoencoder.yaml). Both train side by side, one thread each, until f = 8's 2,000 steps;
# then f = 4 goes on alone with both threads (stopped and resumed from its last checkpoint: resume is
# exact, so only the speed changes). Both are judged on their reconstructions of true renders every 500
# steps to 2,000 (val, 200 images) and at 2,000 on every split (400 images), benchmarks/autoencoder_ceiling.py;
# docs/models.md holds the table. Resumable: run it again and each run continues from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p ~/runs reports
F4=~/runs/shapes-f4-ae
F8=~/runs/shapes-f8-ae
resume() { if compgen -G "$1/checkpoints/step-*.pt" > /dev/null; then echo --resume; fi; }
keep() {  # copy each checkpoint at a multiple of 500 steps aside before keep_last removes it
  local alive=1
  while [ "$alive" = 1 ]; do
    kill -0 "$1" 2> /dev/null || alive=0  # one more pass after the trainer ends: its last checkpoint
    for p in "$2"/checkpoints/step-*.pt; do
      [ -f "$p" ] || continue
      s=$(basename "$p" .pt); n=$((10#${s#step-}))
      if [ $((n % 500)) = 0 ] && [ ! -f "$2/kept/$s.pt" ]; then mkdir -p "$2/kept"; cp "$p" "$2/kept/"; fi
    done
    [ "$alive" = 0 ] || sleep 10
  done
}
train() {  # RUN F THREADS: train in the background and keep its checkpoints; the trainer's pid in $pid
  ldmkit train-autoencoder --config "configs/shapes-f$2-autoencoder.yaml" $(resume "$1") --threads "$3" -q \
      >> "$1.log" 2>&1 &
  pid=$!
  keep "$pid" "$1" > /dev/null 2>&1 &
}
f4=
if [ ! -f "$F8/autoencoder.safetensors" ]; then
  train "$F8" 8 1; f8=$pid
  if [ ! -f "$F4/autoencoder.safetensors" ]; then train "$F4" 4 1; f4=$pid; fi
  wait "$f8"
  if [ -n "$f4" ]; then kill "$f4"; wait "$f4" || true; fi
fi
if [ ! -f "$F4/autoencoder.safetensors" ]; then train "$F4" 4 2; wait "$pid"; fi
wait  # the keepers' last passes: each trainer's final checkpoint kept
kept() { printf "%s/kept/step-%08d.pt" "$1" "$2"; }
{
  for s in 500 1000 1500 2000; do
    python benchmarks/autoencoder_ceiling.py 200 val "f4=$(kept "$F4" "$s")" "f8=$(kept "$F8" "$s")"
  done
  python benchmarks/autoencoder_ceiling.py 400 val,heldout,pink,teal,diamond \
      "f4=$(kept "$F4" 2000)" "f8=$(kept "$F8" 2000)" "f4-final=$F4/autoencoder.safetensors" old=bundled
} | tee reports/shapes-autoencoders.jsonl
