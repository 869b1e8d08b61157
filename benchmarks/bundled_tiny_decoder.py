"""The bundled shapes model's tiny decoder against its autoencoder: PSNR of the tiny decode against the full
decode (what it imitates) and against the rendered images, on held-out renders' posterior means, and the
decode seconds of each (warm, median of `runs`) at batch 1 and 16, 64x64.

    python benchmarks/bundled_tiny_decoder.py [N_IMAGES] [RUNS]      (defaults: 256 20)
"""

import json
import sys

import torch

from ldmkit.bundled import bundled_tiny_decoder
from ldmkit.checkpoints.taesd_files import read_tiny_autoencoder
from ldmkit.data.images import DataConfig, open_dataset
from ldmkit.evaluation.bench import describe_machine, median_seconds
from ldmkit.evaluation.metrics import psnr
from ldmkit.pipelines import Pipeline


def main(n: int = 256, runs: int = 20) -> dict:
    torch.set_num_threads(torch.get_num_threads())
    vae = Pipeline.load("shapes", precision="fp32").model.vae.eval()
    tiny = read_tiny_autoencoder(bundled_tiny_decoder("shapes")).autoencoder.eval()
    val = open_dataset(DataConfig(kind="shapes", split="val", n=n, size=64))
    images = torch.stack([val.load(i)[0] for i in range(n)])
    with torch.no_grad():
        raw = vae.encode(images).mean
        full = vae.decode(raw).clamp(-1, 1)
        small = tiny.decode(vae.scale(raw)).clamp(-1, 1)
        to01 = lambda t: (t + 1) / 2  # noqa: E731
        out = {
            "images": n,
            "psnr_tiny_vs_full": round(psnr(to01(full), to01(small)).mean().item(), 2),
            "psnr_tiny_vs_image": round(psnr(to01(images), to01(small)).mean().item(), 2),
            "psnr_full_vs_image": round(psnr(to01(images), to01(full)).mean().item(), 2),
            "decode_seconds": {},
        }
        for batch in (1, 16):
            z = raw[:batch]
            out["decode_seconds"][f"batch {batch}"] = {
                "full": round(median_seconds(lambda: vae.decode(z), runs), 5),
                "tiny": round(median_seconds(lambda: tiny.decode(vae.scale(z)), runs), 5),
            }
    out["machine"] = describe_machine()
    out["command"] = "python benchmarks/bundled_tiny_decoder.py " + " ".join(sys.argv[1:])
    return out


if __name__ == "__main__":
    print(json.dumps(main(*(int(a) for a in sys.argv[1:3])), indent=1))
