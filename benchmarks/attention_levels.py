"""Training throughput of the bundled shapes model's UNet with and without attention at 16x16, two
neighbouring sizes, the same UNet on an f = 8 autoencoder's latents (8x8x16, the same number of
values as f = 4's 16x16x4), and UNets for an f = 2 autoencoder's 32x32x4: the measurement behind
configs/shapes-ldm.yaml's architecture.

    python benchmarks/attention_levels.py [--threads 2] [--variants 1,5,6]

Prints one JSON line per variant: parameters and samples/s of fwd + bwd + AdamW, batch 32, 16x16x4
latents unless the variant names others, 32 MiniLM-sized context tokens, median of 3 steps after one warm-up step."""

import argparse
import json

import torch

from ldmkit.evaluation.bench import median_seconds
from ldmkit.models.unet import UNetConfig, UNetModel

VARIANTS = [
    {"attention_resolutions": (1, 2, 4), "num_res_blocks": 2, "channels": (64, 128, 128)},
    {"attention_resolutions": (2, 4), "num_res_blocks": 2, "channels": (64, 128, 128)},
    {"attention_resolutions": (1, 2, 4), "num_res_blocks": 1, "channels": (64, 128, 128)},
    {"attention_resolutions": (2, 4), "num_res_blocks": 2, "channels": (96, 192, 192)},
    {"latent": (16, 8, 8), "attention_resolutions": (1, 2, 4), "num_res_blocks": 2, "channels": (64, 128, 128)},
    # f = 2 (32x32x4): the same UNet (attention at 16x16 and 8x8), and with a level more (at 8x8, 4x4; 16x16)
    {"latent": (4, 32, 32), "attention_resolutions": (2, 4), "num_res_blocks": 2, "channels": (64, 128, 128)},
    {"latent": (4, 32, 32), "attention_resolutions": (4, 8), "num_res_blocks": 2, "channels": (64, 128, 128, 128)},
    {"latent": (4, 32, 32), "attention_resolutions": (4, 8), "num_res_blocks": 2, "channels": (32, 64, 128, 128)},
    {"latent": (4, 32, 32), "attention_resolutions": (2, 4, 8), "num_res_blocks": 2, "channels": (32, 64, 128, 128)},
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", help="which rows, by index from 0 (default: all), e.g. 1,5,6")
    args = ap.parse_args()
    chosen = [VARIANTS[int(i)] for i in args.variants.split(",")] if args.variants else VARIANTS
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    t, ctx = torch.randint(0, 1000, (32,), generator=g), torch.randn(32, 32, 384, generator=g)
    for v in chosen:
        latent = v.get("latent", (4, 16, 16))
        z = torch.randn(32, *latent, generator=g)
        arch = {k: x for k, x in v.items() if k != "latent"}
        unet = UNetModel(
            UNetConfig(
                in_channels=latent[0],
                out_channels=latent[0],
                num_head_channels=32,
                use_linear_in_transformer=True,
                context_dim=384,
                **arch,
            )
        )
        opt = torch.optim.AdamW(unet.parameters())

        def step():
            opt.zero_grad()
            unet(z, t, ctx).square().mean().backward()
            opt.step()

        seconds = median_seconds(step, 3)
        params = sum(p.numel() for p in unet.parameters())
        print(
            json.dumps(
                {
                    "latent": list(latent),
                    **{k: list(x) if isinstance(x, tuple) else x for k, x in arch.items()},
                    "params_m": round(params / 1e6, 2),
                    "samples_per_s": round(32 / seconds, 1),
                }
            )
        )


if __name__ == "__main__":
    main()
