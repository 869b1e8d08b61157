"""One sampling run: seeds -> initial noise -> sampler -> clean latents.

Seeds mean the same everywhere: image i of a batch has its own CPU generator (seed + i, the web
UI's convention), from which its initial noise and then its ancestral noise are drawn, in the order
diffusers draws them when given a list of generators. An image's seed reproduces it at any batch
size and on any device."""

import math
from collections.abc import Callable
from dataclasses import replace

import torch

from ldmkit.diffusion.denoiser import Conditioning, Denoiser
from ldmkit.diffusion.flow import VE_FORM, flow_schedule, flow_start, walk_in_ve_form
from ldmkit.diffusion.registry import SamplerSpec
from ldmkit.diffusion.schedule import NoiseSchedule, SamplingSchedule
from ldmkit.errors import ConfigError


def generators_for(seed: int, batch: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]


def per_image_noise(generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """[B, *shape]: image i's noise from generator i, drawn on the CPU."""
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators])


def img2img_start(steps: int, strength: float) -> int:
    """Index of the first step run when starting from an image (diffusers' rule: int(steps * strength)
    steps are run)."""
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"strength: {strength}; allowed: 0 to 1")
    return steps - min(int(steps * strength), steps)


def sampling_schedule(
    spec: SamplerSpec,
    noise: NoiseSchedule,
    steps: int,
    spacing: str | None = None,
    scheduler_config: dict | None = None,
    strength: float | None = None,
    image_seq_len: int | None = None,
) -> SamplingSchedule:
    """The schedule one run walks: the sampler's (SamplerSpec.build_schedule: `scheduler_config` is the
    model folder's diffusers scheduler config, `spacing` an explicit timestep spacing; a flow model's:
    diffusion/flow.py, shifted for an image of `image_seq_len` tokens where the shift depends on it), and
    when starting from an image at `strength`, only the steps that strength runs."""
    if noise.flow:
        schedule = flow_schedule(spec.name, noise, steps, scheduler_config, image_seq_len, spacing)
    else:
        schedule = spec.build_schedule(noise, steps, spacing, scheduler_config)
    if strength is None:
        return schedule
    start = flow_start(steps, strength) if schedule.flow else img2img_start(steps, strength)
    return replace(schedule, sigmas=schedule.sigmas[start:], timesteps=schedule.timesteps[start:])


def sample_latents(
    denoiser: Denoiser,
    spec: SamplerSpec,
    cond: Conditioning,
    generators: list[torch.Generator],
    latent_shape: tuple[int, int, int],
    init_latents: torch.Tensor | None = None,
    callback: Callable | None = None,
    noised: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    **options,
) -> torch.Tensor:
    """Clean latents [B, C, h, w] (variance-preserving, unscaled by the VAE factor) from walking the
    denoiser's schedule (sampling_schedule). With `init_latents` (image-to-image, the schedule cut to
    the steps that run) noise of the first sigma is added to them. `noised`: a run handed over at the
    first sigma (a base model's latents for a refiner), in the form sample_latents returns them there;
    no noise is drawn for it. `noise`: the initial noise when the caller drew it (inpainting draws it
    between posterior samples of the image, where diffusers does). The sampler options the schedule
    implies (clip_sample, ...) come first, `options` over them."""
    schedule = denoiser.walk
    options = {**schedule.options, **options}
    device = cond.context.device
    sigmas = schedule.sigmas
    if noised is not None:
        s0 = float(sigmas[0])
        x = noised.to(device) if schedule.sigma_space_output else noised.to(device) * (s0**2 + 1) ** 0.5
        return _walk(denoiser, spec, x, sigmas, cond, generators, callback, options)
    noise = (per_image_noise(generators, latent_shape) if noise is None else noise).to(device)
    if init_latents is None:
        # At sigma = inf (ᾱ = 0, zero terminal SNR) samplers hold the variance-preserving latent.
        x = noise if math.isinf(schedule.init_noise_sigma) else noise * schedule.init_noise_sigma
    else:
        if len(sigmas) == 1:  # strength 0: nothing to do
            return init_latents
        x = schedule.noised(init_latents.to(device), noise, float(sigmas[0]))

    return _walk(denoiser, spec, x, sigmas, cond, generators, callback, options)


def _walk(denoiser, spec, x, sigmas, cond, generators, callback, options) -> torch.Tensor:
    def ancestral_noise(like: torch.Tensor) -> torch.Tensor:
        return per_image_noise(generators, tuple(like.shape[1:])).to(like)

    if denoiser.walk.flow and spec.name in VE_FORM:
        x = walk_in_ve_form(spec.fn, denoiser, x, sigmas, {"cond": cond}, callback, ancestral_noise, **options)
    else:
        x = spec.fn(denoiser, x, sigmas, {"cond": cond}, callback, ancestral_noise, **options)
    # Back to the variance-preserving latent of the last sigma (≠ x when it is not 0, as DDIM's) --
    # unless the reference scheduler hands back its sigma-space latent (diffusers' Euler family).
    return x if denoiser.walk.sigma_space_output else x / (float(sigmas[-1]) ** 2 + 1) ** 0.5


def split_walk(walk: SamplingSchedule, fraction: float, num_train_timesteps: int):
    """(the steps a base model runs, the ones a refiner runs) of a walk, split where diffusers splits
    `denoising_end` / `denoising_start`: the base runs the timesteps at or above
    round(T - fraction * T), the refiner the rest, from the sigma where the base stopped."""
    cutoff = round(num_train_timesteps - fraction * num_train_timesteps)
    k = int((walk.timesteps >= cutoff).sum())
    if k == 0 or k == len(walk.timesteps):
        who = "the base model" if k == 0 else "the refiner"
        raise ConfigError(f"refiner switch at {fraction:g} of {len(walk.timesteps)} steps leaves none for {who}")
    base = replace(walk, sigmas=walk.sigmas[: k + 1], timesteps=walk.timesteps[:k])
    return base, replace(walk, sigmas=walk.sigmas[k:], timesteps=walk.timesteps[k:])
