"""Stable Video Diffusion's denoiser (Blattmann et al. 2023): the image UNet with temporal layers inserted —
each residual block followed by a temporal residual block, each spatial transformer interleaved with
transformer blocks that attend across frames, each pair mixed by a learned factor (nn/temporal.py).

Frames travel as a batch: x [B, F, C, H, W] is flattened to [B·F, C, H, W] for the spatial layers; the
timestep embedding (plus SVD's fps / motion / noise-augmentation numbers, embedded like SDXL's size
conditioning) and the context are repeated per frame. Names are the original video model's
(`input_blocks.1.0.time_stack`, `time_mixer.mix_factor`, `time_pos_embed`), so `model.diffusion_model.*`
of an SVD file loads by name."""

from dataclasses import dataclass

import torch
from torch import nn

from ldmkit.errors import ConfigError
from ldmkit.models.unet import UNetConfig, UNetModel
from ldmkit.nn.attention import SpatialTransformer
from ldmkit.nn.embedding import size_embedding
from ldmkit.nn.resnet import ResBlock
from ldmkit.nn.temporal import (
    MERGE_STRATEGIES,
    AlphaBlender,
    FramePositions,
    Frames,
    TemporalResBlock,
    VideoTransformerBlock,
    from_clips,
    to_clips,
)

EPS_LAYOUTS = ("original", "diffusers")


@dataclass
class VideoUNetConfig(UNetConfig):
    """Defaults: SVD's (image-to-video: 4 noisy + 4 conditioning-frame latent channels in, the CLIP image
    embedding as a one-token context, three conditioning numbers of 256 channels each)."""

    in_channels: int = 8
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    num_head_channels: int = 64
    num_heads: int | tuple[int, ...] = -1
    context_dim: int = 1024
    use_linear_in_transformer: bool = True
    num_classes: int | str | None = "sequential"
    adm_in_channels: int | None = 768
    addition_time_embed_dim: int | None = 256
    # How temporal and spatial paths are mixed (nn/temporal.AlphaBlender) and the mix a new layer starts at.
    merge_strategy: str = "learned_with_images"
    merge_factor: float = 0.5
    video_kernel: int = 3  # frames each temporal convolution spans
    num_frames: int = 25  # the clip length the model was trained for: the default
    # GroupNorm epsilons: the original code's (norm_eps everywhere) or diffusers' port, which uses 1e-6 in
    # the down levels with attention and in every up block. A folder is computed as diffusers computes it,
    # a single file as the original code does.
    eps_layout: str = "original"

    def __post_init__(self):
        super().__post_init__()
        if self.merge_strategy not in MERGE_STRATEGIES:
            raise ConfigError(
                f"VideoUNetConfig.merge_strategy {self.merge_strategy!r}; allowed: {list(MERGE_STRATEGIES)}"
            )
        if self.eps_layout not in EPS_LAYOUTS:
            raise ConfigError(f"VideoUNetConfig.eps_layout {self.eps_layout!r}; allowed: {list(EPS_LAYOUTS)}")
        if self.video_kernel < 1 or self.video_kernel % 2 != 1:
            raise ConfigError(f"VideoUNetConfig.video_kernel {self.video_kernel}; allowed: an odd number of frames")
        if self.num_frames < 1:
            raise ConfigError(f"VideoUNetConfig.num_frames {self.num_frames}; allowed: 1 or more")
        for level, width in enumerate(self.channels):
            heads, dim_head = self.heads_at(level, width)
            if heads * dim_head != width:
                raise ConfigError(f"VideoUNetConfig: level {level}'s width {width} does not split into {heads} heads")

    def eps_at(self, part: str, level: int) -> float:
        if self.eps_layout == "original" or part == "middle":
            return self.norm_eps
        return 1e-6 if part == "up" or self.has_attention(level) else self.norm_eps


