"""Residual blocks and resampling layers, named as in the original LDM code so checkpoint keys
load by name (`in_layers`, `emb_layers`, `out_layers`, `skip_connection`, `op`)."""

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the activation or weight dtype: its statistics overflow in
    fp16 and lose precision in bf16. On CPU, bf16 activations go to the kernel as they are, with fp32
    affine weights: it accumulates and normalises in fp32 itself (the same result within a few bf16
    rounding steps) and is 3-13x faster than a round trip through an fp32 copy at SD 1.5's sizes
    (python benchmarks/group_norm_bf16.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu":
            w = self.weight.float() if self.weight is not None else None
            b = self.bias.float() if self.bias is not None else None
            return F.group_norm(x, self.num_groups, w, b, self.eps)
        if self.weight is None or self.weight.dtype == torch.float32:
            return super().forward(x.float()).to(x.dtype)
        w, b = self.weight.float(), self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def normalization(channels: int, groups: int = 32, eps: float = 1e-5) -> nn.GroupNorm:
    return GroupNorm32(groups, channels, eps=eps)


class ResBlock(nn.Module):
    """UNet residual block: the timestep embedding is added between the two convolutions."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int,
        dropout: float = 0.0,
        groups: int = 32,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.in_layers = nn.Sequential(
            normalization(channels, groups, eps), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels, groups, eps),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Stride-2 convolution; padding 1 makes odd sizes round up (9 -> 5), as in diffusers."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling then a convolution. Upsampling goes to the size of the skip
    connection it will meet, so odd latent sizes (e.g. 9 -> 5 -> 9) come back to their size."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)
