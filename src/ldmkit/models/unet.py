"""The denoiser of latent diffusion: a UNet with residual blocks, spatial transformers that
cross-attend to the text context, and skip connections (Rombach et al. 2022, sec. 3.3).

Module names are the original checkpoint's (`input_blocks`, `middle_block`, `output_blocks`,
`time_embed`, `label_emb`, `out`), so `model.diffusion_model.*` loads by name. One class covers
SD 1.x, SD 2.x, the 9-channel inpainting variant and tiny test models; everything that differs
between them is in `UNetConfig`."""

from dataclasses import dataclass

import torch
from torch import nn

from ldmkit.config import widths_from_multipliers
from ldmkit.errors import ConfigError
from ldmkit.nn.attention import SpatialTransformer
from ldmkit.nn.embedding import timestep_embedding
from ldmkit.nn.resnet import Downsample, ResBlock, Upsample, normalization

MIDDLE_BLOCKS = ("attention", "resnet", "none")
TIME_ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    # Width of each level, deepest last (diffusers' `block_out_channels`). The first is also the
    # width of the stem and of the timestep's sinusoidal embedding. Widths, not multipliers: pruned
    # and distilled models use widths that are no multiple of the first.
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    # Residual blocks per level on the way down (one more on the way up); a tuple gives one per level.
    num_res_blocks: int | tuple[int, ...] = 2
    # Downsampling factors (1, 2, 4, ...) of the levels that carry spatial transformers (the
    # original yaml's convention).
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    # Heads are given either by count (SD 1.x: 8; a tuple gives one count per level) or by
    # channels per head (SD 2.x: 64), never both.
    num_heads: int | tuple[int, ...] = 8
    num_head_channels: int = -1
    transformer_depth: int | tuple[int, ...] = 1
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    # The middle block: "attention" (ResBlock, transformer, ResBlock: SD), "resnet" (one ResBlock:
    # diffusers' UNetMidBlock2D) or "none" (pruned models such as BK-SDM drop it).
    middle_block: str = "attention"
    # Class conditioning: an int is a number of classes (an embedding table); "sequential"
    # takes a vector of `adm_in_channels` through an MLP (the original code's `label_emb`).
    num_classes: int | str | None = None
    adm_in_channels: int | None = None
    # SDXL's addition embedding ("text_time"): the "sequential" vector is the pooled text embedding
    # followed by the micro-conditioning numbers, each embedded in this many channels (256).
    addition_time_embed_dim: int | None = None
    # Guidance-scale embedding of consistency-distilled models (diffusers' `time_cond_proj_dim`).
    time_cond_proj_dim: int | None = None
    dropout: float = 0.0
    norm_groups: int = 32
    # Epsilon of the residual blocks' and the output's GroupNorm (the transformers' is 1e-6 always).
    norm_eps: float = 1e-5
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    # Per level (or one for all): the transformers' first attention attends to the context instead of
    # the pixels (the original code's `disable_self_attentions`, diffusers' `only_cross_attention`).
    # The middle block's never does, in either.
    disable_self_attention: bool | tuple[bool, ...] = False
    # An activation after the timestep embedding's MLP (diffusers' `timestep_post_act`): None, or
    # one of TIME_ACTIVATIONS.
    time_embed_post_act: str | None = None
    # Kept so that a diffusers config reads back as it was written: attention here runs in the
    # weights' dtype through scaled_dot_product_attention, which is what diffusers does too.
    upcast_attention: bool = False

    def __post_init__(self):
        levels = len(self.channels)
        if not levels:
            raise ConfigError("UNetConfig.channels: give at least one level's width")
        if self.time_embed_post_act is not None and self.time_embed_post_act not in TIME_ACTIVATIONS:
            raise ConfigError(
                f"UNetConfig.time_embed_post_act: {self.time_embed_post_act!r}; allowed: {[None, *TIME_ACTIVATIONS]}"
            )
        for name in ("num_heads", "transformer_depth", "num_res_blocks", "disable_self_attention"):
            v = getattr(self, name)
            if isinstance(v, tuple) and len(v) != levels:
                raise ConfigError(f"UNetConfig.{name}: {len(v)} values given for {levels} levels")
        if self.num_head_channels <= 0 and not self.num_heads:
            raise ConfigError("UNetConfig: give num_heads (a count) or num_head_channels (channels per head)")
        if any(w % self.norm_groups for w in self.channels):
            raise ConfigError(
                f"UNetConfig: widths {self.channels} are not all divisible by {self.norm_groups} norm groups"
            )
        if self.middle_block not in MIDDLE_BLOCKS:
            raise ConfigError(f"UNetConfig.middle_block: {self.middle_block!r}; allowed: {list(MIDDLE_BLOCKS)}")
        for name in ("conv_in_kernel", "conv_out_kernel"):
            if getattr(self, name) % 2 != 1:
                raise ConfigError(f"UNetConfig.{name}: {getattr(self, name)}; allowed: an odd kernel size")
        if self.num_classes == "sequential" and not self.adm_in_channels:
            raise ConfigError("UNetConfig: num_classes='sequential' needs adm_in_channels")
        if self.addition_time_embed_dim and self.num_classes != "sequential":
            raise ConfigError("UNetConfig: addition_time_embed_dim needs num_classes='sequential'")
        if self.num_classes is not None and not isinstance(self.num_classes, int) and self.num_classes != "sequential":
            raise ConfigError(f"UNetConfig.num_classes: {self.num_classes!r}; allowed: an int, 'sequential' or null")

    @classmethod
    def migrate(cls, d: dict) -> dict:
        """Configs stored before widths were stored as widths: `model_channels` x `channel_mult`."""
        return widths_from_multipliers(d, "model_channels", "channel_mult", 320)

    def heads_at(self, level: int, channels: int) -> tuple[int, int]:
        """(heads, channels per head) of the transformers at `level`."""
        if self.num_head_channels > 0:
            return channels // self.num_head_channels, self.num_head_channels
        heads = self.num_heads[level] if isinstance(self.num_heads, tuple) else self.num_heads
        return heads, channels // heads

    def depth_at(self, level: int) -> int:
        d = self.transformer_depth
        return d[level] if isinstance(d, tuple) else d

    def res_blocks_at(self, level: int) -> int:
        n = self.num_res_blocks
        return n[level] if isinstance(n, tuple) else n

    def self_attention_disabled_at(self, level: int) -> bool:
        d = self.disable_self_attention
        return d[level] if isinstance(d, tuple) else d

    def has_attention(self, level: int) -> bool:
        return 2**level in self.attention_resolutions

    @property
    def levels(self) -> int:
        return len(self.channels)

    @property
    def model_channels(self) -> int:
        return self.channels[0]

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    @property
    def downsample_factor(self) -> int:
        return 2 ** (self.levels - 1)

    def input_block_index(self, level: int, block: int) -> int:
        """Index in `input_blocks` of residual block `block` of `level` (`block` = res blocks at that
        level: its downsampler). Index 0 is the stem convolution."""
        return 1 + sum(self.res_blocks_at(i) + 1 for i in range(level)) + block

    def output_block_index(self, level: int, block: int) -> int:
        """Index in `output_blocks` of up-path block `block` (0 .. res blocks) of `level`."""
        return sum(self.res_blocks_at(i) + 1 for i in range(level + 1, self.levels)) + block


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers, each given what it needs: the timestep embedding (ResBlock), the
    text context (SpatialTransformer), or the skip connection's size (Upsample); a video UNet's blocks
    also the clips' frames (nn/temporal.Frames)."""

    def forward(self, x, emb, context, size=None, frames=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb) if frames is None else layer(x, emb, frames)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context) if frames is None else layer(x, context, frames)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


