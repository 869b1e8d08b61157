"""Independent-tile autoencoder decoding (diffusers' enable_tiling; ldmkit's own large-image decode is
banded and exact: benchmarks/banded_decode.py) on a trained autoencoder (the bundled shapes model's):
peak memory of a whole and a tiled decode, each in a fresh process, and how far the tiled image is from
the whole one (the seams: each tile is normalised on its own) — docs/performance.md.

    python benchmarks/tiled_vae.py [SIDE ...]      (image sides; default 512 1024 2048)

The latent is a real one: a mosaic of 64 × 64 shapes-world scenes, encoded (in tiles, so that
encoding is not what is measured); besides tiled against whole, both are compared with the mosaic."""

import json
import subprocess
import sys
import time

import numpy as np
import torch


def mosaic(side: int):
    """A side × side image made of 64 × 64 validation scenes: each region is what the autoencoder was
    trained on (one scene drawn at 512² is not: it decodes badly whole or tiled)."""
    from PIL import Image

    from ldmkit.data.shapes import render, sample_scene

    image = Image.new("RGB", (side, side))
    for k in range((side // 64) ** 2):
        image.paste(render(sample_scene("val", k)), ((k % (side // 64)) * 64, (k // (side // 64)) * 64))
    return image


def latent(side: int):
    from ldmkit.images import pil_to_tensor
    from ldmkit.pipelines import Pipeline

    vae = Pipeline.load(None).model.vae
    x = pil_to_tensor(mosaic(side), side, side)
    with torch.no_grad():
        return vae, vae.encode(x, tile=64 // vae.config.downsample_factor).mode(), x


def decode(side: int, tiled: bool, loaded=None):
    vae, z, _ = loaded or latent(side)
    tile = 64 // vae.config.downsample_factor  # the model's own size, as --tiled-vae auto picks
    from ldmkit.models.autoencoder import tiled as independent_tiles

    with torch.no_grad():
        t = time.perf_counter()
        if tiled:  # independent tiles (diffusers' enable_tiling), each normalised on its own
            f = vae.config.downsample_factor
            image = independent_tiles(lambda x: vae.decode(x), z, tile, tile * f).clamp(-1, 1)
        else:
            image = vae.decode(z).clamp(-1, 1)
        return image, time.perf_counter() - t


def child(side: int, tiled: bool) -> None:
    from ldmkit.evaluation.bench import peak_rss_mb

    loaded = latent(side)
    before = peak_rss_mb()
    _, seconds = decode(side, tiled, loaded)
    peak = peak_rss_mb()
    print(json.dumps({"seconds": round(seconds, 2), "peak_rss_mb": round(peak), "before_decode_mb": round(before)}))


def measure(side: int, tiled: bool) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(side), str(int(tiled))], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    sides = [int(a) for a in sys.argv[1:]] or [512, 1024, 2048]
    torch.manual_seed(0)
    rows = []
    for side in sides:
        loaded = latent(side)
        whole, _ = decode(side, False, loaded)
        tiled, _ = decode(side, True, loaded)
        truth = ((loaded[2] + 1) * 127.5).round()
        a = ((whole + 1) * 127.5).round()
        b = ((tiled + 1) * 127.5).round()
        diff = (a - b).abs()
        mse = float(((a - b) ** 2).mean())
        rows.append(
            {
                "side": side,
                "whole": measure(side, False),
                "tiled": measure(side, True),
                "max_abs_diff_levels": float(diff.max()),
                "mean_abs_diff_levels": round(float(diff.mean()), 4),
                "pixels_off_by_more_than_2_levels": round(float((diff > 2).float().mean()), 6),
                "psnr_db": round(10 * np.log10(255**2 / max(mse, 1e-12)), 2),
                "psnr_whole_vs_mosaic_db": round(10 * np.log10(255**2 / float(((a - truth) ** 2).mean())), 2),
                "psnr_tiled_vs_mosaic_db": round(10 * np.log10(255**2 / float(((b - truth) ** 2).mean())), 2),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(json.dumps({"rows": rows, "command": "python benchmarks/tiled_vae.py " + " ".join(sys.argv[1:])}, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), bool(int(sys.argv[3])))
    else:
        main()
