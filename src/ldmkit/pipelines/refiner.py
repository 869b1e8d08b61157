"""SDXL's base-to-refiner hand-off (Podell et al. 2023, sec. 2.5): the base model denoises the first part
of the schedule and a refiner, specialised in the last, low-noise steps, takes the latents from there —
diffusers' `denoising_end` / `denoising_start` (the web UI's `refiner_switch_at`). The walk is split where
diffusers splits it (diffusion/sampling.split_walk); the refiner continues from the base's latents with no
new noise, its own text towers and micro-conditioning (aesthetic scores in place of target sizes), the
ancestral noise still drawn from each image's generator, and decodes with its own autoencoder. As in
diffusers, the refiner's sampler starts afresh: a multistep sampler's history is not carried across."""

from dataclasses import replace

import torch

from ldmkit.diffusion.denoiser import Denoiser
from ldmkit.diffusion.registry import SAMPLERS
from ldmkit.diffusion.sampling import sample_latents
from ldmkit.diffusion.schedule import NoiseSchedule, SamplingSchedule
from ldmkit.errors import ConfigError

DEFAULT_SWITCH = 0.8  # the web UI's refiner_switch_at


def check_refiner(base, refiner) -> None:
    """A refiner must continue the base's latents: same latent channels and autoencoder factor."""
    if refiner is None:
        raise ConfigError("refiner_switch_at needs a refiner model (--refiner MODEL; Python: pipe.refiner)")
    a, b = base.model.config, refiner.model.config
    if (a.unet.out_channels, a.vae.downsample_factor) != (b.unet.out_channels, b.vae.downsample_factor):
        raise ConfigError(
            f"refiner {refiner.name}: its latents ({b.unet.out_channels} channels, factor {b.vae.downsample_factor}) "
            f"are not the base model's ({a.unet.out_channels}, {a.vae.downsample_factor})"
        )


def for_refiner(p):
    """The refiner's parameters: the run's, without the base model's target sizes and image prompts (its
    own UNet has no IP-Adapter attached, as in diffusers' refiner pipeline)."""
    return replace(p, target_size=None, negative_target_size=None, image_prompts=())


def refine(refiner, p, z: torch.Tensor, rest: SamplingSchedule, generators, on_step) -> torch.Tensor:
    """The refiner's part of the walk, from the base's latents `z` at its first sigma."""
    m, c = refiner.model, refiner.model.config
    rp = for_refiner(p)
    device = next(m.unet.parameters()).device
    cond, _ = refiner._conditioning(rp, device)
    noise = NoiseSchedule.from_config(c.schedule, m.alphas_cumprod)
    denoiser = Denoiser(m.unet, noise, c.schedule.prediction_type, rest)
    options = {"eta": p.eta} if p.sampler == "ddim" else {}
    spec = SAMPLERS[p.sampler]
    return sample_latents(denoiser, spec, cond, generators, tuple(z.shape[1:]), None, on_step, noised=z, **options)
