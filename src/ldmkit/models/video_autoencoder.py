"""Stable Video Diffusion's autoencoder: the image encoder as it is, and a decoder made temporal so that
decoded frames do not flicker — each residual block followed by a temporal residual block (convolutions
across 3 frames) mixed in by a learned factor, and the output convolution followed by one across frames.
Names are the original's (`decoder.up.0.block.1.time_stack`, `.mix_factor`, `conv_out.time_mix_conv`).

The temporal layers see the frames decoded together; clips are decoded in chunks of frames to bound memory,
each chunk on its own (as the reference decodes them), so the chunk size can change the frames slightly."""

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.errors import ConfigError
from ldmkit.models.autoencoder import AutoencoderConfig, AutoencoderKL, Decoder, Encoder, ResnetBlock
from ldmkit.nn.temporal import TemporalResBlock, from_clips, to_clips

VIDEO_KERNEL = 3  # frames each temporal convolution spans (SVD's)


class VideoResnetBlock(ResnetBlock):
    """The spatial block, then a temporal one; alpha = sigmoid(mix_factor) weighs the temporal output."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int):
        super().__init__(in_channels, out_channels, dropout, groups)
        self.time_stack = TemporalResBlock(out_channels, None, VIDEO_KERNEL, eps=1e-5, groups=groups)
        self.mix_factor = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        spatial = to_clips(super().forward(x), frames)
        alpha = torch.sigmoid(self.mix_factor).to(x.dtype)
        return from_clips(alpha * self.time_stack(spatial) + (1 - alpha) * spatial)


class VideoConvOut(nn.Conv2d):
    """The output convolution, then one across frames (`time_mix_conv`)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding=1)
        k = VIDEO_KERNEL
        self.time_mix_conv = nn.Conv3d(out_channels, out_channels, (k, 1, 1), padding=(k // 2, 0, 0))

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        return from_clips(self.time_mix_conv(to_clips(super().forward(x), frames)))


class VideoDecoder(Decoder):
    def __init__(self, c: AutoencoderConfig):
        super().__init__(c, block=VideoResnetBlock)
        self.conv_out = VideoConvOut(c.channels[0], c.out_channels)

    def forward(self, z: torch.Tensor, frames: int) -> torch.Tensor:
        """z: [B·F, C, h, w], F consecutive frames per clip."""
        mid = self.mid
        h = mid.block_2(mid.attn_1(mid.block_1(self.conv_in(z), frames)), frames)
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h, frames)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)), frames)


class TemporalAutoencoder(AutoencoderKL):
    """Encoder (+ quant_conv when the file has one) of the image autoencoder; the video decoder, with no
    post_quant_conv (the video model's latents go straight in)."""

    def __init__(self, config: AutoencoderConfig):
        nn.Module.__init__(self)
        self.config = c = config
        self.encoder = Encoder(c)
        self.decoder = VideoDecoder(c)
        if c.use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * c.z_channels, 2 * c.embed_dim, 1)

    def decode(self, z: torch.Tensor, frames: int | None = None, chunk: int | None = None) -> torch.Tensor:
        """Unscaled latents [B·F, C, h, w] of clips of `frames` frames (None: one clip) -> frames in [-1, 1],
        decoded `chunk` frames at a time within each clip (None: whole clips)."""
        frames = z.shape[0] if frames is None else frames
        if frames < 1 or z.shape[0] % frames:
            raise ConfigError(f"decode: {z.shape[0]} latents are not whole clips of {frames} frames")
        chunk = frames if chunk is None else chunk
        if chunk < 1:
            raise ConfigError(f"decode chunk {chunk}; allowed: 1 or more frames")
        out = []
        for start in range(0, z.shape[0], frames):
            clip = z[start : start + frames]
            out += [self.decoder(clip[i : i + chunk], len(clip[i : i + chunk])) for i in range(0, frames, chunk)]
        return torch.cat(out)
