"""A bundled few-step file that holds only its UNet (bundled.Bundled.shares): the model file FULL written
again without the parts it shares with BASE, after checking that they are BASE's to the last bit (a
distillation keeps its teacher's autoencoder and text tower frozen, so they are):

    python recipes/unet_only.py FULL.safetensors BASE.safetensors OUT.safetensors

Tensors are stored as FULL stores them (convert it to fp16 first); the header is FULL's, so the file
still says what the whole model is."""

import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ldmkit.checkpoints.detect import UNET
from ldmkit.checkpoints.single_file import SHARES_KEY  # the header names the file the rest is in


def main(full: Path, base: Path, out: Path) -> None:
    with safe_open(full, "pt") as f, safe_open(base, "pt") as b:
        shared = [k for k in f.keys() if not k.startswith(UNET) and k != "alphas_cumprod"]
        missing = [k for k in shared if k not in b.keys()]
        differ = [k for k in shared if k not in missing and not torch.equal(f.get_tensor(k), b.get_tensor(k))]
        if missing or differ:
            first = (missing + differ)[0]
            sys.exit(f"{full}: {len(missing)} parts not in {base}, {len(differ)} differ (first: {first})")
        kept = {k: f.get_tensor(k) for k in f.keys() if k not in shared}
        save_file(kept, out, {**f.metadata(), SHARES_KEY: base.name})
    print(f"{out}: {len(kept)} tensors, {out.stat().st_size / 2**20:.1f} MiB ({len(shared)} shared with {base.name})")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python recipes/unet_only.py FULL.safetensors BASE.safetensors OUT.safetensors")
    main(*(Path(a).expanduser() for a in sys.argv[1:]))
