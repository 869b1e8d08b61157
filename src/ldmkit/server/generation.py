"""From a web-UI generation request (txt2img, img2img) to pipeline calls on the worker, and back to
the web UI's answer: checked against the server's limits, the sampler looked up by its web UI name,
ControlNet units read from `alwayson_scripts`, n_iter batches run as one job, the images saved unless
the request says not to."""

import asyncio
import math
import secrets
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from fastapi.concurrency import run_in_threadpool

from ldmkit import __version__
from ldmkit.errors import RequestError
from ldmkit.pipelines.hires import is_builtin, model_upscaler
from ldmkit.pipelines.params import MICRO_PAIRS, GenerationParams
from ldmkit.server import decoding
from ldmkit.server.webui import (
    GenerationRequest,
    Img2ImgRequest,
    decode_image,
    decode_upload,
    encode_png,
    info_json,
    read_upload,
    refuse_unsupported,
)
from ldmkit.server.worker import Worker

if TYPE_CHECKING:
    from ldmkit.server.app import Limits
    from ldmkit.server.registry import Models
    from ldmkit.server.state import ServerState


@dataclass
class Plan:
    """What a request comes to before it reaches the worker."""

    model: str  # a name in Models.paths
    params: GenerationParams  # the first batch's; images and ControlNet units are added on the worker
    clip_skip: int  # the web UI's setting (1 = the model's own layer)
    uploads: dict[str, bytes] = field(default_factory=dict)  # init_images[0], mask: checked, not decoded
    refiner: str | None = None  # SDXL's refiner, a name in Models.paths
    preview: str = "Approx NN"  # the web UI's show_progress_type (server/decoding.py)
    decode: str = "Full"  # the web UI's sd_vae_decode_method


# GenerationParams field <- the request field it is read from, and its type (None in the request:
# GenerationParams' default). The sampler, clip skip, images and ControlNets are read apart (resolve);
# LoRAs only through the prompt's <lora:NAME:WEIGHT> tags, looked up in the server's --lora-dir (a
# client never names a file).
FROM_REQUEST = {
    "prompt": ("prompt", str),
    "negative_prompt": ("negative_prompt", str),
    "steps": ("steps", int),
    "cfg": ("cfg_scale", float),
    "width": ("width", int),
    "height": ("height", int),
    "batch": ("batch_size", int),
    "strength": ("denoising_strength", float),
    "mask_blur": ("mask_blur", float),
    "inpaint_blend": ("inpaint_blend", str),
    "eta": ("eta", float),
    "guidance_rescale": ("guidance_rescale", float),
    "prompt_mode": ("prompt_mode", str),
    "timestep_spacing": ("timestep_spacing", str),
    "feature_cache": ("feature_cache", int),
    **{name: (name, tuple) for name in MICRO_PAIRS},
    "aesthetic_score": ("aesthetic_score", float),
    "negative_aesthetic_score": ("negative_aesthetic_score", float),
}
# The hires fix's fields, read when the request's enable_hr is true (txt2img only)
HIRES_FROM_REQUEST = {
    "hires_scale": ("hr_scale", float),
    "hires_width": ("hr_resize_x", int),
    "hires_height": ("hr_resize_y", int),
    "hires_upscaler": ("hr_upscaler", str),
    "hires_steps": ("hr_second_pass_steps", int),
    "hires_prompt": ("hr_prompt", str),
    "hires_negative_prompt": ("hr_negative_prompt", str),
}
NOT_FROM_REQUEST = {"loras": "the prompt's <lora:NAME:WEIGHT> tags, in the server's --lora-dir"}
REFINER_SWITCH = 0.8  # the web UI's refiner_switch_at when a refiner_checkpoint is given alone


def within_limits(width: int | None, height: int | None, steps: int | None, lim: "Limits") -> None:
    """The size and steps a run may have; None: not yet known (the model's own, checked once resolved)."""
    for name, v in (("width", width), ("height", height)):
        if v is not None and (v <= 0 or v % 8):
            raise RequestError(f"{name}: {v}; allowed: a positive multiple of 8")
    if width is not None and height is not None and width * height > lim.max_pixels:
        raise RequestError(f"width x height: {width}x{height}; allowed: at most {lim.max_pixels} pixels")
    if steps is not None and not 1 <= steps <= lim.max_steps:
        raise RequestError(f"steps: {steps}; allowed: 1 to {lim.max_steps}")


def validate(req: GenerationRequest, lim: "Limits") -> None:
    refuse_unsupported(req)
    within_limits(req.width, req.height, req.steps, lim)
    if req.batch_size < 1 or req.n_iter < 1 or req.batch_size * req.n_iter > lim.max_images:
        raise RequestError(f"batch_size x n_iter: {req.batch_size}x{req.n_iter}; allowed: 1 to {lim.max_images} images")
    for name in ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt"):
        text = getattr(req, name, "")
        if len(text) > lim.max_prompt_chars:
            raise RequestError(f"{name}: {len(text)} characters; allowed: {lim.max_prompt_chars}")


