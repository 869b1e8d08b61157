"""The popular web UI's API (`/sdapi/v1/*`): request fields, response shapes and defaults as that
server has them (../shared/reference/a1111-api.md), mapped onto our pipeline.

Fields we do not implement are accepted when inert (their defaults, `enable_hr: false`, disabled
scripts) and refused with a 422 naming them when they would change the image: a client must never
get a silently different picture."""

import base64
import binascii
import io
import json
import time
from typing import Any

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from ldmkit.errors import ConfigError, RequestError


class GenerationRequest(BaseModel):
    # Clients send the whole payload of the web UI, hi-res fix and extension fields included: accept
    # what we do not know, and judge it in `refuse_unsupported`.
    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    sampler_index: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    # None: the model's own (its chosen steps, guidance and size); the web UI's 50, 7, 512x512 would
    # overrule what a model was made for
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    force_task_id: str | None = None
    infotext: str | None = None
    # ldmkit's own generation parameters, under their GenerationParams names (the web UI has none of
    # them; None: ldmkit's default).
    guidance_rescale: float | None = None
    prompt_mode: str | None = None
    timestep_spacing: str | None = None
    feature_cache: int | None = None
    # SDXL's micro-conditioning, as diffusers names it: sizes [height, width], crops [top, left]
    original_size: list[int] | None = None
    crops_coords_top_left: list[int] | None = None
    target_size: list[int] | None = None
    negative_original_size: list[int] | None = None
    negative_crops_coords_top_left: list[int] | None = None
    negative_target_size: list[int] | None = None
    aesthetic_score: float | None = None
    negative_aesthetic_score: float | None = None


class Txt2ImgRequest(GenerationRequest):
    # The web UI's hires fix (pipelines/hires.py); its fields are inert while enable_hr is false
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    hr_checkpoint_name: str | None = None
    firstphase_width: int = 0
    firstphase_height: int = 0


class Img2ImgRequest(GenerationRequest):
    init_images: list[str] = Field(default_factory=list)
    mask: str | None = None
    mask_blur: int = 4
    resize_mode: int = 0
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpainting_mask_invert: int = 0
    inpaint_blend: str | None = None  # ldmkit's: "denoised" (the web UI's way, the default) or "noised" (diffusers')
    include_init_images: bool = False


class PngInfoRequest(BaseModel):
    image: str


# Settings in `override_settings` (and POST /options) we act on; any other override changes nothing
# we could honour, so it is refused unless it is inert.
INERT_OVERRIDES = {"sd_vae": {"Automatic", "None", None}, "samples_format": {"png"}, "sd_vae_encode_method": {"Full"}}
# Settings read and checked where they are used (server/generation.py resolve, server/decoding.py).
READ_OVERRIDES = ("sd_model_checkpoint", "CLIP_stop_at_last_layers", "show_progress_type", "sd_vae_decode_method")


