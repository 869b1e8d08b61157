"""A video UNet as a denoiser in sigma space, D(x, sigma) -> x0, for clips x [B, F, C, h, w] — the image
denoiser's formulation (diffusion/denoiser.py), so every sampler in samplers.py walks videos too.

Stable Video Diffusion's conditioning: the conditioning frame's latent concatenated to every frame's input
channels, the image embedding as context, the conditioning numbers (fps − 1, motion bucket, noise
augmentation) added to the timestep embedding. Its guidance has one scale per frame (Blattmann et al. 2023:
a linear ramp from the first frame to the last), applied to the native output (v) as diffusers does; the
unconditional pass sees a zero image embedding and a zero conditioning latent. EDM-trained models take
c_noise = ¼ ln σ as their timestep."""

import math
from dataclasses import dataclass

import numpy as np
import torch

from ldmkit.diffusion.denoiser import to_x0
from ldmkit.diffusion.schedule import NoiseSchedule, SamplingSchedule, edm_timesteps
from ldmkit.models.video_unet import VideoUNet


@dataclass
class VideoConditioning:
    context: torch.Tensor  # [B, T, D]: the image embedding (T = 1) or the prompt's states
    uncond: torch.Tensor | None = None  # [B, T, D] the unguided pass's context; None: zeros (SVD's)
    concat: torch.Tensor | None = None  # [B, F, C, h, w]: the conditioning frame's latent, per frame
    added: torch.Tensor | None = None  # [B, n]: the conditioning numbers
    cfg: torch.Tensor | None = None  # [B, F, 1, 1, 1]: the guidance scale per frame; None: no guidance pass


class VideoDenoiser:
    def __init__(
        self, unet: VideoUNet, walk: SamplingSchedule, schedule: NoiseSchedule, prediction_type: str, edm: bool
    ):
        self.unet = unet
        self.walk = walk
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.edm = edm  # continuous timesteps ¼ ln σ
        self._timesteps = dict(zip((float(s) for s in walk.sigmas[:-1]), (float(t) for t in walk.timesteps)))
        self.calls = 0

    def timestep(self, sigma: float) -> float:
        t = self._timesteps.get(sigma)
        if t is not None:
            return t
        return float(edm_timesteps([sigma])[0]) if self.edm else float(self.schedule.sigma_to_t(np.array(sigma)))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: VideoConditioning) -> torch.Tensor:
        sigma = float(sigma)
        self.calls += 1
        dtype = next(self.unet.parameters()).dtype
        x_in = x if math.isinf(sigma) else x / (sigma**2 + 1) ** 0.5
        concat = None if cond.concat is None else cond.concat.to(x_in)
        t = torch.full((x.shape[0],), self.timestep(sigma), dtype=torch.float32, device=x.device)
        if cond.cfg is None:
            out = self._unet(x_in, concat, t, cond.context, cond.added, dtype)
        else:
            uncond = torch.zeros_like(cond.context) if cond.uncond is None else cond.uncond
            both = self._unet(
                torch.cat([x_in, x_in]),
                None if concat is None else torch.cat([torch.zeros_like(concat), concat]),
                torch.cat([t, t]),
                torch.cat([uncond, cond.context]),
                None if cond.added is None else torch.cat([cond.added, cond.added]),
                dtype,
            )
            unguided, guided = both.chunk(2)
            out = unguided + cond.cfg * (guided - unguided)
        return to_x0(out, x, sigma, self.prediction_type)

    def _unet(self, x_in, concat, t, context, added, dtype) -> torch.Tensor:
        if concat is not None:
            x_in = torch.cat([x_in, concat], dim=2)
        return self.unet(x_in.to(dtype), t, context.to(dtype), added).float()