# the web UI's, lower-case; "sgm uniform" (also "sgm_uniform", "sgmuniform") is a timestep spacing here
SCHEDULE_TYPES = ("automatic", "uniform", "karras", "exponential", "sgm uniform")


def sampler_of(req: GenerationRequest) -> str | None:
    from ldmkit.diffusion.registry import from_webui, webui_spacing

    known = req.scheduler is None or req.scheduler.strip().lower() in SCHEDULE_TYPES or webui_spacing(req.scheduler)
    if not known:
        raise RequestError(f"scheduler: {req.scheduler!r}; allowed: {', '.join(SCHEDULE_TYPES)}")
    name = req.sampler_name or req.sampler_index
    if not name and (req.scheduler or "automatic").strip().lower() != "automatic":
        raise RequestError(f"scheduler {req.scheduler!r} without sampler_name: give the sampler too")
    return from_webui(name, req.scheduler) if name else None


def spacing_of(req: GenerationRequest) -> str | None:
    """The run's timestep spacing: ldmkit's `timestep_spacing` field, or the one the web UI's schedule type
    is here (SGM Uniform: sgm_uniform); given both, they must agree."""
    from ldmkit.diffusion.registry import webui_spacing

    implied = webui_spacing(req.scheduler)
    if implied and req.timestep_spacing not in (None, implied):
        raise RequestError(f"scheduler {req.scheduler!r} with timestep_spacing {req.timestep_spacing!r}: give one")
    return req.timestep_spacing or implied


def hires_sampler_of(req: GenerationRequest) -> str | None:
    from ldmkit.diffusion.registry import from_webui, webui_spacing

    if not getattr(req, "enable_hr", False):
        return None
    hr = req.hr_scheduler
    if hr not in (None, "", "Use same scheduler") and webui_spacing(hr) != webui_spacing(req.scheduler):
        # both passes walk one timestep spacing (GenerationParams has one): a second pass of another
        # schedule type than SGM Uniform's first, or the reverse, would silently walk the first's
        raise RequestError(f"hr_scheduler {hr!r} with scheduler {req.scheduler!r}: give both or neither SGM Uniform")
    if req.hr_sampler_name in (None, "", "Use same sampler"):
        return None
    return from_webui(req.hr_sampler_name, req.hr_scheduler)


def read_uploads(req: GenerationRequest, max_pixels: int) -> dict[str, bytes]:
    """img2img's base image and mask, their sizes checked from their headers (not yet decoded)."""
    if not isinstance(req, Img2ImgRequest):
        return {}
    if not req.init_images:
        raise RequestError("init_images: give one base64 image")
    uploads = {"init_images[0]": read_upload(req.init_images[0], "init_images[0]", max_pixels)}
    if req.mask:
        uploads["mask"] = read_upload(req.mask, "mask", max_pixels)
    return uploads


def decode_uploads(req: GenerationRequest, plan: Plan, max_pixels: int) -> GenerationParams:
    """The plan's parameters with its images decoded (on the worker: one request's images at a time)."""
    if not plan.uploads:
        return plan.params
    init = decode_upload(plan.uploads["init_images[0]"], "init_images[0]", max_pixels)
    mask = None
    if "mask" in plan.uploads:
        mask = decode_upload(plan.uploads["mask"], "mask", max_pixels)
        if req.inpainting_mask_invert:
            from PIL import ImageOps

            mask = ImageOps.invert(mask.convert("L"))
    return replace(plan.params, init_image=init, mask=mask)