@dataclass
class FeatureCache:
    """DeepCache (Ma et al. 2024): adjacent sampling steps change the UNet's deep features little, so
    a full call every `interval` calls keeps the features entering its shallowest `branch + 1` output
    blocks, and the calls between recompute only the shallowest `branch + 1` input blocks (for their
    skip connections) and those output blocks. One object per generation: it counts UNet calls (a
    guidance pair is one call). interval 1 is a full call every time."""

    interval: int
    branch: int = 0
    calls: int = 0
    deep: torch.Tensor | None = None

    def __post_init__(self):
        if not isinstance(self.interval, int) or self.interval < 1:
            raise ConfigError(f"feature cache interval {self.interval!r}; allowed: 1 or more (1 = off)")
        if not isinstance(self.branch, int) or self.branch < 0:
            raise ConfigError(f"feature cache branch {self.branch!r}; allowed: 0 or more")

    def reuse(self, batch: int) -> bool:
        """Whether this call reuses the kept features (and count it)."""
        reuse = self.deep is not None and self.deep.shape[0] == batch and self.calls % self.interval != 0
        self.calls += 1
        return reuse


class UNetModel(nn.Module):
    def __init__(self, config: UNetConfig, encoder_only: bool = False):
        """encoder_only: the input and middle blocks alone (what a ControlNet copies)."""
        super().__init__()
        self.config = c = config
        ch = c.model_channels
        groups = c.norm_groups
        emb_dim = c.time_embed_dim
        post = [TIME_ACTIVATIONS[c.time_embed_post_act]()] if c.time_embed_post_act else []
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim), *post)
        if c.time_cond_proj_dim:
            self.time_cond_proj = nn.Linear(c.time_cond_proj_dim, ch, bias=False)
        if isinstance(c.num_classes, int):
            self.label_emb = nn.Embedding(c.num_classes, emb_dim)
        elif c.num_classes == "sequential":
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(c.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            )

        transformer, res = self.transformer, self.res_block
        stem = nn.Conv2d(c.in_channels, ch, c.conv_in_kernel, padding=c.conv_in_kernel // 2)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(stem)])
        skip_channels = [ch]
        for level, width in enumerate(c.channels):
            for _ in range(c.res_blocks_at(level)):
                layers = [res(ch, width, "down", level)]
                ch = width
                if c.has_attention(level):
                    layers.append(transformer(level, ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != c.levels - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)

        middle = {
            "attention": lambda: [
                res(ch, ch, "middle", c.levels - 1),
                transformer(c.levels - 1, ch, middle=True),
                res(ch, ch, "middle", c.levels - 1),
            ],
            "resnet": lambda: [res(ch, ch, "middle", c.levels - 1)],
            "none": lambda: [],
        }[c.middle_block]()
        self.middle_block = TimestepEmbedSequential(*middle)
        self.skip_channels = list(skip_channels)
        if encoder_only:
            return

        self.output_blocks = nn.ModuleList()
        for level, width in reversed(list(enumerate(c.channels))):
            n = c.res_blocks_at(level)
            for i in range(n + 1):
                skip = skip_channels.pop()
                layers = [res(ch + skip, width, "up", level)]
                ch = width
                if c.has_attention(level):
                    layers.append(transformer(level, ch))
                if level and i == n:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch, groups, c.norm_eps),
            nn.SiLU(),
            nn.Conv2d(ch, c.out_channels, c.conv_out_kernel, padding=c.conv_out_kernel // 2),
        )

    def transformer_args(self, level: int, channels: int, middle: bool = False) -> tuple:
        """SpatialTransformer's arguments at `level` (the middle block's: never only cross-attention)."""
        c = self.config
        heads, dim_head = c.heads_at(level, channels)
        disabled = c.self_attention_disabled_at(level) and not middle
        return (
            channels,
            heads,
            dim_head,
            c.depth_at(level),
            c.context_dim,
            c.use_linear_in_transformer,
            c.dropout,
            c.norm_groups,
            disabled,
        )

    def transformer(self, level: int, channels: int, middle: bool = False) -> SpatialTransformer:
        """The spatial transformer of `level` (a video UNet's adds temporal blocks)."""
        return SpatialTransformer(*self.transformer_args(level, channels, middle))

    def res_block(self, channels: int, out: int, part: str, level: int) -> ResBlock:
        """A residual block of `part` ("down", "middle", "up") at `level`."""
        c = self.config
        return ResBlock(channels, c.time_embed_dim, out, c.dropout, c.norm_groups, c.norm_eps)

    def embed(self, x, timesteps, y=None, timestep_cond=None) -> torch.Tensor:
        """The embedding every ResBlock sees: timestep, plus guidance scale and class when present."""
        c = self.config
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        t_emb = timestep_embedding(timesteps, c.model_channels).to(x.dtype)
        if timestep_cond is not None:
            if not c.time_cond_proj_dim:
                raise ConfigError("UNetModel: timestep_cond given but this model has no guidance embedding")
            t_emb = t_emb + self.time_cond_proj(timestep_cond.to(x.dtype))
        emb = self.time_embed(t_emb)
        if c.num_classes is not None:
            if y is None:
                raise ConfigError("UNetModel: this model is class-conditional; pass y")
            emb = emb + self.label_emb(y if isinstance(c.num_classes, int) else y.to(emb.dtype))
        return emb

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        control: list[torch.Tensor] | None = None,
        cache: FeatureCache | None = None,
    ) -> torch.Tensor:
        """x: [B, C, H, W] noisy latents; timesteps: [B] (or scalar); context: [B, T, D] text states;
        y: class labels [B] or vectors [B, adm_in_channels]; timestep_cond: the guidance-scale
        embedding [B, time_cond_proj_dim] (see `guidance_scale_embedding`); control: ControlNet
        residuals, one per skip connection and one for the middle block (models/controlnet.py);
        cache: DeepCache's kept deep features (FeatureCache)."""
        emb = self.embed(x, timesteps, y, timestep_cond)
        if control is not None and len(control) != len(self.input_blocks) + 1:
            raise ConfigError(
                f"UNetModel: {len(control)} control residuals for {len(self.input_blocks)} skips + middle"
            )
        shallow = len(self.output_blocks) if cache is None else min(cache.branch + 1, len(self.output_blocks))
        reuse = cache is not None and cache.reuse(x.shape[0])
        skips = []
        h = x
        for block in self.input_blocks[:shallow] if reuse else self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        if control is not None:
            skips = [s + r for s, r in zip(skips, control)]
        if reuse:
            h = cache.deep
        else:
            h = self.middle_block(h, emb, context)
            if control is not None:
                h = h + control[-1]
        deep_blocks = len(self.output_blocks) - shallow
        for i, block in enumerate(self.output_blocks):
            if i < deep_blocks and reuse:
                continue
            if i == deep_blocks and cache is not None and not reuse:
                cache.deep = h
            h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h)
