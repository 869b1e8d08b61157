"""Hires fix, with the popular web UI's semantics: a first pass at the asked size, an upscale (of the
latents, or of the decoded image), then an image-to-image pass at the larger size.

The rules, as the web UI has them (modules/processing.py, StableDiffusionProcessingTxt2Img):
- the target is the first pass's size times `scale` (int of each side), or a given width/height: one
  side given keeps the aspect ratio; both given cover the target and the excess is cropped from the
  latents, half on each side;
- "Latent" upscalers interpolate the latents (F.interpolate: its mode and antialias per name); pixel
  upscalers decode, quantise to 8 bits, resize, and encode again; any other name is a model upscaler
  (ESRGAN and its kin) in the pipeline's upscaler folder, run by pipelines/upscalers.py;
- the second pass runs exactly `steps` steps (its own, else the first pass's) of a schedule of
  int(steps / min(strength, 0.999)) steps, ending at its end (setup_img2img_steps), from the
  upscaled latents plus fresh noise of each image's seed at the new size."""

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldmkit.checkpoints.files import listed
from ldmkit.diffusion.denoiser import Denoiser
from ldmkit.diffusion.registry import SAMPLERS
from ldmkit.diffusion.sampling import generators_for, sample_latents, sampling_schedule
from ldmkit.errors import ConfigError
from ldmkit.models.unet import FeatureCache
from ldmkit.pipelines.upscalers import ModelUpscaler, find_upscaler, list_upscalers, upscale

