"""Channels-last vs the default layout for our UNet and VAE decoder, on this machine.

    python benchmarks/memory_format.py [--quick] [--precision fp32|bf16]

Prints JSON: median seconds of each (after one warm-up call), their ratio, and the max abs
difference between the two layouts' outputs. --quick uses the tiny preset (seconds, not minutes)."""

import argparse
import json

import torch

from ldmkit.evaluation.bench import median_seconds
from ldmkit.models.autoencoder import AutoencoderKL
from ldmkit.models.presets import preset
from ldmkit.models.unet import UNetModel


def compare(name, module, inputs, call, runs):
    with torch.no_grad():
        out_default = call(module, inputs)
        t_default = median_seconds(lambda: call(module, inputs), runs)
        module = module.to(memory_format=torch.channels_last)
        cl = [x.to(memory_format=torch.channels_last) if x.ndim == 4 else x for x in inputs]
        out_cl = call(module, cl)
        t_cl = median_seconds(lambda: call(module, cl), runs)
    return {
        "case": name,
        "default_s": round(t_default, 4),
        "channels_last_s": round(t_cl, 4),
        "speedup_channels_last": round(t_default / t_cl, 3),
        "max_abs_diff": float((out_default.float() - out_cl.float()).abs().max()),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = ap.parse_args()
    torch.manual_seed(0)
    config = preset("tiny" if args.quick else "sd15")
    latent = 8 if args.quick else 64
    results = {
        "command": "python benchmarks/memory_format.py"
        + (" --quick" if args.quick else "")
        + f" --precision {args.precision}",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": "tiny" if args.quick else "sd15",
        "precision": args.precision,
        "results": [],
    }
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    unet = UNetModel(config.unet).eval().to(dtype)
    for size in [latent] if args.quick else [latent, latent // 2]:
        x = torch.randn(2, 4, size, size).to(dtype)
        ctx = torch.randn(2, 77, config.unet.context_dim).to(dtype)
        results["results"].append(
            compare(
                f"unet guidance pair {size}x{size} latent",
                unet,
                [x, torch.tensor([500, 500]), ctx],
                lambda m, a: m(*a),
                args.runs,
            )
        )
        unet = unet.to(memory_format=torch.contiguous_format)
    del unet
    vae = AutoencoderKL(config.vae).eval().to(dtype)
    z = torch.randn(1, 4, latent, latent).to(dtype)
    results["results"].append(
        compare(f"vae decode {latent}x{latent} latent", vae, [z], lambda m, a: m.decode(a[0]), args.runs)
    )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
