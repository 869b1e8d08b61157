"""DeepCache's speed at SD 1.5 size: whole 20-step DPM++ 2M 512² images with `feature_cache` N.

    python benchmarks/feature_cache.py FOLDER [bf16|fp32] [N,N,...]   (defaults: bf16, 1,2,3)

FOLDER: the SD 1.5 random-weight diffusers folder `ldmkit bench` builds. Random weights say nothing
about quality (the shapes judge does: docs/data.md), only about time. Prints JSON: seconds per image (one
timed image after a warm-up one, per N) and the speed-up over N = 1."""

import json
import sys
import time
from pathlib import Path

from ldmkit.pipelines import Pipeline


def main():
    folder = Path(sys.argv[1])
    precision = sys.argv[2] if len(sys.argv) > 2 else "bf16"
    intervals = [int(v) for v in (sys.argv[3] if len(sys.argv) > 3 else "1,2,3").split(",")]
    pipe = Pipeline.load(folder, precision=precision)

    def image(n):
        return pipe("a photograph of an astronaut riding a horse", steps=20, cfg=7.5, sampler="dpmpp_2m", seed=0,
                    width=512, height=512, prompt_mode="truncate", feature_cache=n)  # fmt: skip

    seconds = {}
    image(intervals[0])
    for n in intervals:
        start = time.perf_counter()
        image(n)
        seconds[n] = round(time.perf_counter() - start, 2)
    base = seconds.get(1)
    print(
        json.dumps(
            {
                "precision": precision,
                "seconds": seconds,
                "speedup_over_1": {n: round(base / s, 2) for n, s in seconds.items()} if base else None,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
