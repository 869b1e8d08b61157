"""The autoencoder's decoder run in horizontal bands, equal to the whole decode up to float rounding.

Independent tiles (diffusers' `enable_tiling`) normalise each tile on its own statistics and see zero
padding at every tile border, so a tiled image differs from the whole one (≈ 25 dB). Here nothing is
approximated:

- the middle block (with its attention over every latent pixel) runs whole, at latent resolution,
  where it is small;
- every GroupNorm of the upsampling path uses the statistics of the whole feature map, accumulated
  band by band (sums and sums of squares, in float64), as the popular UI's tiled-VAE extension does;
- each band is computed from its rows plus a margin at least as deep as the receptive field of the
  convolutions that follow (2 rows for a residual block's two 3x3 convolutions, 1 for the others),
  and only its own rows are kept, so every kept value is the value the whole decode computes.

A residual block's second normalisation needs statistics of its first convolution's output over the
whole map, before any band can go on: a first pass over the bands computes them (the first convolution
runs twice). Memory: the block's input and output at full size plus one band's intermediates, instead
of the whole decode's several full-size intermediates."""

import torch
import torch.nn.functional as F


def _bands(height: int, rows: int):
    for start in range(0, height, rows):
        yield start, min(start + rows, height)


def _window(x: torch.Tensor, start: int, end: int, margin: int) -> tuple[torch.Tensor, int]:
    """Rows [start - margin, end + margin) of x, clipped to the image, and the offset of `start` in them."""
    lo = max(0, start - margin)
    return x[:, :, lo : min(x.shape[2], end + margin)], start - lo


class GroupStats:
    """Per-sample, per-group mean and inverse std of a feature map seen in pieces."""

    def __init__(self, norm: torch.nn.GroupNorm, batch: int):
        self.norm = norm
        self.sum = torch.zeros(batch, norm.num_groups, dtype=torch.float64)
        self.sq = torch.zeros_like(self.sum)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        g = x.double().reshape(x.shape[0], self.norm.num_groups, -1)
        self.sum += g.sum(-1).cpu()
        self.sq += (g * g).sum(-1).cpu()
        self.count += g.shape[-1]

    def of(self, x: torch.Tensor) -> "GroupStats":
        for start, end in _bands(x.shape[2], 64):
            self.add(x[:, :, start:end])
        return self

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The GroupNorm of x with these statistics (its affine weights included), in fp32."""
        mean = self.sum / self.count
        var = (self.sq / self.count - mean * mean).clamp(min=0)
        rstd = (var + self.norm.eps).rsqrt()
        b, c = x.shape[:2]
        shape = (b, self.norm.num_groups, 1, 1, 1)
        g = x.float().reshape(b, self.norm.num_groups, c // self.norm.num_groups, *x.shape[2:])
        y = ((g - mean.float().reshape(shape).to(x.device)) * rstd.float().reshape(shape).to(x.device)).reshape(x.shape)
        return y * self.norm.weight.float()[:, None, None] + self.norm.bias.float()[:, None, None]


def _conv(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return conv(x.to(conv.weight.dtype))


def resnet_block(block, x: torch.Tensor, rows: int) -> torch.Tensor:
    """ResnetBlock (models/autoencoder.py) band by band, with whole-map GroupNorm statistics."""
    s1 = GroupStats(block.norm1, x.shape[0]).of(x)
    s2 = GroupStats(block.norm2, x.shape[0])
    for start, end in _bands(x.shape[2], rows):  # first pass: statistics of conv1's output
        w, at = _window(x, start, end, 1)
        s2.add(_conv(block.conv1, F.silu(s1.apply(w)))[:, :, at : at + end - start])
    out = None
    for start, end in _bands(x.shape[2], rows):
        w, at = _window(x, start, end, 2)
        h = _conv(block.conv1, F.silu(s1.apply(w)))
        h = _conv(block.conv2, F.silu(s2.apply(h)))[:, :, at : at + end - start]
        core = x[:, :, start:end]
        skip = _conv(block.nin_shortcut, core) if hasattr(block, "nin_shortcut") else core
        band = skip + h.to(skip.dtype)
        if out is None:
            out = x.new_empty(x.shape[0], band.shape[1], x.shape[2], x.shape[3])
        out[:, :, start:end] = band
    return out


def upsample(up, x: torch.Tensor, rows: int) -> torch.Tensor:
    """Nearest x2 then a 3x3 convolution (models/autoencoder.Upsample), band by band."""
    out = x.new_empty(x.shape[0], up.conv.out_channels, 2 * x.shape[2], 2 * x.shape[3])
    for start, end in _bands(x.shape[2], rows):
        w, at = _window(x, start, end, 1)
        y = _conv(up.conv, F.interpolate(w, scale_factor=2.0, mode="nearest"))
        out[:, :, 2 * start : 2 * end] = y[:, :, 2 * at : 2 * (at + end - start)]
    return out


def decode(decoder, z: torch.Tensor, rows: int = 64) -> torch.Tensor:
    """Decoder(z) (models/autoencoder.Decoder), its full-resolution path in bands of `rows` rows."""
    h = decoder.mid(decoder.conv_in(z))
    for stage in reversed(decoder.up):
        for block in stage.block:
            h = resnet_block(block, h, rows)
        if hasattr(stage, "upsample"):
            h = upsample(stage.upsample, h, rows)
    stats = GroupStats(decoder.norm_out, h.shape[0]).of(h)
    out = None
    for start, end in _bands(h.shape[2], rows):
        w, at = _window(h, start, end, 1)
        y = _conv(decoder.conv_out, F.silu(stats.apply(w)))[:, :, at : at + end - start]
        if out is None:
            out = h.new_empty(h.shape[0], y.shape[1], h.shape[2], h.shape[3])
        out[:, :, start:end] = y
    return out
