"""Seconds and peak resident memory of loading one model in this fresh process (docs/performance.md).

    python benchmarks/load_memory.py MODEL [fp32|bf16]

MODEL: a file or diffusers folder, e.g. the SD 1.5 random-weight folder `ldmkit bench` builds
(`python -c "from pathlib import Path; from ldmkit.evaluation import bench; \
bench._build('sd15', Path('/tmp/sd15/model'))"`)."""

import sys
import time


def main() -> None:
    t = time.time()
    from ldmkit.evaluation.bench import peak_rss_mb
    from ldmkit.pipelines import Pipeline

    Pipeline.load(sys.argv[1], precision=sys.argv[2] if len(sys.argv) > 2 else "fp32")
    print(f"load {time.time() - t:.1f} s, peak {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
