"""The latent statistics behind a model's scale factor (Rombach et al. 2022, sec. 4.3.2 and appendix G:
latents scaled by 1 / their std): encode every image of a folder with a model's autoencoder, sample each
posterior once (seeded, as training does) and report 1 / std over all of them, the same from random sets
of 128 images (what a run measures from its first four batches of 32), the model's own scale factor, and
the per-channel mean and std after that scale (how far the latents are from centred and unit variance).

    python benchmarks/latent_stats.py MODEL.safetensors IMAGE_FOLDER [--size 64]
"""

import argparse
import json
from pathlib import Path

import torch

from ldmkit.checkpoints.single_file import load_model
from ldmkit.data.images import DataConfig, open_dataset


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("folder")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    vae = load_model(Path(args.model).expanduser()).vae.eval()
    data = open_dataset(DataConfig(kind="folder", path=str(Path(args.folder).expanduser()), size=args.size))
    generator, zs = torch.Generator().manual_seed(0), []
    for start in range(0, len(data), args.batch):
        items = [data.load(i) for i in range(start, min(len(data), start + args.batch))]
        x = torch.stack([item[0] for item in items if item is not None])
        zs.append(vae.encode(x).sample(generator))
    z = torch.cat(zs)
    subsets = [torch.randperm(len(z), generator=torch.Generator().manual_seed(s))[:128] for s in range(5)]
    scale = vae.config.scale_factor
    report = {
        "images": len(z),
        "inverse_std": round(1 / z.std().item(), 4),
        "inverse_std_128": [round(1 / z[i].std().item(), 4) for i in subsets],
        "model_scale_factor": round(scale, 4),
        "channel_mean_scaled": [round(v * scale, 3) for v in z.mean(dim=(0, 2, 3)).tolist()],
        "channel_std_scaled": [round(v * scale, 3) for v in z.std(dim=(0, 2, 3)).tolist()],
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
