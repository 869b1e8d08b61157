"""The first stage: a KL-regularised autoencoder (Rombach et al. 2022, sec. 3.1) that compresses
an image by a factor f = 2^(levels - 1) per side into a latent z with a diagonal Gaussian posterior.

Names follow the original checkpoint (`encoder.down.0.block.1`, `mid.attn_1`, `quant_conv`), so
`first_stage_model.*` loads by name. f = 4, 8, 16 is a change of the number of levels only."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.config import widths_from_multipliers
from ldmkit.errors import ConfigError
from ldmkit.nn.resnet import GroupNorm32


@dataclass
class AutoencoderConfig:
    in_channels: int = 3
    out_channels: int = 3
    # Width of each level, full resolution first (diffusers' `block_out_channels`).
    channels: tuple[int, ...] = (128, 256, 512, 512)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    # Multiplies z before diffusion so it has roughly unit variance (SD 1/2: 0.18215); SD3/Flux
    # VAEs also subtract a shift. Stored with the model because the UNet was trained with it.
    scale_factor: float = 0.18215
    shift_factor: float = 0.0
    use_quant_conv: bool = True
    dropout: float = 0.0
    norm_groups: int = 32
    # Self-attention in the middle blocks (diffusers' `mid_block_add_attention`).
    mid_attention: bool = True

    def __post_init__(self):
        if not self.channels or any(w % self.norm_groups for w in self.channels):
            raise ConfigError(
                f"AutoencoderConfig: widths {self.channels} not all divisible by norm_groups {self.norm_groups}"
            )

    @classmethod
    def migrate(cls, d: dict) -> dict:
        """Configs stored before widths were stored as widths: `ch` x `ch_mult`."""
        return widths_from_multipliers(d, "ch", "ch_mult", 128)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return GroupNorm32(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels, with 1x1 convolutions as projections."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    # Queries per attention call: torch's CPU kernel holds the whole score matrix for this single-head
    # shape at 65,536 pixels (a 2048² image's latent: 16 GB, killed here), so large maps attend in query
    # blocks whose scores stay near 256 MB. Each query's softmax is over all keys either way: exact.
    SCORE_BYTES = 1 << 28

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).flatten(2).transpose(1, 2)[:, None] for m in (self.q, self.k, self.v))
        n = h * w
        block = max(256, self.SCORE_BYTES // (4 * n * b))
        if n <= block:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = torch.cat([F.scaled_dot_product_attention(q[:, :, i : i + block], k, v) for i in range(0, n, block)], 2)
        return x + self.proj_out(y[:, 0].transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 convolution with asymmetric padding (right and bottom), as the original code."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float, groups: int, attention: bool = True, block=ResnetBlock):
        super().__init__()
        self.block_1 = block(channels, channels, dropout, groups)
        self.attn_1 = AttnBlock(channels, groups) if attention else nn.Identity()
        self.block_2 = block(channels, channels, dropout, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        g = c.norm_groups
        self.conv_in = nn.Conv2d(c.in_channels, c.channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        block_in = c.channels[0]
        for level, width in enumerate(c.channels):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(c.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, width, c.dropout, g))
                block_in = width
            if level != len(c.channels) - 1:
                stage.downsample = Downsample(block_in)
            self.down.append(stage)
        self.mid = _Mid(block_in, c.dropout, g, c.mid_attention)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, 2 * c.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """block: the residual block's class (the video decoder's adds a temporal half)."""

    def __init__(self, c: AutoencoderConfig, block=ResnetBlock):
        super().__init__()
        g = c.norm_groups
        block_in = c.channels[-1]
        self.conv_in = nn.Conv2d(c.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, c.dropout, g, c.mid_attention, block)
        # `up` is indexed by level (0 = full resolution) but run from the deepest level up.
        up = []
        for level in reversed(range(len(c.channels))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(c.num_res_blocks + 1):
                stage.block.append(block(block_in, c.channels[level], c.dropout, g))
                block_in = c.channels[level]
            if level != 0:
                stage.upsample = Upsample(block_in)
            up.insert(0, stage)
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(mean, exp(logvar)); logvar is clamped to [-30, 20] as in
    the paper's code so that exp() stays finite."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # Noise is drawn on the CPU generator's device, then moved: seeds travel across devices.
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over latent dimensions."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> None:
    """Ramp the first `extent` rows (dim 2) or columns (dim 3) of b from a's last ones, in place."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent <= 0:
        return
    shape = [1] * b.ndim
    shape[dim] = extent
    w = (torch.arange(extent, dtype=torch.float32, device=b.device) / extent).reshape(shape).to(b.dtype)
    head = b.narrow(dim, 0, extent)
    head.copy_(a.narrow(dim, a.shape[dim] - extent, extent) * (1 - w) + head * w)


def tiled(fn, x: torch.Tensor, tile_in: int, tile_out: int, overlap: float = 0.25) -> torch.Tensor:
    """fn over overlapping tiles of x (tile_in pixels, a quarter overlapping), outputs cross-faded
    over the overlap -- diffusers' tiling, tile for tile, so that the two agree. Each tile is
    normalised on its own (GroupNorm), so tiles differ from the whole: the cross-fade hides the seams.
    Encoding uses it; decoding has an exact banded form (banded_decoder)."""
    step = int(tile_in * (1 - overlap))
    extent = int(tile_out * overlap)
    keep = tile_out - extent
    rows = [
        [fn(x[:, :, i : i + tile_in, j : j + tile_in]) for j in range(0, x.shape[3], step)]
        for i in range(0, x.shape[2], step)
    ]
    out = []
    for i, row in enumerate(rows):
        for j, t in enumerate(row):  # in order: each tile blends with its already-blended neighbours
            if i:
                _blend(rows[i - 1][j], t, extent, 2)
            if j:
                _blend(row[j - 1], t, extent, 3)
        out.append(torch.cat([t[:, :, :keep, :keep] for t in row], dim=3))
    return torch.cat(out, dim=2)


class AutoencoderKL(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        if c.use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * c.z_channels, 2 * c.embed_dim, 1)
            self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)

    def encode(self, x: torch.Tensor, tile: int | None = None) -> DiagonalGaussian:
        """x in [-1, 1] -> posterior over the (unscaled) latent. With `tile` (latent pixels), images
        larger than tile * f are encoded in overlapping tiles (see `tiled`)."""

        def run(x):
            moments = self.encoder(x)
            return self.quant_conv(moments) if self.config.use_quant_conv else moments

        f = self.config.downsample_factor
        if tile is not None and max(x.shape[-2:]) > tile * f:
            return DiagonalGaussian(tiled(run, x, tile * f, tile))
        return DiagonalGaussian(run(x))

    def decode(self, z: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Unscaled latent -> image in [-1, 1] (not clamped). With `tile` (latent pixels), latents larger
        than that are decoded in bands of `tile` rows with whole-image statistics (banded_decoder):
        the same image within float rounding, with less memory."""
        from ldmkit.models import banded_decoder

        h = self.post_quant_conv(z) if self.config.use_quant_conv else z
        if tile is not None and max(z.shape[-2:]) > tile:
            return banded_decoder.decode(self.decoder, h, rows=tile)
        return self.decoder(h)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True):
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """Encoder latent -> diffusion latent."""
        return (z - self.config.shift_factor) * self.config.scale_factor

    def unscale(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion latent -> decoder latent."""
        return z / self.config.scale_factor + self.config.shift_factor