def read_upload(data: str, what: str, max_pixels: int) -> bytes:
    """A base64 image's bytes (with or without a data: URL prefix), its header read and its declared size
    checked, nothing decoded: cheap enough for a request thread. A 422 names the field."""
    if not isinstance(data, str) or not data:
        raise RequestError(f"{what}: expected a base64-encoded image")
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{what}: not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            size = im.size
    except Image.DecompressionBombError:  # Pillow's own guard, for sizes far beyond ours
        raise RequestError(f"{what}: declares more than {max_pixels} pixels; allowed: at most {max_pixels}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise RequestError(f"{what}: base64 data is not a readable image") from None
    if size[0] * size[1] > max_pixels:
        raise RequestError(f"{what}: {size[0]}x{size[1]} pixels; allowed: at most {max_pixels}")
    return raw


def decode_upload(raw: bytes, what: str, max_pixels: int) -> Image.Image:
    """The image of read_upload's bytes, decoded (on the worker, one at a time: memory stays bounded)."""
    from ldmkit.images import open_image

    try:
        return open_image(io.BytesIO(raw), what, max_pixels)
    except ConfigError as e:
        raise RequestError(str(e)) from None


def decode_image(data: str, what: str, max_pixels: int) -> Image.Image:
    """read_upload then decode_upload."""
    return decode_upload(read_upload(data, what, max_pixels), what, max_pixels)


def encode_png(image: Image.Image, parameters: str | None = None) -> str:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


def refused_hires(req: "Txt2ImgRequest") -> list[str]:
    """The hires fields we cannot honour: a second-pass checkpoint, the old first-pass size."""
    problems = []
    if req.hr_checkpoint_name not in (None, "", "Use same checkpoint"):
        problems.append("hr_checkpoint_name (the second pass uses the same checkpoint)")
    if req.firstphase_width or req.firstphase_height:
        problems.append("firstphase_width/height (give width, height and hr_scale or hr_resize_x/y)")
    return problems


def refuse_unsupported(req: GenerationRequest, controlnet_ok: bool = True) -> None:
    """422 for every field whose value we cannot honour."""
    problems = []
    if req.styles:
        problems.append("styles (prompt styles are not supported; put the text in the prompt)")
    if req.subseed_strength:
        problems.append("subseed_strength (variation seeds are not supported)")
    if req.seed_resize_from_h > 0 or req.seed_resize_from_w > 0:
        problems.append("seed_resize_from_h/w (resizing seeds is not supported)")
    if req.restore_faces:
        problems.append("restore_faces (no face restoration)")
    if req.tiling:
        problems.append("tiling (seamless tiling is not supported)")
    if getattr(req, "enable_hr", False):
        txt2img = isinstance(req, Txt2ImgRequest)
        problems += refused_hires(req) if txt2img else ["enable_hr (the hires fix is txt2img's)"]
    if req.script_name not in (None, "", "None"):
        problems.append(f"script_name {req.script_name!r} (unknown script; available: none)")
    for name, value in (req.override_settings or {}).items():
        if name in READ_OVERRIDES:
            continue
        if name in INERT_OVERRIDES and isinstance(value, str | None) and value in INERT_OVERRIDES[name]:
            continue
        problems.append(f"override_settings.{name} (not supported)")
    for name, script in (req.alwayson_scripts or {}).items():
        args = script.get("args", []) if isinstance(script, dict) else script
        if args is None:
            continue
        if not isinstance(args, list):
            problems.append(f"alwayson_scripts.{name}.args (expected a list)")
            continue
        if name.lower() == "controlnet" and controlnet_ok:
            continue
        if any(a is True or (isinstance(a, dict) and a.get("enabled", True)) for a in args):
            problems.append(f"alwayson_scripts.{name} (unknown script; available: ControlNet)")
    if isinstance(req, Img2ImgRequest):
        if req.mask and req.inpaint_full_res:
            problems.append("inpaint_full_res (only-masked inpainting is not supported; send false)")
        if req.mask and req.inpainting_fill not in (1,):
            problems.append("inpainting_fill (only 1, 'original', is supported)")
        if req.resize_mode != 0:
            problems.append("resize_mode (only 0, 'Just resize', is supported)")
    if problems:
        raise RequestError("unsupported: " + "; ".join(problems))


def info_json(
    req: GenerationRequest,
    *,
    seeds: list[int],
    infotexts: list[str],
    sampler_title: str,
    model_name: str,
    model_hash: str,
    clip_skip: int,
    strength: float | None,
    version: str,
    ran: dict,
    warnings: list[str],
) -> str:
    """The response's `info`: a JSON string, as clients json.loads it. `ran`: width, height, cfg_scale and
    steps as the run used them (the model's own where the request left them out)."""
    n = len(seeds)
    return json.dumps(
        {
            "prompt": req.prompt,
            "all_prompts": [req.prompt] * n,
            "negative_prompt": req.negative_prompt,
            "all_negative_prompts": [req.negative_prompt] * n,
            "seed": seeds[0] if seeds else req.seed,
            "all_seeds": seeds,
            "subseed": -1,
            "all_subseeds": [-1] * n,
            "subseed_strength": 0,
            "width": ran["width"],
            "height": ran["height"],
            "sampler_name": sampler_title,
            "cfg_scale": ran["cfg_scale"],
            "steps": ran["steps"],
            "batch_size": req.batch_size,
            "restore_faces": False,
            "face_restoration_model": None,
            "sd_model_name": model_name,
            "sd_model_hash": model_hash,
            "sd_vae_name": None,
            "sd_vae_hash": None,
            "seed_resize_from_w": -1,
            "seed_resize_from_h": -1,
            "denoising_strength": strength,
            "extra_generation_params": {},
            "index_of_first_image": 0,
            "infotexts": infotexts,
            "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
            "clip_skip": clip_skip,
            "is_using_inpainting_conditioning": False,
            "version": version,
            "warnings": warnings,  # ldmkit's: e.g. words a closed-vocabulary model does not know
        }
    )
