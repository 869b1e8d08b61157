"""The optimiser and EMA parts of a training step on the emoji UNet (configs/emoji-ldm.yaml: 11.5M
parameters in 624 tensors), against the forward and backward they follow.

    python benchmarks/optimizer_step.py

Prints JSON, milliseconds (median of 6 after a warm-up): forward + backward at batch 32; AdamW's step
with torch's default for-loop implementation, foreach and fused; the EMA update as a loop of
mul_/add_ per tensor and as one fused lerp (what EMA.update in training/ema.py does)."""

import json

import torch
import yaml

from ldmkit.evaluation.bench import median_seconds
from ldmkit.models.unet import UNetConfig, UNetModel


def main():
    torch.manual_seed(0)
    cfg = yaml.safe_load(open("configs/emoji-ldm.yaml"))["unet"]
    unet = UNetModel(UNetConfig(**{**cfg, "channels": tuple(cfg["channels"]), "context_dim": 384})).train()
    x, t, ctx = torch.randn(32, 4, 16, 16), torch.randint(0, 1000, (32,)), torch.randn(32, 77, 384)

    def forward_backward():
        (unet(x, t, ctx) - x).pow(2).mean().backward()

    ms = {"forward_backward": median_seconds(forward_backward, 6) * 1e3}
    for kind in ("for-loop", "foreach", "fused"):
        extra = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[kind]
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, **extra)
        ms[f"adamw_{kind}"] = median_seconds(opt.step, 6) * 1e3
    state = unet.state_dict()
    ema = {k: v.detach().clone() for k, v in state.items()}
    floats = [k for k, v in state.items() if v.is_floating_point()]

    @torch.no_grad()
    def ema_loop():
        for k in floats:
            ema[k].mul_(0.999).add_(state[k], alpha=0.001)

    @torch.no_grad()
    def ema_lerp():
        torch._foreach_lerp_([ema[k] for k in floats], [state[k] for k in floats], 0.001)

    ms["ema_loop"] = median_seconds(ema_loop, 6) * 1e3
    ms["ema_foreach_lerp"] = median_seconds(ema_lerp, 6) * 1e3
    print(
        json.dumps(
            {
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "parameters_M": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2),
                "tensors": len(floats),
                "ms": {k: round(v, 1) for k, v in ms.items()},
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
