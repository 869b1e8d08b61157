"""Decoding large latents on the SD autoencoder's architecture (128-256-512-512, two residual blocks a
level, fp32, random weights seeded): the whole decode, ldmkit's banded decode (whole-image GroupNorm
statistics, margins covering the receptive field: models/banded_decoder.py) and independent tiles
(diffusers' `enable_tiling`, each tile normalised on its own). Each runs in a fresh process: its peak
memory (VmHWM) and time; its image is compared with the whole decode's (PSNR over 8-bit pixels).

    python benchmarks/banded_decode.py [SIDE ...]      (image sides; default 1024 2048)

Random weights measure faithfulness of the computation (banded must equal whole to rounding; tiles
need not), not image quality."""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

MODES = ("whole", "banded", "tiles")
TILE = 64  # latent pixels: SD's own size (512 px), diffusers' default tile


def child(side: int, mode: str, out: str) -> None:
    from ldmkit.evaluation.bench import peak_rss_mb
    from ldmkit.models.autoencoder import AutoencoderConfig, AutoencoderKL, tiled

    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderConfig()).eval()
    z = torch.randn(1, 4, side // 8, side // 8, generator=torch.Generator().manual_seed(1)) / 0.18215
    before = peak_rss_mb()
    t = time.perf_counter()
    with torch.no_grad():
        if mode == "whole":
            image = vae.decode(z)
        elif mode == "banded":
            image = vae.decode(z, TILE)
        else:
            image = tiled(lambda x: vae.decoder(vae.post_quant_conv(x)), z, TILE, TILE * 8)
    seconds = time.perf_counter() - t
    peak = peak_rss_mb()
    np.save(out, ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy())
    print(json.dumps({"seconds": round(seconds, 1), "peak_rss_mb": round(peak), "before_decode_mb": round(before)}))


def measure(side: int, mode: str, folder: Path) -> tuple[dict, np.ndarray | None]:
    out = folder / f"{mode}-{side}.npy"
    run = subprocess.run(
        [sys.executable, __file__, "--child", str(side), mode, str(out)], capture_output=True, text=True
    )
    if run.returncode == -9:  # the kernel's out-of-memory killer
        return {"killed": "SIGKILL: out of memory"}, None
    if run.returncode:
        raise RuntimeError(f"{mode} at {side}: {run.stderr.strip().splitlines()[-1]}")
    return json.loads(run.stdout.strip().splitlines()[-1]), np.load(out).astype(np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float | str:
    mse = float(((a - b) ** 2).mean())
    return "identical" if mse == 0 else round(10 * np.log10(255**2 / mse), 2)


def main() -> None:
    sides = [int(a) for a in sys.argv[1:]] or [1024, 2048]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for side in sides:
            results = {mode: measure(side, mode, Path(d)) for mode in MODES}
            whole = results["whole"][1]
            row = {"side": side}
            for mode, (stats, image) in results.items():
                row[mode] = stats
                if mode != "whole" and image is not None and whole is not None:
                    row[mode]["psnr_vs_whole_db"] = psnr(image, whole)
                    row[mode]["max_abs_diff_levels"] = float(np.abs(image - whole).max())
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    print(
        json.dumps({"rows": rows, "command": "python benchmarks/banded_decode.py " + " ".join(sys.argv[1:])}, indent=2)
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    else:
        main()
