"""Whole images, each in a fresh process, alternated and repeated: ldmkit against diffusers, and what
ldmkit's malloc settings (ldmkit.pipelines.allocator) do for each. The machine's noise on one whole image is
several per cent, so single runs do not settle a ratio near a target; medians of alternated runs do.

    python benchmarks/allocator.py FOLDER [bf16|fp32] [ROUNDS]   (defaults: bf16, 3)

FOLDER: the SD 1.5 random-weight diffusers folder `ldmkit bench` builds (python -c "from pathlib import
Path; from ldmkit.evaluation import bench; bench._build('sd15', Path('/tmp/sd15/model'))"). Each round runs four
children (bench.child, whole image only: a warm-up image, then the timed one): ldmkit as it runs and
with LDMKIT_MALLOC=default; diffusers as it runs and with the same settings through glibc's environment
variables. Prints JSON: per variant the seconds of each round and their median, the ratios of medians,
and whether each implementation's image is identical with and without the settings."""

import json
import statistics
import sys
from pathlib import Path

import torch

from ldmkit.evaluation.bench import measure
from ldmkit.pipelines import allocator

GLIBC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(allocator.MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(allocator.TRIM_THRESHOLD),
    "MALLOC_TOP_PAD_": str(allocator.TOP_PAD),
}
VARIANTS = {
    "ldmkit": ("ldmkit", {}),
    "ldmkit, LDMKIT_MALLOC=default": ("ldmkit", {"LDMKIT_MALLOC": "default"}),
    "diffusers": ("diffusers", {}),
    "diffusers, ldmkit's malloc settings": ("diffusers", GLIBC_ENV),
}


def main():
    folder = Path(sys.argv[1])
    precision = sys.argv[2] if len(sys.argv) > 2 else "bf16"
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    seconds = {name: [] for name in VARIANTS}
    images = {}
    for _ in range(rounds):
        for name, (impl, env) in VARIANTS.items():
            r = measure(impl, folder, "full", precision, env, what="image")["image"]
            seconds[name].append(round(r["seconds"], 2))
            images.setdefault(name, r["out"])
    median = {name: statistics.median(s) for name, s in seconds.items()}
    report = {
        "precision": precision,
        "rounds": rounds,
        "seconds": seconds,
        "median_s": median,
        "diffusers / ldmkit": round(median["diffusers"] / median["ldmkit"], 3),
        "both with ldmkit's settings, diffusers / ldmkit": round(
            median["diffusers, ldmkit's malloc settings"] / median["ldmkit"], 3
        ),
        "both without, diffusers / ldmkit": round(median["diffusers"] / median["ldmkit, LDMKIT_MALLOC=default"], 3),
        "ldmkit: same image both ways": torch.equal(images["ldmkit"], images["ldmkit, LDMKIT_MALLOC=default"]),
        "diffusers: same image both ways": torch.equal(
            images["diffusers"], images["diffusers, ldmkit's malloc settings"]
        ),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
