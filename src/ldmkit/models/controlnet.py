"""ControlNet (Zhang et al. 2023): spatial control of a frozen UNet through a trainable copy of its
input and middle blocks.

The copy sees the noisy latent plus a hint (a control image in [0, 1], encoded down to latent
resolution by a small conv net), and hands one residual per skip connection and one for the middle
block back to the frozen UNet, each through a zero-initialised 1x1 convolution. The zeros are the
point: a fresh ControlNet changes nothing, and training starts from the base model's behaviour.

Module names follow the original code (`input_hint_block`, `zero_convs`, `middle_block_out`), so
an original checkpoint's `control_model.*` keys load without renaming. An SDXL ControlNet copies the
addition embedding (`label_emb`) too, and is given the same y as the UNet it drives."""

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ldmkit.errors import ConfigError
from ldmkit.models.unet import TimestepEmbedSequential, UNetConfig, UNetModel


def zero_conv(channels: int) -> TimestepEmbedSequential:
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return TimestepEmbedSequential(conv)


@dataclass
class ControlNetConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)  # the base UNet's architecture
    hint_channels: int = 3
    # Channels of the hint encoder's stages; each stage after the first halves the resolution, so
    # len - 1 must be log2 of the autoencoder's factor (original: 16, 32, 96, 256 for f = 8).
    hint_block_channels: tuple[int, ...] = (16, 32, 96, 256)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.hint_block_channels) - 1)


def hint_encoder(c: ControlNetConfig) -> nn.Sequential:
    """conv, then per stage (conv, strided conv), SiLU after each, then a zero-initialised conv to the
    UNet's width: the original layout, whose parameter indices (0, 2, 4, ...) real files use."""
    chs = c.hint_block_channels
    layers: list[nn.Module] = [nn.Conv2d(c.hint_channels, chs[0], 3, padding=1), nn.SiLU()]
    for a, b in zip(chs[:-1], chs[1:]):
        layers += [nn.Conv2d(a, a, 3, padding=1), nn.SiLU(), nn.Conv2d(a, b, 3, padding=1, stride=2), nn.SiLU()]
    out = nn.Conv2d(chs[-1], c.unet.model_channels, 3, padding=1)
    nn.init.zeros_(out.weight)
    nn.init.zeros_(out.bias)
    return nn.Sequential(*layers, out)


class ControlNet(UNetModel):
    def __init__(self, config: ControlNetConfig):
        super().__init__(config.unet, encoder_only=True)
        self.control_config = config
        self.input_hint_block = hint_encoder(config)
        self.zero_convs = nn.ModuleList([zero_conv(ch) for ch in self.skip_channels])
        self.middle_block_out = zero_conv(self.skip_channels[-1])

    @classmethod
    def from_unet(cls, unet: UNetModel, **options) -> "ControlNet":
        """A new ControlNet whose copied blocks start as the base UNet's weights."""
        net = cls(ControlNetConfig(unet=unet.config, **options))
        own = net.state_dict()
        copied = {k: v for k, v in unet.state_dict().items() if k in own}
        net.load_state_dict(copied, strict=False)
        return net.to(next(unet.parameters()).dtype)

    def check_base(self, unet_config: UNetConfig) -> None:
        """Refuse a base UNet whose skip connections, text context or addition embedding input this
        ControlNet does not fit."""
        why = misfit(self.config, unet_config)
        if why:
            raise ConfigError(f"ControlNet does not fit this model: {why}")

    def forward(
        self,
        x: torch.Tensor,
        hint: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Residuals for the base UNet's skips (input block order) and, last, its middle block.
        hint: [B, hint_channels, H, W] at image resolution, values in [0, 1]; y: the base UNet's class
        or addition embedding input (SDXL: pooled text + embedded micro-conditioning)."""
        emb = self.embed(x, timesteps, y, timestep_cond)
        f = self.control_config.downsample_factor
        if hint.shape[-2:] != (x.shape[-2] * f, x.shape[-1] * f):
            raise ConfigError(f"ControlNet: hint of size {tuple(hint.shape[-2:])} for latents {tuple(x.shape[-2:])}")
        guided = self.input_hint_block(hint.to(x.dtype))
        out = []
        h = x
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided
            out.append(zero(h, emb, context))
        h = self.middle_block(h, emb, context)
        out.append(self.middle_block_out(h, emb, context))
        return out


def misfit(control: UNetConfig, base: UNetConfig) -> str | None:
    """Why a ControlNet of this architecture cannot drive that base UNet (None: it can). The residuals
    must match the base's skips; the ControlNet reads the base's text context and, SDXL's, the same
    addition embedding input y (pooled text + micro-conditioning)."""

    def shape(c: UNetConfig) -> tuple:
        adm = c.adm_in_channels if c.num_classes == "sequential" else c.num_classes
        res = c.num_res_blocks if isinstance(c.num_res_blocks, int) else tuple(c.num_res_blocks)
        if isinstance(res, tuple) and len(set(res)) == 1:
            res = res[0]
        return c.in_channels, tuple(c.channels), res, c.middle_block, c.context_dim, adm

    if shape(control) == shape(base):
        return None
    names = "(latent channels, level widths, res blocks, middle block, context size, addition embedding input)"
    return f"{names} {shape(control)} vs the model's {shape(base)}"


def guess_mode_scales(n: int) -> list[float]:
    """The original work's per-residual scales in guess mode: 0.825^(12 - i) for SD's 13 residuals,
    deepest (middle block) at 1. diffusers uses logspace(-1, 0, n) instead, a slightly different curve."""
    return [0.825 ** float(n - 1 - i) for i in range(n)]