class VideoResBlock(ResBlock):
    """The spatial residual block, then a temporal one over its output, mixed."""

    def __init__(self, channels, emb_channels, out_channels, dropout, groups, eps, kernel, strategy, alpha):
        super().__init__(channels, emb_channels, out_channels, dropout, groups, eps)
        self.time_stack = TemporalResBlock(out_channels, emb_channels, kernel, eps, groups)
        self.time_mixer = AlphaBlender(alpha, strategy)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, frames: Frames) -> torch.Tensor:
        spatial = to_clips(super().forward(x, emb), frames.count)
        temporal = self.time_stack(spatial, emb.reshape(-1, frames.count, emb.shape[-1]))
        return from_clips(self.time_mixer(spatial, temporal, frames))


class SpatialVideoTransformer(SpatialTransformer):
    """Each spatial transformer block is followed by a temporal one (over the frame-position-embedded
    tokens, cross-attending to each clip's first-frame context), the two mixed."""

    def __init__(
        self, channels, heads, dim_head, depth, context_dim, use_linear, dropout, groups, disable, strategy, alpha
    ):
        super().__init__(channels, heads, dim_head, depth, context_dim, use_linear, dropout, groups, disable)
        self.time_stack = nn.ModuleList(
            VideoTransformerBlock(channels, heads, dim_head, context_dim) for _ in range(depth)
        )
        self.time_pos_embed = FramePositions(channels)
        self.time_mixer = AlphaBlender(alpha, strategy)

    def forward(self, x: torch.Tensor, context: torch.Tensor, frames: Frames) -> torch.Tensor:
        bf, _, h, w = x.shape
        f = frames.count
        time_context = context[::f].repeat_interleave(h * w, dim=0)  # each clip's first frame's, per pixel
        tokens = self.to_tokens(x)
        positions = self.time_pos_embed.embed(bf // f, f, tokens.dtype, tokens.device)
        for block, temporal in zip(self.transformer_blocks, self.time_stack):
            tokens = block(tokens, context)
            tokens = self.time_mixer(tokens, temporal(tokens + positions, f, time_context), frames)
        return self.from_tokens(tokens, h, w) + x


class VideoUNet(UNetModel):
    def __init__(self, config: VideoUNetConfig):
        super().__init__(config)

    def transformer(self, level: int, channels: int, middle: bool = False) -> SpatialVideoTransformer:
        c = self.config
        return SpatialVideoTransformer(
            *self.transformer_args(level, channels, middle), c.merge_strategy, c.merge_factor
        )

    def res_block(self, channels: int, out: int, part: str, level: int) -> VideoResBlock:
        c = self.config
        eps = c.eps_at(part, level)
        return VideoResBlock(
            channels,
            c.time_embed_dim,
            out,
            c.dropout,
            c.norm_groups,
            eps,
            c.video_kernel,
            c.merge_strategy,
            c.merge_factor,
        )

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        added: torch.Tensor | None = None,
        image_only: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [B, F, C, H, W]; timesteps: [B] or a scalar; context: [B, T, D] (SVD: the image embedding,
        T = 1); added: [B, n] conditioning numbers (SVD: fps − 1, motion bucket, noise augmentation);
        image_only: [B, F], 1 where a frame is a still image. Returns [B, F, out_channels, H, W]."""
        c = self.config
        b, f = x.shape[:2]
        y = None
        if c.addition_time_embed_dim:
            if added is None:
                raise ConfigError("VideoUNet: this model takes conditioning numbers (added)")
            y = size_embedding(added.float(), c.addition_time_embed_dim)
        emb = self.embed(x, timesteps, y).repeat_interleave(f, dim=0)
        context = context.repeat_interleave(f, dim=0)
        marks = torch.zeros(b, f, dtype=x.dtype, device=x.device) if image_only is None else image_only
        frames = Frames(f, marks)
        h = x.flatten(0, 1)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context, frames=frames)
            skips.append(h)
        h = self.middle_block(h, emb, context, frames=frames)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, context, skips[-1].shape[-2:] if skips else None, frames)
        h = self.out(h)
        return h.reshape(b, f, *h.shape[1:])
