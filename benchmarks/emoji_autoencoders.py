"""What the GAN term buys the emoji autoencoder: reconstruct every held-out emoji image with each
autoencoder given and report PSNR, SSIM and the edge-energy ratio (mean Sobel gradient magnitude of the
reconstructions over that of the originals: 1 is as sharp as the art, below 1 is blurred), and write a
grid (originals, then one row per autoencoder) of the first 12 images (docs/models.md, `emoji`).

    python benchmarks/emoji_autoencoders.py DATA OUT.png NAME=AUTOENCODER.safetensors ...
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ldmkit.checkpoints.single_file import load_vae_file
from ldmkit.evaluation.emoji_eval import load_set
from ldmkit.evaluation.metrics import psnr, ssim
from ldmkit.images import tensor_to_pil
from ldmkit.training.loop import image_grid


def edge_energy(x: torch.Tensor) -> torch.Tensor:
    """Mean Sobel gradient magnitude per image of [B, 3, H, W] in [0, 1] (channels averaged)."""
    k = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
    kernel = torch.stack([k, k.T])[:, None].repeat(3, 1, 1, 1)  # (gx, gy) per channel
    g = F.conv2d(x, kernel, groups=3).unflatten(1, (3, 2))
    return g.pow(2).sum(2).sqrt().flatten(1).mean(1)


@torch.no_grad()
def main() -> None:
    data, out = Path(sys.argv[1]).expanduser(), Path(sys.argv[2])
    named = [a.split("=", 1) for a in sys.argv[3:]]
    x, _, _ = load_set(data / "heldout", 64)
    real = (x + 1) / 2
    rows, report = [tensor_to_pil(x[:12])], {"images": len(x)}
    for name, path in named:
        vae = load_vae_file(Path(path).expanduser()).eval()
        rec = torch.cat([vae.decode(vae.encode(x[i : i + 64]).mode()).clamp(-1, 1) for i in range(0, len(x), 64)])
        r = (rec + 1) / 2
        report[name] = {
            "psnr_db": round(psnr(real, r).mean().item(), 2),
            "ssim": round(ssim(real, r).mean().item(), 4),
            "edge_energy_ratio": round((edge_energy(r).mean() / edge_energy(real).mean()).item(), 3),
        }
        rows.append(tensor_to_pil(rec[:12]))
    image_grid(rows).save(out)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
