"""Training throughput of our networks against diffusers' with the same architecture, the same
weights, the same batch, in one run: forward + backward + optimiser step, images per second.

    python benchmarks/train_throughput.py [--quick] [--threads N]

UNet: the 13M-parameter shapes architecture (16x16x4 latents, MiniLM-width context, batch 16).
VAE: the f = 4 shapes autoencoder at 64x64 (L1 loss, batch 16). Prints JSON with ratios
ldmkit/diffusers (> 1: ldmkit is faster)."""

import argparse
import json
import statistics
import time

import torch

from ldmkit.checkpoints.diffusers_folder import unet_config_to_diffusers, vae_config_to_diffusers
from ldmkit.checkpoints.keymaps import rename, unet_to_diffusers, vae_to_diffusers_state
from ldmkit.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldmkit.models.unet import UNetConfig, UNetModel


def rate(step, batch: int, runs: int) -> float:
    step()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def unet_step(model, diffusers: bool, x, t, ctx, opt, bf16: bool = False):
    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x, t, ctx).sample if diffusers else model(x, t, ctx)
        out.float().pow(2).mean().backward()
        opt.step()

    return step


def vae_step(model, diffusers: bool, x, opt):
    def step():
        opt.zero_grad(set_to_none=True)
        if diffusers:
            z = model.encode(x).latent_dist.sample()
            rec = model.decode(z).sample
        else:
            rec = model.decode(model.encode(x).sample())
        (x - rec).abs().mean().backward()
        opt.step()

    return step


def main():
    import diffusers

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runs, batch = (3, 8) if args.quick else (7, 16)
    torch.manual_seed(0)
    uc = UNetConfig(
        channels=(64, 128, 128),
        num_res_blocks=2,
        attention_resolutions=(2, 4),
        num_heads=4,
        context_dim=384,
        norm_groups=32,
    )
    ours = UNetModel(uc)
    ref = diffusers.UNet2DConditionModel(
        **{k: v for k, v in unet_config_to_diffusers(uc, 16).items() if not k.startswith("_")}
    )
    ref.load_state_dict(rename(ours.state_dict(), unet_to_diffusers(uc)))
    x, t, ctx = torch.randn(batch, 4, 16, 16), torch.randint(0, 1000, (batch,)), torch.randn(batch, 32, 384)
    results = {
        "command": "python benchmarks/train_throughput.py" + (" --quick" if args.quick else ""),
        "threads": torch.get_num_threads(),
        "batch": batch,
        "unet_parameters": sum(p.numel() for p in ours.parameters()),
    }
    r_ours = rate(unet_step(ours, False, x, t, ctx, torch.optim.AdamW(ours.parameters(), 1e-4)), batch, runs)
    r_ref = rate(unet_step(ref, True, x, t, ctx, torch.optim.AdamW(ref.parameters(), 1e-4)), batch, runs)
    opt = torch.optim.AdamW(ours.parameters(), 1e-4)
    r_bf16 = rate(unet_step(ours, False, x, t, ctx, opt, bf16=True), batch, runs)
    results["unet_images_per_s"] = {
        "ldmkit": round(r_ours, 1),
        "diffusers": round(r_ref, 1),
        "ratio": round(r_ours / r_ref, 3),
        "ldmkit_bf16_autocast": round(r_bf16, 1),
        "bf16_autocast_speedup": round(r_bf16 / r_ours, 3),
    }
    vc = AutoencoderConfig(channels=(32, 64, 64), num_res_blocks=1, norm_groups=16)
    ours_v = AutoencoderKL(vc)
    ref_v = diffusers.AutoencoderKL(
        **{k: v for k, v in vae_config_to_diffusers(vc, 64).items() if not k.startswith("_")}
    )
    ref_v.load_state_dict(vae_to_diffusers_state(ours_v.state_dict(), vc))
    img = torch.rand(batch, 3, 64, 64) * 2 - 1
    r_ours = rate(vae_step(ours_v, False, img, torch.optim.Adam(ours_v.parameters(), 1e-4)), batch, runs)
    r_ref = rate(vae_step(ref_v, True, img, torch.optim.Adam(ref_v.parameters(), 1e-4)), batch, runs)
    results["vae_images_per_s"] = {
        "ldmkit": round(r_ours, 1),
        "diffusers": round(r_ref, 1),
        "ratio": round(r_ours / r_ref, 3),
        "parameters": sum(p.numel() for p in ours_v.parameters()),
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
