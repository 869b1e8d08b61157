"""Generation parameters: every default and every check, once. The CLI, the Python API, the HTTP API
and the infotext a PNG carries are views of `GenerationParams`, so a parameter added here reaches all
of them (tests/test_params.py fails for one that does not).

Checks that need no model run when the parameters are built (before any model is loaded); the ones
that depend on the model (sizes, the sampler's schedule, clip skip, inpainting, ControlNets) run in
`for_model`, which also fills in what the user left to the model (size, steps, guidance, sampler)
and draws a random seed. The infotext written into every PNG and read back by `--from-png` lives
here too: one table says which field is which entry."""

import secrets
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from PIL import Image

from ldmkit.checkpoints.families import FAMILIES
from ldmkit.diffusion.registry import SAMPLERS, from_webui, get_sampler, webui_spacing
from ldmkit.errors import ConfigError
from ldmkit.images import format_infotext, parse_infotext
from ldmkit.models.prompts import check_prompt_mode
from ldmkit.models.text import check_clip_skip
from ldmkit.models.unet import FeatureCache
from ldmkit.pipelines.hires import Target, check_upscaler
from ldmkit.pipelines.hires import target as hires_target
from ldmkit.pipelines.image_prompt import infotext_fields
from ldmkit.pipelines.micro_conditioning import (
    AESTHETIC_SCORE,
    NEGATIVE_AESTHETIC_SCORE,
    PAIRS,
    check_micro_conditioning,
)

MAX_SIDE = 4096
MAX_BATCH = 64
MAX_MASK_BLUR = 64  # pixels: the popular web UI's largest
MAX_HIRES_SCALE = 8.0
# What a call leaves out when the model does not say (bundled models carry their own choice).
CALL_DEFAULTS = {"steps": 20, "cfg": 7.0, "sampler": "dpmpp_2m_karras"}
LCM_DEFAULTS = {"steps": 4, "cfg": 8.5, "sampler": "lcm"}  # diffusers' LCM pipeline's
INPAINT_BLENDS = ("denoised", "noised")
CONTROL_MODES = {False: "Balanced", True: "ControlNet is more important"}  # the popular UI's names


