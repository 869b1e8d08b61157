"""Text-to-image, image-to-image and inpainting with one call:

    pipe = Pipeline.load("model.safetensors")
    result = pipe("a red circle above a blue square", steps=20, cfg=7, seed=1)
    result.images[0].save("out.png")

Inpainting works two ways: a 9-channel inpainting model gets the mask and the masked image's
latents as extra input channels; an ordinary model keeps its prediction outside the mask equal to
the original latents at every step (latent blending). Either way the original pixels are
composited back outside the (blurred) mask."""

import hashlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ldmkit import __version__
from ldmkit.diffusion.denoiser import Conditioning, Control, Denoiser
from ldmkit.diffusion.registry import SAMPLERS, get_sampler
from ldmkit.diffusion.sampling import generators_for, sample_latents
from ldmkit.diffusion.schedule import NoiseSchedule
from ldmkit.errors import ConfigError
from ldmkit.images import format_infotext, latent_preview, mask_to_tensor, pil_to_tensor, tensor_to_pil
from ldmkit.models.embeddings import Embeddings
from ldmkit.models.ldm import LatentDiffusion
from ldmkit.models.lora import Lora, LoraSet, find_lora, parse_lora_tags, read_lora
from ldmkit.models.prompts import encode_prompts
from ldmkit.models.unet import FeatureCache, UNetModel
from ldmkit.nn.embedding import guidance_scale_embedding

log = logging.getLogger(__name__)
MAX_SIDE = 4096
MAX_BATCH = 64


@dataclass
class GenerationParams:
    prompt: str | tuple[str, ...]  # a tuple: one prompt per image of the batch
    negative_prompt: str = ""
    steps: int = 20
    cfg: float = 7.0
    sampler: str = "dpmpp_2m_karras"
    seed: int = -1
    width: int | None = None
    height: int | None = None
    batch: int = 1
    clip_skip: int | None = None
    strength: float | None = None
    mask_blur: float | None = None
    eta: float | None = None
    guidance_rescale: float = 0.0
    prompt_mode: str = "webui"
    timestep_spacing: str | None = None
    control: list = field(default_factory=list)  # ControlInput (pipelines/control.py)
    feature_cache: int = 1  # DeepCache interval (models/unet.FeatureCache); 1 = off


BF16_MIN_PARAMS = 100_000_000


