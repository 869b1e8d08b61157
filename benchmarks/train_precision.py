"""One training step (forward, backward, optimiser) of the emoji networks in fp32, under bf16 autocast,
and under bf16 autocast with channels-last: the numbers behind `run.precision` (docs/training.md).

    python benchmarks/train_precision.py [--threads N]

Autoencoder: configs/emoji-autoencoder.yaml's (ch 64, f = 4), 64x64, batch 16, L1 loss.
UNet: configs/emoji-ldm.yaml's (11.5M parameters), 16x16x4 latents, 32 MiniLM tokens, batch 32.
Median seconds per step of 4 after one warm-up step; prints JSON."""

import argparse
import json

import torch

from ldmkit.evaluation.bench import median_seconds
from ldmkit.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldmkit.models.unet import UNetConfig, UNetModel


def seconds_per_step(net, loss_of, inputs, mode: str, runs: int = 4) -> float:
    cl = mode == "bf16-channels-last"
    net.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
    x = inputs[0].contiguous(memory_format=torch.channels_last) if cl else inputs[0]
    opt = torch.optim.AdamW(net.parameters(), 1e-5)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
            loss = loss_of(net, x, *inputs[1:])
        loss.backward()
        opt.step()

    return round(median_seconds(step, runs), 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ae = AutoencoderKL(AutoencoderConfig(channels=(64, 128, 128), num_res_blocks=1, norm_groups=32))
    image = torch.rand(16, 3, 64, 64) * 2 - 1

    def ae_loss(net, x):
        post = net.encode(x)
        return (net.decode(post.mean + post.std * torch.randn_like(post.std)).float() - x).abs().mean()

    unet = UNetModel(
        UNetConfig(
            channels=(64, 128, 128),
            num_res_blocks=2,
            attention_resolutions=(1, 2, 4),
            num_head_channels=32,
            transformer_depth=1,
            use_linear_in_transformer=True,
            context_dim=384,
        )
    )
    z, t, ctx = torch.randn(32, 4, 16, 16), torch.randint(0, 1000, (32,)), torch.randn(32, 32, 384)

    def unet_loss(net, x, t, ctx):
        return net(x, t, ctx).float().pow(2).mean()

    modes = ("fp32", "bf16", "bf16-channels-last")
    report = {"threads": torch.get_num_threads(), "seconds_per_step": {}}
    for name, net, loss_of, inputs in (("autoencoder", ae, ae_loss, (image,)), ("unet", unet, unet_loss, (z, t, ctx))):
        report["seconds_per_step"][name] = {m: seconds_per_step(net, loss_of, inputs, m) for m in modes}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