def setting(overrides: dict, options: dict, key: str, kind: type):
    """A web UI setting: the request's override, else the server's option; of the type it must have."""
    value = overrides.get(key)
    if value is None or value == "":
        value = options[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise RequestError(f"override_settings.{key}: {value!r}; expected a {kind.__name__}")
    return value


def resolve(req: GenerationRequest, server: "ServerState") -> Plan:
    """The request checked and resolved on the request thread, cheaply (no image is decoded here): a 4xx
    here never queues a job."""
    limits = server.config.limits
    validate(req, limits)
    uploads = read_uploads(req, limits.max_input_pixels)
    overrides = req.override_settings or {}
    name = server.models.find(setting(overrides, server.options, "sd_model_checkpoint", str))
    refiner = None
    if req.refiner_checkpoint not in (None, "", "None"):
        refiner = server.models.find(req.refiner_checkpoint)
    clip_skip = setting(overrides, server.options, "CLIP_stop_at_last_layers", int)
    if not 1 <= clip_skip <= 12:
        raise RequestError(f"CLIP_stop_at_last_layers: {clip_skip}; allowed: 1 to 12")
    table = {**FROM_REQUEST, **(HIRES_FROM_REQUEST if getattr(req, "enable_hr", False) else {})}
    read = {field: (getattr(req, attr, None), kind) for field, (attr, kind) in table.items()}
    read["timestep_spacing"] = (spacing_of(req), str)  # the field, or the web UI's SGM Uniform
    params = GenerationParams(
        **{field: kind(value) for field, (value, kind) in read.items() if value is not None},
        sampler=sampler_of(req),
        seed=req.seed if req.seed >= 0 else secrets.randbelow(2**32),  # n_iter batches follow on from it
        clip_skip=clip_skip if clip_skip > 1 else None,
        hires_sampler=hires_sampler_of(req),
        refiner_switch_at=(req.refiner_switch_at or REFINER_SWITCH) if refiner else None,
    )
    if params.hires and not is_builtin(params.hires_upscaler):
        model_upscaler(params.hires_upscaler, server.config.upscaler_dir)  # found here, read on the worker
    tiny = server.config.tiny_decoder  # TAESD is refused here when there is none; per model on the worker
    preview, decode = (
        decoding.check(key, setting(overrides, server.options, key, str), tiny, "override_settings.")
        for key in ("show_progress_type", "sd_vae_decode_method")
    )
    return Plan(name, params, clip_skip, uploads, refiner, preview, decode)


def number(unit: dict, key: str, default: float, where: str) -> float:
    value = unit.get(key, default)
    try:
        if isinstance(value, bool):
            raise TypeError
        x = float(value)
    except (TypeError, ValueError):
        raise RequestError(f"{where}.{key}: {value!r}; expected a number") from None
    if not math.isfinite(x):
        raise RequestError(f"{where}.{key}: {value!r}; expected a finite number")
    return x


MAX_UNITS = 16  # ControlNet and IP-Adapter units in one request


def control_inputs(req: GenerationRequest, pipe, models: "Models", max_pixels: int, size: tuple[int, int]):
    """The enabled ControlNet units of `alwayson_scripts`, each with its image decoded and its model read
    and checked (on the worker): (ControlInputs, ImagePromptInputs for the IP-Adapter units)."""
    from ldmkit.pipelines.control import ControlInput
    from ldmkit.pipelines.image_prompt import MAX_IMAGES, ImagePromptInput

    found = [v for k, v in (req.alwayson_scripts or {}).items() if k.lower() == "controlnet"]
    units = (found[0].get("args") or []) if found and isinstance(found[0], dict) else []
    if not isinstance(units, list) or len(units) > MAX_UNITS:
        raise RequestError(f"alwayson_scripts.ControlNet.args: at most {MAX_UNITS} units")
    out, prompts = [], {}
    for i, u in enumerate(units):
        if not isinstance(u, dict) or not u.get("enabled", True):
            continue
        where = f"alwayson_scripts.ControlNet.args[{i}]"
        image = u.get("image") or u.get("input_image")
        if isinstance(image, dict):
            image = image.get("image")
        if not image:
            raise RequestError(f"{where}: no image")
        weight, start, end = (
            number(u, k, d, where) for k, d in (("weight", 1), ("guidance_start", 0), ("guidance_end", 1))
        )
        img = decode_image(image, f"{where}.image", max_pixels)
        if models.image_prompts.is_unit(u):  # an IP-Adapter: the image is a prompt, not a map
            name = str(u.get("model", "")).split(" [")[0]
            if name in prompts:  # another image for the same adapter: side by side, as diffusers takes a list
                same = prompts[name]
                if (same.scale, same.start, same.end) != (weight, start, end) or len(same.images) >= MAX_IMAGES:
                    raise RequestError(f"{where}: {name} again, with another weight or range (or over {MAX_IMAGES})")
                same.images.append(img)
                continue
            adapter, encoder = models.image_prompts.read(str(u.get("model", "")))
            prompts[name] = ImagePromptInput(adapter, encoder, [img], weight, start, end, name)
            continue
        module = str(u.get("module", "none"))
        module = {"invert (from white bg & black line)": "scribble", "depth": "depth"}.get(module, module)
        mode = u.get("control_mode", 0)
        if mode in (1, "My prompt is more important"):
            raise RequestError(f"{where}.control_mode: 'My prompt is more important' is not supported")
        resize = u.get("resize_mode", 1)
        same_aspect = img.width * size[1] == img.height * size[0]
        if resize not in (0, "Just Resize") and not same_aspect:
            raise RequestError(f"{where}.resize_mode: only 'Just Resize' for images of another aspect ratio")
        net = models.controlnet(str(u.get("model", "")), pipe.model.unet.config)
        guess = mode in (2, "ControlNet is more important")
        out.append(ControlInput(net, img, module, weight, start, end, guess, name=str(u.get("model"))))
    return out, list(prompts.values())


def run(server: "ServerState", req: GenerationRequest, plan: Plan, w: Worker) -> tuple[list, bool]:
    """The job, on the worker thread: the request's images decoded, then its n_iter batches, reporting
    progress, stopping between batches (and at the next step) when interrupted. Returns (results,
    interrupted)."""
    from ldmkit.pipelines import Interrupted

    limits = server.config.limits
    max_pixels = limits.max_input_pixels
    pipe = server.load(plan.model)
    w.progress.preview_method = decoding.for_job(pipe, server.models, plan.model, plan.preview, plan.decode)
    pipe.refiner = server.models.refiner(plan.refiner)
    pipe.max_prompt_chunks = limits.max_prompt_chunks
    params = decode_uploads(req, plan, max_pixels).for_model(pipe.model, pipe.defaults, pipe.name)
    within_limits(params.width, params.height, params.steps, limits)  # the model's own size and steps too
    if params.hires:
        size = params.hires_target(pipe.model.config.vae.downsample_factor)
        within_limits(size.width, size.height, params.hires_steps or None, limits)
    control, prompts = control_inputs(req, pipe, server.models, max_pixels, (params.width, params.height))
    w.progress.job_count = req.n_iter
    results = []

    def on_step(info):
        w.progress.sampling_step, w.progress.sampling_steps = info.step, info.steps
        w.progress.step_info = info
        if w.progress.interrupted:
            raise Interrupted(info.x0)

    for i in range(req.n_iter):
        if w.progress.interrupted:
            break
        batch = replace(params, seed=params.seed + i * params.batch, control=control, image_prompts=tuple(prompts))
        results.append(pipe(batch, callback=on_step))
        w.progress.job_no, w.progress.sampling_step = i + 1, 0  # together: the fraction never goes back
    return results, w.progress.interrupted


def uploads_not_echoed(req: GenerationRequest) -> set[str]:
    """The web UI answers img2img's images back only when asked (include_init_images): megabytes otherwise."""
    if isinstance(req, Img2ImgRequest) and not req.include_init_images:
        return {"init_images", "mask"}
    return set()


def response(
    server: "ServerState", req: GenerationRequest, kind: str, plan: Plan, results: list, interrupted: bool
) -> dict:
    """The web UI's answer to a generation request; every image is saved first unless the request says not to."""
    from ldmkit.diffusion.registry import SAMPLERS

    images, seeds, infotexts = [], [], []
    for r in results:
        images += r.images
        seeds += r.seeds
        infotexts += r.infotexts
    if not req.do_not_save_samples or req.save_images:
        for image, s, text in zip(images, seeds, infotexts):
            server.outputs.save(kind, image, s, text)
    if len(images) > 1 and (not req.do_not_save_grid or req.save_images):  # the web UI: no grid of one image
        server.outputs.save_grid(kind, images, infotexts[0])
    spec = SAMPLERS[results[0].params.sampler] if results else None
    title = (spec.webui_name + (" Karras" if spec.webui_schedule == "Karras" else "")) if spec else ""
    strength = results[0].params.denoising_strength if results else None
    p = results[0].params if results else None
    ran = {
        "width": p.width if p else req.width,
        "height": p.height if p else req.height,
        "cfg_scale": p.cfg if p else req.cfg_scale,
        "steps": p.steps if p else req.steps,
    }
    info = info_json(
        req,
        seeds=seeds,
        infotexts=infotexts,
        sampler_title=title,
        model_name=plan.model,
        model_hash=(server.models.short_hash(plan.model) or "")[:10],
        clip_skip=plan.clip_skip,
        strength=strength,
        version=f"ldmkit {__version__}",
        ran=ran,
        warnings=list(dict.fromkeys(w for r in results for w in r.warnings)),
    )
    return {
        "images": [encode_png(im, t) for im, t in zip(images, infotexts)] if req.send_images else [],
        "parameters": {**req.model_dump(exclude=uploads_not_echoed(req)), **ran},
        "info": info,
        **({"interrupted": True} if interrupted else {}),
    }


async def generate(server: "ServerState", req: GenerationRequest, kind: str) -> dict:
    """txt2img or img2img: checked, run as one job on the worker, answered once it is done. The request
    holds no thread while it waits, so status routes answer however many jobs are queued."""
    plan = await run_in_threadpool(resolve, req, server)
    job = server.worker.submit(kind, lambda w: run(server, req, plan, w), req.force_task_id)
    results, interrupted = await asyncio.wrap_future(job.future)
    return await run_in_threadpool(response, server, req, kind, plan, results, interrupted)