def resolve_precision(precision: str, unet_params: int) -> str:
    """fp32 or bf16 for a requested precision; auto: bf16 when the CPU has bf16 matrix units and the
    UNet is big enough to gain (below ~100M parameters bf16 gave nothing here: README, Performance)."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"precision {precision!r}; allowed: auto, fp32, bf16")
    if precision == "auto":
        return "bf16" if unet_params >= BF16_MIN_PARAMS and bf16_supported() else "fp32"
    return precision


def bf16_supported() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX-512 BF16 / AMX) that oneDNN uses."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def estimate_vae_bytes(vae, x: torch.Tensor, factor: int = 1) -> int:
    """A whole autoencoder pass's activation memory, estimated: four copies of its widest feature map
    (a block's input, normalised, activated, and a convolution's reordered input) live at once, in the
    weights' dtype. The widest map is a level's width at the resolution it is upsampled to. SD's
    autoencoder at 1024², fp32: 4.3 GB estimated, 3.7 GB measured (benchmarks/banded_decode.py)."""
    c = vae.config
    h, w = x.shape[-2] // factor * c.downsample_factor, x.shape[-1] // factor * c.downsample_factor
    widest = max(width * (h >> max(0, i - 1)) * (w >> max(0, i - 1)) for i, width in enumerate(c.channels))
    return 4 * x.shape[0] * widest * next(vae.parameters()).element_size()


def available_memory() -> int | None:
    """Bytes the kernel says a process can still take (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


CONTROL_MODES = {False: "Balanced", True: "ControlNet is more important"}  # the popular UI's names
CALL_DEFAULTS = {"steps": 20, "cfg": 7.0, "sampler": "dpmpp_2m_karras"}
LCM_DEFAULTS = {"steps": 4, "cfg": 8.5, "sampler": "lcm"}


class Interrupted(Exception):
    """Raised by a step callback to stop sampling; the call then returns the current x0 prediction,
    decoded (what the popular UI shows after an interrupt)."""

    def __init__(self, x0: torch.Tensor | None = None):
        super().__init__("interrupted")
        self.x0 = x0


@dataclass
class StepInfo:
    """What the per-step callback sees. `preview()` makes cheap RGB previews of the current x0."""

    step: int
    steps: int
    latents: torch.Tensor
    x0: torch.Tensor
    preview: Callable[[], list[Image.Image]]


@dataclass
class Result:
    images: list[Image.Image]
    params: GenerationParams
    seeds: list[int]
    infotexts: list[str]
    latents: torch.Tensor = field(repr=False)
    control_images: list[Image.Image] = field(default_factory=list)  # the preprocessed control images
    interrupted: bool = False  # stopped by the callback: images are the last x0 prediction


def _check_size(name: str, value: int, multiple: int) -> None:
    if not isinstance(value, int) or value <= 0 or value % multiple or value > MAX_SIDE:
        raise ConfigError(f"{name}: {value}; allowed: a multiple of {multiple} from {multiple} to {MAX_SIDE}")


class Pipeline:
    def __init__(
        self, model: LatentDiffusion, name: str = "model", path: Path | None = None, defaults: dict | None = None
    ):
        self.model = model.eval()
        self.name = name
        self.path = path
        # What a call leaves out: ours (consistency models: diffusers' LCM pipeline's), then the
        # settings chosen for this model (bundled models).
        base = LCM_DEFAULTS if model.config.unet.time_cond_proj_dim else CALL_DEFAULTS
        self.defaults = {**base, **(defaults or {})}
        self._hash: str | None = None
        self.lora_dir: Path | None = None  # where <lora:NAME:WEIGHT> tags look
        self.loras = LoraSet(model)  # merged LoRAs; each call makes its own set the merged one
        self.embeddings = Embeddings(model.text_encoder)  # textual inversion, used by name in prompts
        self.tiled_vae: bool | None = None  # None: automatic (see vae_tile)
        self.precision = "fp32"  # set_precision
        self._lora_files: dict[Path, Lora] = {}

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        vae: str | Path | None = None,
        overrides: dict | None = None,
        precision: str = "auto",
    ) -> "Pipeline":
        """A model file or folder, or a bundled model by name ("shapes"; the default when no path is
        given), computing in `precision` (see set_precision)."""
        from ldmkit.bundled import resolve
        from ldmkit.checkpoints.single_file import load_model
        from ldmkit.pipelines.allocator import tune_allocator

        tune_allocator()  # process-wide malloc settings for CPU inference (see allocator.py)
        resolve_precision(precision, 0)  # refuse a bad name before reading anything
        path, defaults = resolve(path)

        def dtype_rule(config) -> torch.dtype:
            # decided from the config, before the weights are read, so a bf16 load converts as it reads
            with torch.device("meta"):
                n = sum(p.numel() for p in UNetModel(config.unet).parameters())
            return torch.bfloat16 if resolve_precision(precision, n) == "bf16" else torch.float32

        model = load_model(path, vae=vae, overrides=overrides, dtype_rule=dtype_rule).use_measured_memory_format()
        pipe = cls(model, name=path.stem if path.is_file() else path.name, path=path, defaults=defaults)
        pipe.set_precision(precision)
        return pipe

    @property
    def model_hash(self) -> str:
        """The web UI's short model hash: the first 10 hex digits of the file's sha256."""
        if self._hash is None:
            target = self.path
            if target is None:
                return ""
            if target.is_dir():
                # A folder: its UNet weights identify it.
                weights = sorted(target.glob("unet/diffusion_pytorch_model*"))
                if not weights:
                    return ""
                target = weights[0]
            h = hashlib.sha256()
            with open(target, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
            self._hash = h.hexdigest()[:10]
        return self._hash

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str = "",
        steps: int | None = None,
        cfg: float | None = None,
        sampler: str | None = None,
        seed: int = -1,
        width: int | None = None,
        height: int | None = None,
        batch: int = 1,
        init_image: Image.Image | None = None,
        strength: float = 0.75,
        mask: Image.Image | None = None,
        mask_blur: float = 4.0,
        clip_skip: int | None = None,
        eta: float = 0.0,
        guidance_rescale: float = 0.0,
        prompt_mode: str = "webui",
        timestep_spacing: str | None = None,
        callback: Callable[[StepInfo], None] | None = None,
        control: list | None = None,
        loras: list[tuple[str | Path, float]] | None = None,
        feature_cache: int = 1,
    ) -> Result:
        """Generate images. A list of prompts makes one image each (image i with seed + i), as diffusers
        takes a list. loras: (file, strength) pairs merged for this call, besides the prompt's
        <lora:NAME:WEIGHT> tags (looked up in `self.lora_dir`). feature_cache N > 1: a full UNet call
        every N calls, the ones between reuse its deep features (DeepCache; off by default)."""
        c = self.model.config
        if not isinstance(prompt, str):
            prompt = tuple(prompt)
            if not prompt or not all(isinstance(x, str) for x in prompt):
                raise ConfigError("prompt: a string, or a non-empty list of strings (one image each)")
            if batch not in (1, len(prompt)):
                raise ConfigError(f"batch {batch} with {len(prompt)} prompts; a list of prompts is one image each")
            batch = len(prompt)
        steps = self.defaults["steps"] if steps is None else steps
        cfg = self.defaults["cfg"] if cfg is None else cfg
        sampler = self.defaults["sampler"] if sampler is None else sampler
        spec = get_sampler(sampler)
        # refuse a bad spacing, or a scheduler config this sampler cannot follow, before any work
        spec.build_schedule(NoiseSchedule.from_config(c.schedule), 1, timestep_spacing, c.schedule.diffusers)
        if not isinstance(steps, int) or steps <= 0:
            raise ConfigError(f"steps: {steps}; allowed: 1 or more")
        FeatureCache(feature_cache)  # refuse a bad interval before any work
        if not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH:
            raise ConfigError(f"batch: {batch}; allowed: 1 to {MAX_BATCH}")
        if mask is not None and init_image is None:
            raise ConfigError("a mask needs an init image (the image to repaint)")
        if init_image is not None and not 0.0 <= strength <= 1.0:
            raise ConfigError(f"strength: {strength}; allowed: 0 to 1")
        if c.unet.in_channels == 9 and mask is None:
            raise ConfigError(f"{self.name} is an inpainting model: give an init image and a mask")
        multiple = max(8, c.vae.downsample_factor)
        if width is None:
            width = (init_image.width // multiple * multiple) if init_image is not None else c.image_size
        if height is None:
            height = (init_image.height // multiple * multiple) if init_image is not None else c.image_size
        _check_size("width", width, multiple)
        _check_size("height", height, multiple)
        if mask is not None and mask.size != init_image.size:
            raise ConfigError(
                f"mask is {mask.size[0]}x{mask.size[1]} but the init image is "
                f"{init_image.size[0]}x{init_image.size[1]}; they must be the same size"
            )
        requested = [(Path(f), float(w)) for f, w in loras or []]
        for text in (*([prompt] if isinstance(prompt, str) else sorted(set(prompt))), negative_prompt):
            requested += [(find_lora(n, self.lora_dir), w) for n, w in parse_lora_tags(text)[1]]
        for path, _ in requested:
            if path not in self._lora_files:
                self._lora_files[path] = read_lora(path, self.model)
        self.loras.apply([(self._lora_files[path], w) for path, w in requested])
        for ci in control or []:
            ci.check()
            ci.net.check_base(c.unet)
            ci.net.to(next(self.model.unet.parameters()).dtype)  # residuals join the UNet in its dtype
            if ci.net.control_config.downsample_factor != c.vae.downsample_factor:
                raise ConfigError(
                    f"ControlNet {ci.name}: its hint encoder downsamples by {ci.net.control_config.downsample_factor}"
                    f" but this model's autoencoder by {c.vae.downsample_factor}"
                )
        if seed is None or seed < 0:
            seed = secrets.randbelow(2**32)
        text_config = self.model.text_encoder.config
        if clip_skip is not None:
            self.model.text_encoder.config = replace(text_config, clip_skip=clip_skip)
        params = GenerationParams(
            prompt,
            negative_prompt,
            steps,
            cfg,
            sampler,
            seed,
            width,
            height,
            batch,
            self.model.text_encoder.config.clip_skip,
            strength if init_image is not None else None,
            mask_blur if mask is not None else None,
            eta if sampler == "ddim" else None,
            guidance_rescale,
            prompt_mode,
            timestep_spacing=timestep_spacing,
            control=list(control or []),
            feature_cache=feature_cache,
        )
        interrupted = False
        try:
            with torch.no_grad():
                z, images, control_images = self._generate(params, init_image, mask, callback)
        except Interrupted as stop:
            if stop.x0 is None:
                raise
            interrupted, z, control_images = True, stop.x0, []
            with torch.no_grad():
                images = self.decode(z)
        finally:
            self.model.text_encoder.config = text_config
        seeds = [seed + i for i in range(batch)]
        infotexts = [self.infotext(params, s, i) for i, s in enumerate(seeds)]
        return Result(tensor_to_pil(images), params, seeds, infotexts, z, control_images, interrupted)

    def _generate(self, p: GenerationParams, init_image, mask, callback):
        m = self.model
        c = m.config
        spec = get_sampler(p.sampler)
        device = next(m.unet.parameters()).device
        f = c.vae.downsample_factor
        inpaint_model = c.unet.in_channels == 9
        embedded_guidance = bool(c.unet.time_cond_proj_dim)
        use_uncond = p.cfg != 1.0 and not embedded_guidance
        prompts = list(p.prompt) if isinstance(p.prompt, tuple) else [p.prompt] * p.batch
        negative = parse_lora_tags(p.negative_prompt)[0]
        context, uncond = encode_prompts(
            m.text_encoder,
            [parse_lora_tags(x)[0] for x in prompts],
            [negative] * p.batch if use_uncond else None,
            p.prompt_mode,
            self.embeddings,
        )
        cond = Conditioning(context, uncond, cfg_scale=p.cfg, guidance_rescale=p.guidance_rescale)
        if embedded_guidance:
            w = torch.full((p.batch,), float(p.cfg))
            cond.timestep_cond = guidance_scale_embedding(w, c.unet.time_cond_proj_dim).to(device)
        control_images = []
        for ci in p.control:
            image, hint = ci.hint(p.width, p.height)
            control_images.append(image)
            hint = hint.to(device).expand(p.batch, -1, -1, -1)
            cond.control.append(Control(ci.net, hint, ci.strength, ci.start, ci.end, ci.guess_mode))
        generators = generators_for(p.seed, p.batch)
        latent_shape = (4 if inpaint_model else c.unet.in_channels, p.height // f, p.width // f)

        init_latents = pixels = pixel_mask = None
        if init_image is not None:
            pixels = pil_to_tensor(init_image, p.width, p.height).to(device)
            posterior = self.encode(pixels)
            init_latents = torch.cat([m.vae.scale(posterior.sample(g)) for g in generators])
        if mask is not None:
            pixel_mask = mask_to_tensor(mask, p.width, p.height, p.mask_blur).to(device)
            if inpaint_model:
                hard = (mask_to_tensor(mask, p.width, p.height, 0) >= 0.5).float().to(device)
                masked = m.vae.scale(self.encode(pixels * (1 - hard)).mode())
                hard = F.interpolate(hard, size=latent_shape[1:])
                cond.concat = torch.cat([hard, masked], dim=1).expand(p.batch, -1, -1, -1)
            else:
                keep = F.interpolate(pixel_mask, size=latent_shape[1:], mode="bilinear", align_corners=False)
                cond.blend = (keep, init_latents)
        strength = p.strength if p.strength is not None else 1.0
        if inpaint_model and strength >= 1.0:
            init_latents = None  # from pure noise, as diffusers does at full strength

        denoiser = Denoiser(
            m.unet,
            NoiseSchedule.from_config(c.schedule, m.alphas_cumprod),
            c.schedule.prediction_type,
            FeatureCache(p.feature_cache) if p.feature_cache > 1 else None,
        )

        @torch.no_grad()
        def preview(x0: torch.Tensor) -> list[Image.Image]:
            if c.latent_rgb is not None:
                return latent_preview(x0, c.latent_rgb)
            if c.family.startswith("sd"):
                return latent_preview(x0)
            return tensor_to_pil(self.decode(x0))  # small models: decoding is cheap

        def on_step(i, x, x0):
            if callback is not None:
                callback(StepInfo(i + 1, p.steps, x, x0, lambda: preview(x0)))

        options = {"eta": p.eta} if p.eta is not None else {}
        z = sample_latents(
            denoiser,
            spec,
            p.steps,
            cond,
            generators,
            latent_shape,
            init_latents=init_latents,
            strength=strength,
            callback=on_step,
            spacing=p.timestep_spacing,
            scheduler_config=c.schedule.diffusers,
            **options,
        )
        if cond.blend is not None:
            keep, z_init = cond.blend
            z = keep * z + (1 - keep) * z_init
        images = self.decode(z)
        if pixel_mask is not None:
            images = pixel_mask * images + (1 - pixel_mask) * pixels
        return z, images, control_images

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion latents -> images in [-1, 1], fp32, in the autoencoder's dtype and tiles."""
        vae = self.model.vae
        dtype = next(vae.parameters()).dtype
        return vae.decode(vae.unscale(z).to(dtype), self.vae_tile(z)).float()

    def encode(self, pixels: torch.Tensor):
        from ldmkit.models.autoencoder import DiagonalGaussian

        vae = self.model.vae
        dtype = next(vae.parameters()).dtype
        posterior = vae.encode(pixels.to(dtype), self.vae_tile(pixels, vae.config.downsample_factor))
        if dtype == torch.float32:
            return posterior
        return DiagonalGaussian(torch.cat([posterior.mean, posterior.logvar], dim=1).float())

    def set_precision(self, precision: str = "auto") -> str:
        """fp32, or bf16: the UNet's and the autoencoder's weights converted once (faster than autocast,
        which re-casts every call), while the text tower, the sampler's state and the guidance sum stay
        fp32. auto: bf16 when the CPU has bf16 matrix units and the UNet is big enough to gain (below
        ~100M parameters bf16 gave nothing here: README, Performance). Set once, at load."""
        precision = resolve_precision(precision, sum(p.numel() for p in self.model.unet.parameters()))
        if precision == "bf16":
            if next(self.model.unet.parameters()).dtype not in (torch.float32, torch.bfloat16):
                raise ConfigError("set_precision: the model is neither fp32 nor bf16")
            self.model.unet.to(torch.bfloat16)
            self.model.vae.to(torch.bfloat16)
            self.model.use_measured_memory_format()
        elif next(self.model.unet.parameters()).dtype != torch.float32:
            raise ConfigError("fp32 after bf16: reload the model (bf16 weights cannot be made exact again)")
        self.precision = precision
        return precision

    def compile(self, freezing: bool = True) -> None:
        """Opt-in torch.compile (inductor) of the UNet's forward. The first call at each shape compiles
        (tens of seconds on two cores); measured here: a 13M UNet in bf16 with freezing 1.8x over eager
        (../shared/reference/cpu-performance.md), the SD 1.5 UNet 0.97x after an 84 s first call
        (benchmarks/compile_unet.py): worth it for small models only. Options are passed per compile: no
        global setting changes.
        Only the forward is compiled, so the module, its weights and its state dict stay as they are."""
        unet = self.model.unet
        if getattr(unet, "_ldmkit_compiled", False):
            return
        unet.forward = torch.compile(unet.forward, options={"freezing": freezing})
        unet._ldmkit_compiled = True

    def vae_tile(self, x: torch.Tensor, factor: int = 1) -> int | None:
        """The autoencoder's tile (latent pixels) for a tensor of `factor` x latent size, or None (whole,
        as diffusers and the popular web UI decode unless asked). With a tile, decoding runs in bands of
        that many rows with whole-image statistics (the same image within float rounding, less memory)
        and encoding in diffusers' independent tiles. `tiled_vae` True forces it; None (auto) only when a
        whole pass would need more memory than the machine has free (estimate_vae_bytes), and says so in
        the log; False never."""
        native = max(8, self.model.config.image_size // self.model.vae.config.downsample_factor)
        if self.tiled_vae is False:
            return None
        if self.tiled_vae is None:
            need, free = estimate_vae_bytes(self.model.vae, x, factor), available_memory()
            if free is None or need <= free:
                return None
            log.info("autoencoder in bands/tiles: a whole pass needs ~%d MB, %d MB are free", need >> 20, free >> 20)
        return native

    def _merged(self) -> list[Lora]:
        return [self._lora_files[Path(path)] for path, _ in self.loras.applied]

    def schedule_type(self, spec, p: GenerationParams) -> str:
        """The web UI's schedule type of the sigmas this run walked: a folder's scheduler config can turn
        on Karras or exponential sigmas for samplers that are uniform otherwise."""
        settings = spec.scheduler_settings(self.model.config.schedule.diffusers, p.timestep_spacing)
        if settings.get("use_karras_sigmas"):
            return "Karras"
        if settings.get("use_exponential_sigmas"):
            return "Exponential"
        return spec.webui_schedule

    def infotext(self, p: GenerationParams, seed: int, index: int = 0) -> str:
        spec = SAMPLERS[p.sampler]
        fields = {
            "Steps": p.steps,
            "Sampler": spec.webui_name,
            "Schedule type": self.schedule_type(spec, p),
            "CFG scale": p.cfg,
            "Seed": seed,
            "Size": f"{p.width}x{p.height}",
            "Model hash": self.model_hash or None,
            "Model": self.name,
            "Denoising strength": p.strength,
            "Mask blur": p.mask_blur,
            "Clip skip": p.clip_skip if p.clip_skip and p.clip_skip != 1 else None,
            "Eta DDIM": p.eta if p.eta else None,
            "Guidance rescale": p.guidance_rescale or None,
            "Prompt mode": p.prompt_mode if p.prompt_mode != "webui" else None,
            "Timestep spacing": p.timestep_spacing,
            "Precision": self.precision if self.precision != "fp32" else None,
            "Feature cache": p.feature_cache if p.feature_cache > 1 else None,
            "Lora hashes": ", ".join(f"{lora.name}: {lora.hash}" for lora in self._merged()) or None,
            **{
                f"ControlNet {i}": (
                    f"Module: {ci.kind}, Model: {ci.name}, Weight: {ci.strength:g}, Guidance Start: {ci.start:g}, "
                    f"Guidance End: {ci.end:g}, Control Mode: {CONTROL_MODES[ci.guess_mode]}"
                )
                for i, ci in enumerate(p.control)
            },
            "ldmkit sampler": p.sampler,
            "Version": f"ldmkit {__version__}",
        }
        prompt = p.prompt[index] if isinstance(p.prompt, tuple) else p.prompt
        return format_infotext(prompt, p.negative_prompt, fields)
