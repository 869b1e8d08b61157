"""The tiny autoencoder: TAESD, madebyollin's "Tiny AutoEncoder for Stable Diffusion". Convolutions and
ReLUs only (no normalisation, no attention), distilled from a family's KL autoencoder so that it reads
and writes the same latents at a small fraction of the cost: the popular UIs' live previews, and a fast
final decode on CPUs.

Latent space: the diffusion model's. TAESD was trained on the KL autoencoder's latents after the
family's scale and shift, so its own scale is 1 ("There is no scaling_factor for TAESD", madebyollin/taesd
issue 3; every published diffusers config says scaling_factor 1.0, shift_factor 0.0). ComfyUI keeps
latents in the KL autoencoder's raw space and therefore feeds its tiny decoder `(x - vae_shift) *
vae_scale` with the family's numbers (taesd 0.18215; taesdxl 0.13025; taesd3 1.5305 and 0.0609; taef1
0.3611 and 0.1159): that expression is exactly our diffusion latents (AutoencoderKL.scale). ldmkit's
sampler produces those, so `TinyAutoencoder.decode` takes them as they are and returns images in
[-1, 1], as `Pipeline.decode` does. The config's `scaling_factor` / `shift_factor` are diffusers'
(`z / scaling_factor + shift_factor` before decoding, as its pipelines do), 1 and 0 in every release.

Layout: the original's nn.Sequential, indices and all, so its published files load by name:

    decoder  Clamp, conv(latent -> w), act, then per level: blocks, and between levels Upsample and a
             bias-free conv; last a conv(w -> 3). It works on [0, 1] images.
    encoder  conv(3 -> w), blocks, then per further level a stride-2 bias-free conv and blocks; last a
             conv(w -> latent).

diffusers' AutoencoderTiny builds the same layers (its decoder applies the Clamp outside its Sequential,
so its indices are one lower; checkpoints/taesd_files.py maps them)."""

from dataclasses import dataclass

import torch
from torch import nn

from ldmkit.errors import ConfigError

# diffusers' activation names (models/activations.py get_activation)
ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU}
# torch's interpolation modes that upsample a 2-D map (linear and trilinear are for 1-D and 3-D ones)
UPSAMPLE_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic")


@dataclass
class TinyAutoencoderConfig:
    """diffusers' AutoencoderTiny config fields that change what is computed, under its names and with
    its defaults (which are the published TAESD's). Its latent_magnitude / latent_shift only map latents
    to [0, 1] for storing them as 8-bit images and force_upcast concerns fp16: none changes a decode."""

    in_channels: int = 3
    out_channels: int = 3
    # One width per level. The original and diffusers build level i's convolutions from w_i to w_i, so
    # levels of different widths would not connect: every level of a part has the same width.
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    latent_channels: int = 4
    upsampling_scaling_factor: int = 2  # the decoder's, per level (the encoder always halves)
    upsample_fn: str = "nearest"
    act_fn: str = "relu"
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    def __post_init__(self):
        for part in ("encoder", "decoder"):
            widths, blocks = getattr(self, f"{part}_block_out_channels"), getattr(self, f"num_{part}_blocks")
            if not widths or len(widths) != len(blocks):
                raise ConfigError(
                    f"tiny autoencoder: {part}_block_out_channels {widths} and num_{part}_blocks {blocks} "
                    "need one entry per level each"
                )
            if len(set(widths)) != 1 or widths[0] < 1:
                raise ConfigError(
                    f"tiny autoencoder: {part} widths {widths}; allowed: one positive width for every level "
                    "(TAESD's levels convolve w -> w, so levels of different widths do not connect)"
                )
            if any(n < 0 for n in blocks):
                raise ConfigError(f"tiny autoencoder: num_{part}_blocks {blocks}; allowed: counts of 0 or more")
        if min(self.in_channels, self.out_channels, self.latent_channels, self.upsampling_scaling_factor) < 1:
            raise ConfigError("tiny autoencoder: channels and upsampling_scaling_factor must be 1 or more")
        if self.act_fn not in ACTIVATIONS:
            raise ConfigError(f"tiny autoencoder: act_fn {self.act_fn!r}; allowed: {', '.join(ACTIVATIONS)}")
        if self.upsample_fn not in UPSAMPLE_MODES:
            raise ConfigError(
                f"tiny autoencoder: upsample_fn {self.upsample_fn!r}; allowed: {', '.join(UPSAMPLE_MODES)}"
            )
        if self.scaling_factor == 0:
            raise ConfigError("tiny autoencoder: scaling_factor 0; latents are divided by it")

    @property
    def upsample_factor(self) -> int:
        """How many image pixels per latent pixel, per side, the decoder makes."""
        return self.upsampling_scaling_factor ** (len(self.num_decoder_blocks) - 1)

    @property
    def downsample_factor(self) -> int:
        """How many image pixels per latent pixel, per side, the encoder takes (each level halves)."""
        return 2 ** (len(self.num_encoder_blocks) - 1)


def conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """A soft clamp of the latents to (-3, 3): decoded latents far outside what the decoder was trained
    on saturate instead of blowing up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """The original's residual block: three 3x3 convolutions with the activation between them, added to
    the input, then ReLU (`fuse` is a ReLU whatever act_fn says, in the original and in diffusers). Input
    and output widths are equal in every TAESD, so the skip is the identity and has no weights."""

    def __init__(self, width: int, act: type[nn.Module]):
        super().__init__()
        self.conv = nn.Sequential(conv(width, width), act(), conv(width, width), act(), conv(width, width))
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + x)


class TinyEncoder(nn.Sequential):
    """Images in [0, 1] -> latents."""

    def __init__(self, c: TinyAutoencoderConfig):
        w, act = c.encoder_block_out_channels[0], ACTIVATIONS[c.act_fn]
        layers: list[nn.Module] = []
        for level, blocks in enumerate(c.num_encoder_blocks):
            layers.append(conv(c.in_channels, w) if level == 0 else conv(w, w, stride=2, bias=False))
            layers += [Block(w, act) for _ in range(blocks)]
        super().__init__(*layers, conv(w, c.latent_channels))


class TinyDecoder(nn.Sequential):
    """Latents -> images in [0, 1] (roughly: nothing clamps the output)."""

    def __init__(self, c: TinyAutoencoderConfig):
        w, act = c.decoder_block_out_channels[0], ACTIVATIONS[c.act_fn]
        layers: list[nn.Module] = [Clamp(), conv(c.latent_channels, w), act()]
        for level, blocks in enumerate(c.num_decoder_blocks):
            layers += [Block(w, act) for _ in range(blocks)]
            if level < len(c.num_decoder_blocks) - 1:
                layers += [nn.Upsample(scale_factor=c.upsampling_scaling_factor, mode=c.upsample_fn)]
                layers += [conv(w, w, bias=False)]
        super().__init__(*layers, conv(w, c.out_channels))


class TinyAutoencoder(nn.Module):
    """An encoder, a decoder, or both (the published files are mostly decoders alone), with ldmkit's
    conventions on both sides: diffusion latents, images in [-1, 1]. Attributes are named as the
    original's TAESD module names them (`encoder`, `decoder`)."""

    def __init__(self, config: TinyAutoencoderConfig, encoder: bool = True, decoder: bool = True):
        super().__init__()
        self.config = config
        self.encoder = TinyEncoder(config) if encoder else None
        self.decoder = TinyDecoder(config) if decoder else None

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(name for name in ("encoder", "decoder") if getattr(self, name) is not None)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion latents -> images in [-1, 1]."""
        if self.decoder is None:
            raise ConfigError("this tiny autoencoder has no decoder (its file held the encoder alone)")
        c = self.config
        return self.decoder(z / c.scaling_factor + c.shift_factor) * 2 - 1

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> diffusion latents. Deterministic: TAESD's encoder has no posterior."""
        if self.encoder is None:
            raise ConfigError("this tiny autoencoder has no encoder (its file held the decoder alone)")
        c = self.config
        return (self.encoder((pixels + 1) / 2) - c.shift_factor) * c.scaling_factor
