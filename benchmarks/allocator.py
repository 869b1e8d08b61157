"""What ldmkit's malloc settings (ldmkit.allocator) buy, and what the same settings give diffusers.

    python benchmarks/allocator.py FOLDER [bf16|fp32]

FOLDER: the SD 1.5 random-weight diffusers folder `ldmkit bench` builds (python -c "from pathlib import
Path; from ldmkit import bench; bench._build('sd15', Path('/tmp/sd15/model'))"). Four fresh processes,
each bench.child (UNet guidance pair at 512² and 256², one VAE decode, a whole 20-step image): ldmkit
as it runs and with LDMKIT_MALLOC=default; diffusers as it runs and with the same settings through
glibc's environment variables. Prints seconds per row, and whether each pair's outputs are identical."""

import json
import sys
from pathlib import Path

import torch

from ldmkit import allocator
from ldmkit.bench import measure

GLIBC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(allocator.MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(allocator.TRIM_THRESHOLD),
    "MALLOC_TOP_PAD_": str(allocator.TOP_PAD),
}


def main():
    folder, precision = Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "bf16"
    runs = {
        "ldmkit": measure("ldmkit", folder, "full", precision),
        "ldmkit, LDMKIT_MALLOC=default": measure("ldmkit", folder, "full", precision, {"LDMKIT_MALLOC": "default"}),
        "diffusers": measure("diffusers", folder, "full", precision),
        "diffusers, ldmkit's settings": measure("diffusers", folder, "full", precision, GLIBC_ENV),
    }
    names = list(runs["ldmkit"])
    report = {name: {k: round(r[k]["seconds"], 3) for k in names} for name, r in runs.items()}
    for a, b in (("ldmkit", "ldmkit, LDMKIT_MALLOC=default"), ("diffusers", "diffusers, ldmkit's settings")):
        report[f"{a}: same outputs both ways"] = all(torch.equal(runs[a][k]["out"], runs[b][k]["out"]) for k in names)
    print(json.dumps({"precision": precision, "seconds": report}, indent=1))


if __name__ == "__main__":
    main()