@dataclass(frozen=True, kw_only=True)
class GenerationParams:
    prompt: str | tuple[str, ...] = ""  # a list or tuple: one prompt per image of the batch
    negative_prompt: str = ""
    steps: int | None = None  # steps, cfg, sampler: None is the model's own choice (Pipeline.defaults)
    cfg: float | None = None
    sampler: str | None = None
    seed: int = -1  # below 0: drawn at random when the run starts; image i of a batch uses seed + i
    width: int | None = None  # None: the init image's size (down to a multiple of 8), else the model's
    height: int | None = None
    batch: int = 1
    clip_skip: int | None = None  # None: the model's own layer
    init_image: Image.Image | None = field(default=None, repr=False)  # image-to-image
    strength: float = 0.75  # with an init image: how much of it is repainted
    mask: Image.Image | None = field(default=None, repr=False)  # inpainting: white is repainted
    mask_blur: float = 4.0
    # How an ordinary model keeps the unmasked region (diffusion/denoiser.Blend): "denoised", its
    # prediction replaced by the original (the web UI); "noised", its latents by the original noised to
    # each step's level (diffusers). Either way the original pixels are pasted back outside the mask.
    inpaint_blend: str = "denoised"
    eta: float = 0.0  # DDIM's
    guidance_rescale: float = 0.0
    prompt_mode: str = "webui"  # webui: emphasis syntax, 75-token chunks; truncate: as diffusers
    timestep_spacing: str | None = None  # None: the sampler's (or the model folder's scheduler config)
    loras: tuple[tuple[Path, float], ...] = ()  # (file, strength) merged for this call, besides <lora:> tags
    control: tuple = ()  # ControlInput (pipelines/control.py), one per ControlNet
    image_prompts: tuple = ()  # ImagePromptInput (pipelines/image_prompt.py), one per IP-Adapter
    feature_cache: int = 1  # DeepCache interval (models/unet.FeatureCache); 1 = off
    # Hires fix (pipelines/hires.py), on when a scale or a width/height is given: a second pass at
    # the first pass's size x scale (or at the given size), of `strength`
    hires_scale: float | None = None
    hires_width: int = 0
    hires_height: int = 0
    hires_upscaler: str | None = None  # None: "Latent"
    hires_steps: int = 0  # 0: the first pass's
    hires_sampler: str | None = None  # None: the first pass's
    hires_prompt: str = ""  # "": the first pass's prompt (the web UI's hr_prompt)
    hires_negative_prompt: str = ""  # "": the first pass's negative prompt
    # SDXL's micro-conditioning (pipelines/micro_conditioning.py), in diffusers' names and order: sizes
    # (height, width), the crop (top, left); None: the output size, and for the negative ones the
    # positive one's. The aesthetic scores are the refiner's.
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float = AESTHETIC_SCORE
    negative_aesthetic_score: float = NEGATIVE_AESTHETIC_SCORE
    # SDXL's refiner (pipelines/refiner.py) takes over at this fraction of the schedule (diffusers'
    # denoising_end / denoising_start, the web UI's refiner_switch_at); None: no refiner
    refiner_switch_at: float | None = None

    def __post_init__(self):
        set_ = object.__setattr__.__get__(self)  # normalising a frozen instance, once, here
        prompt = self.prompt
        if not isinstance(prompt, str):
            if not isinstance(prompt, (list, tuple)) or not prompt or not all(isinstance(x, str) for x in prompt):
                raise ConfigError("prompt: a string, or a non-empty list of strings (one image each)")
            prompt = tuple(prompt)
            if self.batch not in (1, len(prompt)):
                raise ConfigError(f"batch {self.batch} with {len(prompt)} prompts; a list of prompts is one image each")
            set_("prompt", prompt)
            set_("batch", len(prompt))
        if not isinstance(self.negative_prompt, str):
            raise ConfigError("negative_prompt: a string")
        if self.steps is not None and (not _is_int(self.steps) or self.steps <= 0):
            raise ConfigError(f"steps: {self.steps}; allowed: 1 or more")
        if self.cfg is not None and (isinstance(self.cfg, bool) or not isinstance(self.cfg, int | float)):
            raise ConfigError(f"cfg: {self.cfg!r}; allowed: a number of 0 or more")
        if self.cfg is not None and not 0 <= self.cfg < float("inf"):  # negative: steering away from the prompt
            raise ConfigError(f"cfg: {self.cfg}; allowed: 0 or more (1: no guidance)")
        if self.sampler is not None:
            get_sampler(self.sampler)
        if self.seed is None:
            set_("seed", -1)
        if not _is_int(self.batch) or not 1 <= self.batch <= MAX_BATCH:
            raise ConfigError(f"batch: {self.batch}; allowed: 1 to {MAX_BATCH}")
        if not _is_int(self.seed) or self.seed + self.batch > 2**64:  # image i's generator takes seed + i
            raise ConfigError(
                f"seed: {self.seed!r}; allowed: an integer below {2**64 - self.batch + 1} (below 0: random)"
            )
        if not 0 <= self.eta <= 1:
            raise ConfigError(f"eta: {self.eta}; allowed: 0 (deterministic) to 1")
        if not 0 <= self.guidance_rescale <= 1:
            raise ConfigError(f"guidance_rescale: {self.guidance_rescale}; allowed: 0 to 1")
        if not 0 <= self.mask_blur <= MAX_MASK_BLUR:
            raise ConfigError(f"mask_blur: {self.mask_blur}; allowed: 0 to {MAX_MASK_BLUR} pixels")
        self._check_images()
        check_prompt_mode(self.prompt_mode)
        FeatureCache(self.feature_cache)  # refuses a bad interval
        self._check_hires()
        for name in MICRO_PAIRS:
            set_(name, _pair(name, getattr(self, name)))
        r = self.refiner_switch_at
        if r is not None and (isinstance(r, bool) or not isinstance(r, int | float) or not 0 < r < 1):
            raise ConfigError(f"refiner_switch_at: {r!r}; allowed: between 0 and 1 (the fraction the base model runs)")
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 10:
                raise ConfigError(f"{name}: {v!r}; allowed: 0 to 10")
        set_("loras", tuple((Path(f), float(w)) for f, w in self.loras or ()))
        set_("control", tuple(self.control or ()))
        set_("image_prompts", tuple(self.image_prompts or ()))

    def _check_images(self) -> None:
        if self.mask is not None and self.init_image is None:
            raise ConfigError("a mask needs an init image (the image to repaint)")
        if self.inpaint_blend not in INPAINT_BLENDS:
            raise ConfigError(f"inpaint_blend: {self.inpaint_blend!r}; allowed: {', '.join(INPAINT_BLENDS)}")
        if self.init_image is not None and not 0.0 <= self.strength <= 1.0:
            raise ConfigError(f"strength: {self.strength}; allowed: 0 to 1")
        if self.mask is not None and self.mask.size != self.init_image.size:
            raise ConfigError(
                f"mask is {self.mask.size[0]}x{self.mask.size[1]} but the init image is "
                f"{self.init_image.size[0]}x{self.init_image.size[1]}; they must be the same size"
            )

    def _check_hires(self) -> None:
        s = self.hires_scale
        if s is not None and (isinstance(s, bool) or not isinstance(s, int | float) or not 1 <= s <= MAX_HIRES_SCALE):
            raise ConfigError(f"hires scale: {s!r}; allowed: 1 to {MAX_HIRES_SCALE:g}")
        for name in ("hires_width", "hires_height", "hires_steps"):
            v = getattr(self, name)
            if not _is_int(v) or not 0 <= v <= MAX_SIDE:
                raise ConfigError(f"{name}: {v!r}; allowed: 0 (unset) to {MAX_SIDE}")
        check_upscaler(self.hires_upscaler)
        for name in ("hires_prompt", "hires_negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name}: a string (empty: the first pass's)")
        if self.hires_sampler is not None:
            get_sampler(self.hires_sampler)
        if self.hires and self.init_image is not None:
            raise ConfigError("hires fix is for text-to-image: give no init image with it")

    @property
    def hires(self) -> bool:
        return self.hires_scale is not None or bool(self.hires_width or self.hires_height)

    @property
    def prompts(self) -> list[str]:
        """One prompt per image."""
        return list(self.prompt) if isinstance(self.prompt, tuple) else [self.prompt] * self.batch

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.batch)]

    @property
    def denoising_strength(self) -> float | None:
        """The strength a run used: None without an init image or a hires pass."""
        return self.strength if self.init_image is not None or self.hires else None

    def second_pass(self) -> "GenerationParams":
        """These parameters with the hires pass's prompts in place of the first pass's."""
        return replace(
            self,
            prompt=self.hires_prompt or self.prompt,
            negative_prompt=self.hires_negative_prompt or self.negative_prompt,
            hires_prompt="",
            hires_negative_prompt="",
        )

    def hires_target(self, f: int) -> Target:
        """The hires pass's image size (and crop), for a latent factor f."""
        scale = 2.0 if self.hires_scale is None else self.hires_scale  # the web UI's hr_scale default
        return hires_target(self.width, self.height, scale, self.hires_width, self.hires_height, f)

    def for_model(self, model, defaults: dict, name: str = "model") -> "GenerationParams":
        """These parameters made concrete for `model` (a LatentDiffusion): what was left out filled
        from `defaults` and the model, the random seed drawn, and the model-dependent checks run (the
        sampler's schedule is checked where it is built: diffusion/sampling.sampling_schedule)."""
        c = model.config
        p = replace(
            self,
            steps=defaults["steps"] if self.steps is None else self.steps,
            cfg=defaults["cfg"] if self.cfg is None else self.cfg,
            sampler=defaults["sampler"] if self.sampler is None else self.sampler,
        )
        if c.unet.in_channels == 9 and p.mask is None:
            raise ConfigError(f"{name} is an inpainting model: give an init image and a mask")
        if c.unet.in_channels == 9 and p.inpaint_blend != "denoised":
            raise ConfigError(f"inpaint_blend: {name} is an inpainting model: the mask is its input")
        multiple = max(8, c.vae.downsample_factor)
        width, height = p.width, p.height
        if width is None:
            width = (p.init_image.width // multiple * multiple) if p.init_image is not None else c.image_size
        if height is None:
            height = (p.init_image.height // multiple * multiple) if p.init_image is not None else c.image_size
        _check_size("width", width, multiple)
        _check_size("height", height, multiple)
        if p.hires:
            if c.unet.in_channels == 9 or p.control:
                raise ConfigError("hires fix: not with an inpainting model or ControlNets")
            size = replace(p, width=width, height=height).hires_target(c.vae.downsample_factor)
            _check_size("hires width", size.width, multiple)
            _check_size("hires height", size.height, multiple)
        check_micro_conditioning(c, p)
        family = FAMILIES.get(c.family)
        if family is not None and family.image_to_image_only and p.init_image is None:
            raise ConfigError(
                f"{name} is {family.title}, trained on the last, low-noise steps only: give it an init image, "
                "or use it as the refiner of a base model (--refiner / refiner_checkpoint)"
            )
        clip_skip = c.text_configs[0].clip_skip if p.clip_skip is None else p.clip_skip
        for text in c.text_configs:
            check_clip_skip(text, clip_skip)
        for ip in p.image_prompts:
            ip.check(None if c.sd3 else model.unet, name)
        for ci in p.control:
            ci.check()
            ci.net.check_base(c.unet)
            if ci.net.control_config.downsample_factor != c.vae.downsample_factor:
                raise ConfigError(
                    f"ControlNet {ci.name}: its hint encoder downsamples by {ci.net.control_config.downsample_factor}"
                    f" but this model's autoencoder by {c.vae.downsample_factor}"
                )
        seed = secrets.randbelow(2**32) if p.seed < 0 else p.seed
        return replace(p, width=width, height=height, clip_skip=clip_skip, seed=seed)


MICRO_PAIRS = PAIRS


def _pair(name: str, value) -> tuple[int, int] | None:
    """Two whole numbers from a pair, a list or text ("1024,768", "(1024, 768)"); None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip().strip("()").split(",")
    try:
        a, b = (int(str(v).strip()) if not isinstance(v, int) or isinstance(v, bool) else v for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {value!r}; allowed: two whole numbers, e.g. 1024,1024") from None
    if not (0 <= a <= 4 * MAX_SIDE and 0 <= b <= 4 * MAX_SIDE):
        raise ConfigError(f"{name}: {(a, b)}; allowed: two whole numbers from 0 to {4 * MAX_SIDE}")
    return a, b


def _read_pair(text: str) -> tuple[int, int]:
    return _pair("a size or crop", text)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_size(name: str, value: int, multiple: int) -> None:
    if not _is_int(value) or value <= 0 or value % multiple or value > MAX_SIDE:
        raise ConfigError(f"{name}: {value}; allowed: a multiple of {multiple} from {multiple} to {MAX_SIDE}")


# --- infotext: the popular web UI's parameters text, written into every PNG and read back ---------
# (entry, field, type): the entries a run's parameters are read back from. The web UI writes "Clip
# skip" only when it is not 1, "Denoising strength" only for image-to-image, and so do we.
INFOTEXT_FIELDS = (
    ("Steps", "steps", int),
    ("CFG scale", "cfg", float),
    ("Seed", "seed", int),
    ("Denoising strength", "strength", float),
    ("Mask blur", "mask_blur", float),
    ("Inpaint blend", "inpaint_blend", str),
    ("Clip skip", "clip_skip", int),
    ("Eta DDIM", "eta", float),
    ("Guidance rescale", "guidance_rescale", float),
    ("Prompt mode", "prompt_mode", str),
    ("Timestep spacing", "timestep_spacing", str),
    ("Feature cache", "feature_cache", int),
    ("Hires upscale", "hires_scale", float),
    ("Hires steps", "hires_steps", int),
    ("Hires upscaler", "hires_upscaler", str),
    ("Hires prompt", "hires_prompt", str),
    ("Hires negative prompt", "hires_negative_prompt", str),
    ("Original size", "original_size", _read_pair),
    ("Crop top-left", "crops_coords_top_left", _read_pair),
    ("Target size", "target_size", _read_pair),
    ("Negative original size", "negative_original_size", _read_pair),
    ("Negative crop top-left", "negative_crops_coords_top_left", _read_pair),
    ("Negative target size", "negative_target_size", _read_pair),
    ("Aesthetic score", "aesthetic_score", float),
    ("Negative aesthetic score", "negative_aesthetic_score", float),
    ("Refiner switch at", "refiner_switch_at", float),
)
# Parameters an infotext does not carry: the images and files a run was given (ControlNets and
# LoRAs are recorded by name and hash, for people, not read back).
NOT_IN_INFOTEXT = {"prompt", "negative_prompt", "width", "height", "batch", "init_image", "mask", "loras", "control"}
NOT_IN_INFOTEXT |= {"image_prompts"}
# read from entries of their own form: Hires resize (WxH), Hires sampler (the web UI's name)
NOT_IN_INFOTEXT |= {"hires_width", "hires_height", "hires_sampler"}


@dataclass
class RunFacts:
    """What an infotext says about the run besides its parameters: the model and how it computed."""

    model_name: str
    model_hash: str = ""
    schedule_type: str = ""  # the web UI's name for the sigmas walked (Karras, Uniform, ...)
    precision: str = "fp32"
    lora_hashes: str = ""  # "name: hash, ..." of the LoRAs merged
    refiner: str = ""  # "name [hash]" of SDXL's refiner, when one took over
    vae_decoder: str = ""  # "TAESD" when the tiny decoder made the images (the web UI's "VAE Decoder")


def to_infotext(p: GenerationParams, index: int, run: RunFacts, version: str) -> str:
    """Image `index`'s infotext, in the web UI's field order, for concrete parameters (for_model)."""
    spec = SAMPLERS[p.sampler]
    fields_ = {
        "Steps": p.steps,
        "Sampler": spec.webui_name,
        "Schedule type": run.schedule_type,
        "CFG scale": p.cfg,
        "Seed": p.seed + index,
        "Size": f"{p.width}x{p.height}",
        "Model hash": run.model_hash or None,
        "Model": run.model_name,
        "Denoising strength": p.denoising_strength,
        "Mask blur": p.mask_blur if p.mask is not None else None,
        "Inpaint blend": p.inpaint_blend if p.inpaint_blend != "denoised" else None,
        "Clip skip": p.clip_skip if p.clip_skip and p.clip_skip != 1 else None,
        "Eta DDIM": p.eta if p.sampler == "ddim" and p.eta else None,
        "Guidance rescale": p.guidance_rescale or None,
        "Prompt mode": p.prompt_mode if p.prompt_mode != "webui" else None,
        "Timestep spacing": p.timestep_spacing,
        "Precision": run.precision if run.precision != "fp32" else None,
        "VAE Decoder": run.vae_decoder or None,
        "Feature cache": p.feature_cache if p.feature_cache > 1 else None,
        **hires_fields(p, index),
        **micro_fields(p),
        "Refiner": run.refiner or None,
        "Refiner switch at": p.refiner_switch_at,
        "Lora hashes": run.lora_hashes or None,
        **{
            f"ControlNet {i}": (
                f"Module: {ci.kind}, Model: {ci.name}, Weight: {ci.strength:g}, Guidance Start: {ci.start:g}, "
                f"Guidance End: {ci.end:g}, Control Mode: {CONTROL_MODES[ci.guess_mode]}"
            )
            for i, ci in enumerate(p.control)
        },
        **infotext_fields(p.image_prompts),
        "ldmkit sampler": p.sampler,
        "Version": version,
    }
    return format_infotext(p.prompts[index], p.negative_prompt, fields_)


def hires_fields(p: GenerationParams, index: int) -> dict:
    """The web UI's hires entries: the scale or the size asked for, and the rest only when given (the
    second pass's prompts when they differ from the first's)."""
    if not p.hires:
        return {}
    resize = p.hires_width or p.hires_height
    second = SAMPLERS[p.hires_sampler].webui_name if p.hires_sampler not in (None, p.sampler) else None
    return {
        "Hires upscale": None if resize else (2.0 if p.hires_scale is None else p.hires_scale),
        "Hires resize": f"{p.hires_width}x{p.hires_height}" if resize else None,
        "Hires steps": p.hires_steps or None,
        "Hires upscaler": p.hires_upscaler,
        "Hires sampler": second,
        "Hires prompt": p.hires_prompt if p.hires_prompt not in ("", p.prompts[index]) else None,
        "Hires negative prompt": p.hires_negative_prompt
        if p.hires_negative_prompt not in ("", p.negative_prompt)
        else None,
    }


def micro_fields(p: GenerationParams) -> dict:
    """SDXL's micro-conditioning entries (ldmkit's; the web UI writes none), each only when it is not the
    default: sizes and crops as "a, b" in diffusers' order."""
    defaults = {f.name: f.default for f in fields(GenerationParams)}
    out = {}
    for entry, name, _ in INFOTEXT_FIELDS[-9:-1]:
        v = getattr(p, name)
        if v != defaults[name]:
            out[entry] = f"{v[0]}, {v[1]}" if isinstance(v, tuple) else v
    return out


