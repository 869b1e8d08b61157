"""Temporal layers: what turns an image network into a video network (Blattmann et al. 2023, "Align your
Latents"; Stable Video Diffusion). Frames travel through the spatial layers as a batch [B·F, C, H, W]; the
layers here mix along F — a residual block of (3, 1, 1) convolutions, a transformer whose attention runs
across frames at each pixel — and an `AlphaBlender` mixes their output with the spatial path's by a
learned factor. Names are the original code's (`time_stack`, `time_mixer.mix_factor`, `ff_in`), so video
checkpoints load by name."""

from dataclasses import dataclass

import torch
from torch import nn

from ldmkit.errors import ConfigError
from ldmkit.nn.attention import CrossAttention, FeedForward
from ldmkit.nn.embedding import timestep_embedding
from ldmkit.nn.resnet import GroupNorm32

MERGE_STRATEGIES = ("fixed", "learned", "learned_with_images")


@dataclass
class Frames:
    """What the temporal layers need beside the features: frames per clip and, per clip and frame, whether
    that frame is a still image (1: the temporal path is skipped for it), as a [B, F] tensor."""

    count: int
    image_only: torch.Tensor


class AlphaBlender(nn.Module):
    """alpha · spatial + (1 − alpha) · temporal. alpha is `mix_factor` itself ("fixed"), or its sigmoid
    ("learned"); "learned_with_images" also forces alpha = 1 on frames marked as still images, so a video
    model trained on images and videos together leaves images to the spatial path. `switch` swaps the two
    inputs' roles (the video autoencoder's convention: alpha weighs the temporal path)."""

    def __init__(self, alpha: float = 0.5, strategy: str = "learned_with_images", switch: bool = False):
        super().__init__()
        if strategy not in MERGE_STRATEGIES:
            raise ConfigError(f"merge strategy {strategy!r}; allowed: {list(MERGE_STRATEGIES)}")
        self.strategy = strategy
        self.switch = switch
        if strategy == "fixed":
            self.register_buffer("mix_factor", torch.tensor([float(alpha)]))
        else:
            self.mix_factor = nn.Parameter(torch.tensor([float(alpha)]))

    def alpha(self, frames: Frames | None, ndim: int) -> torch.Tensor:
        if self.strategy == "fixed":
            return self.mix_factor
        alpha = torch.sigmoid(self.mix_factor)
        if self.strategy == "learned" or frames is None:
            return alpha
        a = torch.where(frames.image_only.bool(), torch.ones_like(alpha), alpha)  # [B, F]
        # [B, C, F, H, W] features, or [B·F, tokens, C]
        return a[:, None, :, None, None] if ndim == 5 else a.reshape(-1, 1, 1)

    def forward(self, spatial: torch.Tensor, temporal: torch.Tensor, frames: Frames | None = None) -> torch.Tensor:
        alpha = self.alpha(frames, spatial.ndim).to(spatial.dtype)
        if self.switch:
            alpha = 1.0 - alpha
        return alpha * spatial + (1.0 - alpha) * temporal


class TemporalResBlock(nn.Module):
    """A residual block over [B, C, F, H, W] whose convolutions span `kernel` frames and one pixel (the
    original ResBlock with dims=3 and kernel (k, 1, 1)); the timestep embedding, one per frame [B, F, E], is
    added between them. emb_channels None: no embedding (the video autoencoder's)."""

    def __init__(self, channels: int, emb_channels: int | None, kernel: int = 3, eps: float = 1e-5, groups: int = 32):
        super().__init__()
        conv = dict(kernel_size=(kernel, 1, 1), padding=(kernel // 2, 0, 0))
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, channels, eps=eps), nn.SiLU(), nn.Conv3d(channels, channels, **conv)
        )
        if emb_channels is not None:
            self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, channels, eps=eps), nn.SiLU(), nn.Dropout(0.0), nn.Conv3d(channels, channels, **conv)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.in_layers(x)
        if hasattr(self, "emb_layers"):
            h = h + self.emb_layers(emb).to(h.dtype).permute(0, 2, 1)[:, :, :, None, None]
        return x + self.out_layers(h)


def to_clips(x: torch.Tensor, frames: int) -> torch.Tensor:
    """[B·F, C, H, W] -> [B, C, F, H, W]."""
    bf, c, h, w = x.shape
    return x.reshape(bf // frames, frames, c, h, w).permute(0, 2, 1, 3, 4)


def from_clips(x: torch.Tensor) -> torch.Tensor:
    """[B, C, F, H, W] -> [B·F, C, H, W]."""
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


class VideoTransformerBlock(nn.Module):
    """Attention across frames, pixel by pixel: tokens [B·F, S, C] are regrouped to [B·S, F, C]; a GEGLU
    feed-forward first (`ff_in`, residual), self-attention over the F frames, cross-attention to a per-clip
    context (the first frame's), feed-forward; pre-norm throughout."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None):
        super().__init__()
        self.norm_in = nn.LayerNorm(dim)
        self.ff_in = FeedForward(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        if context_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, frames: int, context: torch.Tensor | None = None) -> torch.Tensor:
        bf, s, c = x.shape
        b = bf // frames
        x = x.reshape(b, frames, s, c).permute(0, 2, 1, 3).reshape(b * s, frames, c)
        x = x + self.ff_in(self.norm_in(x))
        x = x + self.attn1(self.norm1(x))
        if hasattr(self, "attn2"):
            x = x + self.attn2(self.norm2(x), context)
        x = x + self.ff(self.norm3(x))
        return x.reshape(b, s, frames, c).permute(0, 2, 1, 3).reshape(bf, s, c)


class FramePositions(nn.Sequential):
    """The frame index's embedding added before each temporal transformer block: the sinusoidal embedding
    of 0..F−1 through a two-layer MLP (`time_pos_embed.0`, `.2`)."""

    def __init__(self, channels: int):
        super().__init__(nn.Linear(channels, 4 * channels), nn.SiLU(), nn.Linear(4 * channels, channels))
        self.channels = channels

    def embed(self, clips: int, frames: int, dtype, device) -> torch.Tensor:
        """[B·F, 1, C] for `clips` clips of `frames` frames."""
        index = torch.arange(frames, device=device).repeat(clips)
        return self(timestep_embedding(index, self.channels).to(dtype))[:, None, :]
