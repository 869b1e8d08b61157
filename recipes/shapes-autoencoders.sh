#!/usr/bin/env bash
# Stage 1 of the second-generation shapes model, and the comparisons that chose it. First f = 4 against
# f = 8 (configs/shapes-f4-autoencoder.yaml, configs/shapes-f8-autoencoder.yaml): both train side by side,
# one thread each, until f = 8's 2,000 steps. Then z = 8 against z = 4 at f = 4
# (configs/shapes-f4z8-autoencoder.yaml): z = 8 trains to its 2,000 steps beside f = 4's continuation to
# its 4,000, one thread each. Then, each alone on both threads, the wider f = 4 autoencoder
# (configs/shapes-f4-wide-autoencoder.yaml), the same with a GAN term (configs/shapes-f4-wide-gan-autoencoder.yaml)
# and the f = 2 one that is shipped (configs/shapes-f2-autoencoder.yaml). Each stop and resume is from
# the last checkpoint: resume is exact, so only the speed changes. Every run keeps a checkpoint every 500
# steps; each is judged on reconstructions of true renders (val, 200 images), and the last ones on every
# split (400 images), benchmarks/autoencoder_ceiling.py; docs/models.md holds the tables. Resumable: run
# it again and each run continues from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p ~/runs reports
F4=~/runs/shapes-f4-ae
F8=~/runs/shapes-f8-ae
Z8=~/runs/shapes-f4z8-ae
WIDE=~/runs/shapes-f4-wide-ae
GAN=~/runs/shapes-f4-wide-gan-ae
F2=~/runs/shapes-f2-ae
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
  ldmkit train-autoencoder --config "configs/shapes-$2-autoencoder.yaml" $(resume "$1") --threads "$3" -q \
      >> "$1.log" 2>&1 &
  pid=$!
  keep "$pid" "$1" > /dev/null 2>&1 &
}
beside_f4() {  # RUN CONFIG: train it to its end on one thread while f = 4 goes on with the other
  local other f4=
  [ ! -f "$1/autoencoder.safetensors" ] || return 0
  train "$1" "$2" 1; other=$pid
  if [ ! -f "$F4/autoencoder.safetensors" ]; then train "$F4" f4 1; f4=$pid; fi
  wait "$other"
  if [ -n "$f4" ]; then kill "$f4" 2> /dev/null || true; wait "$f4" || true; fi
}
beside_f4 "$F8" f8
beside_f4 "$Z8" f4z8
for run in "$F4 f4" "$WIDE f4-wide" "$GAN f4-wide-gan" "$F2 f2"; do
  set -- $run
  if [ ! -f "$1/autoencoder.safetensors" ]; then train "$1" "$2" 2; wait "$pid"; fi
done
wait  # the keepers' last passes: each trainer's final checkpoint kept
kept() { printf "%s/kept/step-%08d.pt" "$1" "$2"; }
{
  for s in 500 1000 1500 2000; do
    python benchmarks/autoencoder_ceiling.py 200 val "f4=$(kept "$F4" "$s")" "f8=$(kept "$F8" "$s")" \
        "f4z8=$(kept "$Z8" "$s")" "f4-wide=$(kept "$WIDE" "$s")" "f2=$(kept "$F2" "$s")"
  done
  for s in 1000 1500; do python benchmarks/autoencoder_ceiling.py 200 val "f4-wide-gan=$(kept "$GAN" "$s")"; done
  for s in 2500 3000; do
    python benchmarks/autoencoder_ceiling.py 200 val "f4-wide=$(kept "$WIDE" "$s")" "f2=$(kept "$F2" "$s")"
  done
  for s in 3500 4000; do python benchmarks/autoencoder_ceiling.py 200 val "f2=$(kept "$F2" "$s")"; done
  python benchmarks/autoencoder_ceiling.py 400 val,heldout,pink,teal,diamond \
      "f4=$(kept "$F4" 2000)" "f8=$(kept "$F8" 2000)" "f4z8=$(kept "$Z8" 2000)" \
      "f4-4000=$F4/autoencoder.safetensors" "f4-wide=$WIDE/autoencoder.safetensors" \
      "f2=$F2/autoencoder.safetensors" old=bundled
} | tee reports/shapes-autoencoders.jsonl