def from_infotext(text: str) -> tuple[dict, bool]:
    """(GenerationParams keyword arguments, written by ldmkit) from an infotext: exact for ldmkit's
    own, best effort for the web UI's (its sampler named by its title and schedule type)."""
    prompt, negative, f = parse_infotext(text)
    out: dict = {"prompt": prompt, "negative_prompt": negative}
    if "ldmkit sampler" in f:
        out["sampler"] = f["ldmkit sampler"]
    elif "Sampler" in f:
        out["sampler"] = from_webui(f["Sampler"], f.get("Schedule type"))
    if webui_spacing(f.get("Schedule type")):  # the web UI's SGM Uniform; "Timestep spacing" (ours) says it too
        out["timestep_spacing"] = webui_spacing(f["Schedule type"])
    try:
        for entry, name, kind in INFOTEXT_FIELDS:
            if entry in f:
                out[name] = kind(f[entry])
        if "Size" in f:
            out["width"], out["height"] = (int(v) for v in f["Size"].lower().split("x"))
        if "Hires resize" in f:
            out["hires_width"], out["hires_height"] = (int(v) for v in f["Hires resize"].lower().split("x"))
        if "Hires sampler" in f:
            out["hires_sampler"] = from_webui(f["Hires sampler"])
    except ValueError as e:
        raise ConfigError(f"unreadable generation parameters ({e})") from None
    return out, f.get("Version", "").startswith("ldmkit")


PARAM_NAMES = tuple(f.name for f in fields(GenerationParams))