# name -> (F.interpolate mode, antialias): the web UI's latent_upscale_modes
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# "None": the web UI's plain resize, which is Lanczos
PIXEL_UPSCALERS = {"None": Image.LANCZOS, "Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}
UPSCALERS = (*LATENT_UPSCALERS, *PIXEL_UPSCALERS)
DEFAULT_UPSCALER = "Latent"  # the web UI's latent_upscale_default_mode
MAX_SCALE = 8.0


def check_upscaler(name: str | None) -> None:
    """A name that is no built-in one may be a model in the pipeline's upscaler folder: model_upscaler
    looks it up once the pipeline is known."""
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ConfigError(f"hires upscaler {name!r}; allowed: {', '.join(UPSCALERS)}, or a model's name")


def is_builtin(name: str | None) -> bool:
    return name is None or name in UPSCALERS


def model_upscaler(name: str, folder: str | Path | None) -> Path:
    """The file of model upscaler NAME in the upscaler folder, or one line saying what is allowed (a name
    leaving the folder is refused as a missing one is)."""
    path = find_upscaler(name, folder)
    if path is not None:
        return path
    models = list_upscalers(folder)
    where = "in the upscaler folder" if folder is not None else "(no upscaler folder is given: --upscaler-dir)"
    more = f", or the models: {listed(models)}" if models else ""
    raise ConfigError(
        f"hires upscaler {name!r}: not a built-in upscaler and not a model {where}; "
        f"allowed: {', '.join(UPSCALERS)}{more}"
    )


@dataclass(frozen=True)
class Target:
    width: int  # the image the second pass makes
    height: int
    crop_x: int  # latent columns / rows cropped from the upscaled latents (both sides given)
    crop_y: int


def target(width: int, height: int, scale: float, resize_x: int, resize_y: int, f: int) -> Target:
    """The second pass's size for a first pass of width x height, in whole latent pixels (factor f)."""
    if not resize_x and not resize_y:
        w, h = int(width * scale), int(height * scale)
        return Target(w // f * f, h // f * f, 0, 0)
    if not resize_y:
        w, h = resize_x, resize_x * height // width
    elif not resize_x:
        w, h = resize_y * width // height, resize_y
    elif width / height < resize_x / resize_y:  # cover the asked size, keeping the aspect ratio
        w, h = resize_x, resize_x * height // width
    else:
        w, h = resize_y * width // height, resize_y
    crop_x = (w - resize_x) // f if resize_x and resize_y else 0
    crop_y = (h - resize_y) // f if resize_x and resize_y else 0
    return Target((w // f - crop_x) * f, (h // f - crop_y) * f, crop_x, crop_y)


def second_pass_steps(steps: int, strength: float) -> tuple[int, int]:
    """(steps of the whole schedule, steps run from its end): the web UI's setup_img2img_steps when it is
    given the step count, as the hires pass is."""
    if strength <= 0:
        return 0, 0
    return int(steps / min(strength, 0.999)), steps


def upscale_latents(z: torch.Tensor, size: Target, f: int, upscaler: str) -> torch.Tensor:
    mode, antialias = LATENT_UPSCALERS[upscaler]
    full = ((size.height // f) + size.crop_y, (size.width // f) + size.crop_x)
    z = F.interpolate(z, size=full, mode=mode, antialias=antialias)
    return crop(z, size)


def crop(z: torch.Tensor, size: Target) -> torch.Tensor:
    """The excess of a covering resize, half from each side (the web UI's truncate_x/y)."""
    h, w = z.shape[-2:]
    return z[..., size.crop_y // 2 : h - (size.crop_y + 1) // 2, size.crop_x // 2 : w - (size.crop_x + 1) // 2]


def upscale_pixels(
    images: torch.Tensor, size: Target, f: int, upscaler: str, model: ModelUpscaler | None = None
) -> torch.Tensor:
    """Decoded images [B, 3, H, W] in [-1, 1] -> quantised to 8 bits as the web UI does (truncating) and
    resized to the target plus what a covering resize crops (crop the encoded latents after), by the
    built-in `upscaler` or by `model` (pipelines/upscalers.py)."""
    full = (size.width + size.crop_x * f, size.height + size.crop_y * f)
    out = []
    for x in images.float().cpu():
        arr = (255.0 * ((x + 1) / 2).clamp(0, 1)).permute(1, 2, 0).numpy().astype(np.uint8)
        image = Image.fromarray(arr)
        resized = upscale(image, *full, model) if model is not None else image.resize(full, PIXEL_UPSCALERS[upscaler])
        out.append(torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(out) * 2 - 1


def run_second_pass(pipe, p, z: torch.Tensor, cond, noise, on_step) -> torch.Tensor:
    """The hires fix's second pass for `pipe` (a Pipeline): the first pass's latents upscaled, then an
    image-to-image pass at the target size of `strength`, its sampler and steps."""
    m, c = pipe.model, pipe.model.config
    f = c.vae.downsample_factor
    size = p.hires_target(f)
    upscaler = p.hires_upscaler or DEFAULT_UPSCALER
    if upscaler in LATENT_UPSCALERS:
        init = upscale_latents(z, size, f, upscaler)
    else:
        model = pipe._model_upscaler(p)
        pixels = upscale_pixels(pipe.decode(z), size, f, upscaler, model).to(z.device)
        posterior = pipe.encode(pixels)
        init = torch.cat([m.vae.scale(posterior.sample(g)) for g in generators_for(p.seed, p.batch)])
        init = crop(init, size)
    total, run = second_pass_steps(p.hires_steps or p.steps, p.strength)
    if run == 0:
        return init
    if p.hires_prompt or p.hires_negative_prompt:  # its own prompts, and the LoRAs their tags name
        second = p.second_pass()
        pipe._use_loras(second)
        cond, _ = pipe._conditioning(second, z.device)
    spec = SAMPLERS[p.hires_sampler or p.sampler]
    full = sampling_schedule(spec, noise, total, p.timestep_spacing, c.schedule.diffusers)
    walk = replace(full, sigmas=full.sigmas[total - run :], timesteps=full.timesteps[total - run :])
    cache = FeatureCache(p.feature_cache) if p.feature_cache > 1 else None
    denoiser = Denoiser(m.unet, noise, c.schedule.prediction_type, walk, cache)
    options = {"eta": p.eta} if spec.name == "ddim" else {}
    shape = (init.shape[1], *init.shape[2:])
    return sample_latents(denoiser, spec, cond, generators_for(p.seed, p.batch), shape, init, on_step, **options)
