"""Image-to-video with one call (Stable Video Diffusion):

    pipe = VideoPipeline.load("stable-video-diffusion-img2vid-xt")
    result = pipe(image=Image.open("start.png"), frames=14, seed=1)
    write_video("clip.webp", result.videos[0], fps=result.params.fps, parameters=result.infotexts[0])

A call's keyword arguments are `VideoParams` fields (pipelines/video_params.py: every default and check).
Seeds mean what they mean for images: clip i has its own CPU generator (seed + i), from which the noise
added to its conditioning frame and then its initial noise are drawn, in diffusers' order."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ldmkit import __version__
from ldmkit.checkpoints.families import FAMILIES
from ldmkit.diffusion.registry import get_sampler
from ldmkit.diffusion.sampling import generators_for, per_image_noise, sample_latents, sampling_schedule
from ldmkit.diffusion.schedule import NoiseSchedule
from ldmkit.diffusion.video_denoiser import VideoConditioning, VideoDenoiser
from ldmkit.errors import ConfigError
from ldmkit.images import pil_to_tensor, tensor_to_pil, to_rgb
from ldmkit.models.video_ldm import VideoDiffusion
from ldmkit.models.vision import antialiased_resize
from ldmkit.pipelines.video_params import VideoParams


@dataclass
class VideoResult:
    videos: list[list]  # one list of PIL frames per clip
    params: VideoParams  # as run: every default filled in, the seed drawn
    infotexts: list[str]


class VideoPipeline:
    def __init__(self, model: VideoDiffusion, name: str = "model"):
        self.model = model.eval()
        self.name = name
        family = FAMILIES.get(model.config.family)
        self.defaults = dict(family.call_defaults) if family is not None else {}
        self.defaults.update(width=model.config.width, height=model.config.height)
        self.edm = model.config.schedule.diffusers.get("timestep_type") == "continuous"

    @classmethod
    def load(cls, path: str | Path) -> "VideoPipeline":
        from ldmkit.checkpoints.video_files import load_video_model

        return cls(load_video_model(path), Path(path).stem)

    def __call__(self, params: VideoParams | None = None, callback: Callable | None = None, **kwargs) -> VideoResult:
        """callback(step, steps) after each step."""
        if params is not None and kwargs:
            raise ConfigError("give VideoParams or keyword arguments, not both")
        c = self.model.config
        text = c.text is not None
        p = (params or VideoParams(**kwargs)).for_model(
            self.defaults, c.unet.num_frames, c.vae.downsample_factor, self.name, text
        )
        generators = generators_for(p.seed, p.batch)
        cond, noise = self._text_conditioning(p, generators) if text else self._conditioning(p, generators)
        spec = get_sampler(p.sampler)
        schedule = NoiseSchedule.from_config(c.schedule)
        walk = sampling_schedule(spec, schedule, p.steps, scheduler_config=c.schedule.diffusers)
        denoiser = VideoDenoiser(self.model.unet, walk, schedule, c.schedule.prediction_type, self.edm)
        steps = len(walk.sigmas) - 1
        on_step = None if callback is None else (lambda i, x, x0: callback(i, steps))
        latents = sample_latents(
            denoiser, spec, cond, generators, tuple(noise.shape[1:]), callback=on_step, noise=noise
        )
        frames = self.decode(latents, p.decode_chunk)
        videos = [frames[i * p.frames : (i + 1) * p.frames] for i in range(p.batch)]
        return VideoResult(videos, p, [p.infotext(i, self.name, __version__) for i in range(p.batch)])

    @torch.no_grad()
    def image_embedding(self, image) -> torch.Tensor:
        """The conditioning frame's CLIP image embedding [1, D], computed as the reference computes it: the
        whole image shrunk to the tower's size with antialiasing, then CLIP's normalisation."""
        tower, c = self.model.image_encoder, self.model.config
        if tower is None:
            raise ConfigError("this video model has no image encoder")
        x = torch.from_numpy(np.asarray(to_rgb(image), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        x = (antialiased_resize(x * 2 - 1, (tower.size, tower.size)) + 1) / 2
        mean, std = torch.tensor(c.image_mean)[:, None, None], torch.tensor(c.image_std)[:, None, None]
        return tower.features((x - mean) / std, hidden=False)

    @torch.no_grad()
    def _conditioning(self, p: VideoParams, generators) -> tuple[VideoConditioning, torch.Tensor]:
        """The conditioning and each clip's initial noise [B, F, C, h, w], drawn in diffusers' order."""
        vae, f = self.model.vae, self.model.config.vae.downsample_factor
        embedding = self.image_embedding(p.image).repeat(p.batch, 1)[:, None]  # [B, 1, D]
        pixels = pil_to_tensor(p.image, p.width, p.height)
        augmented = torch.cat([pixels + p.noise_aug * torch.randn(pixels.shape, generator=g) for g in generators])
        latent = vae.encode(augmented.to(next(vae.parameters()).dtype)).mode().float()  # unscaled, as SVD takes it
        noise = per_image_noise(generators, (p.frames, latent.shape[1], p.height // f, p.width // f))
        added = torch.tensor([[p.fps - 1, p.motion_bucket, p.noise_aug]], dtype=torch.float32).repeat(p.batch, 1)
        cfg = None
        if p.max_cfg > 1:  # the reference's rule: guided when the largest scale exceeds 1
            cfg = (
                torch.linspace(p.min_cfg, p.max_cfg, p.frames).reshape(1, p.frames, 1, 1, 1).repeat(p.batch, 1, 1, 1, 1)
            )
        concat = latent[:, None].expand(-1, p.frames, -1, -1, -1)
        return VideoConditioning(embedding, concat=concat, added=added, cfg=cfg), noise

    @torch.no_grad()
    def _text_conditioning(self, p: VideoParams, generators) -> tuple[VideoConditioning, torch.Tensor]:
        """A prompt's conditioning (its states, the negative prompt's for the unguided pass, one guidance scale
        on every frame) and each clip's initial noise [B, F, C, h, w]."""
        from ldmkit.models.prompts import encode_prompts

        encoder, f = self.model.text_encoder, self.model.config.vae.downsample_factor
        states = encode_prompts(encoder, [p.prompt, p.negative_prompt], None, mode="truncate").context
        context, uncond = states[:1].repeat(p.batch, 1, 1), states[1:].repeat(p.batch, 1, 1)
        noise = per_image_noise(generators, (p.frames, self.model.config.vae.embed_dim, p.height // f, p.width // f))
        cfg = None if p.cfg == 1 else torch.full((p.batch, p.frames, 1, 1, 1), float(p.cfg))
        return VideoConditioning(context, uncond, cfg=cfg), noise

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk: int | None = None) -> list:
        """[B, F, C, h, w] diffusion latents -> B·F frames (PIL), `chunk` frames decoded at a time."""
        frames = latents.shape[1]
        vae = self.model.vae
        z = vae.unscale(latents.flatten(0, 1)).to(next(vae.parameters()).dtype)
        if self.model.config.temporal_decoder:
            return tensor_to_pil(vae.decode(z, frames, chunk))
        chunk = chunk or len(z)
        return tensor_to_pil(torch.cat([vae.decode(z[i : i + chunk]) for i in range(0, len(z), chunk)]))
