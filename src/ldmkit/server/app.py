"""`ldmkit serve`: the popular web UI's HTTP API and a web page, over one global worker.

Every generation is a job on the worker (models/worker.py), run in arrival order. A request thread
validates, submits and waits; errors a user can cause come back as 4xx with one message."""

import base64
import binascii
import hashlib
import secrets
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse

from ldmkit import __version__
from ldmkit.errors import CheckpointError, LdmkitError
from ldmkit.server.webui import (
    GenerationRequest,
    Img2ImgRequest,
    PngInfoRequest,
    RequestError,
    Txt2ImgRequest,
    decode_image,
    encode_png,
    info_json,
    refuse_unsupported,
)
from ldmkit.server.worker import Worker

STATIC = Path(__file__).parent / "static"


@dataclass
class Limits:
    max_pixels: int = 1024 * 1024  # width x height
    max_steps: int = 150
    max_images: int = 16  # batch_size x n_iter
    max_prompt_chars: int = 4000


@dataclass
class ServeConfig:
    model: str | None = None  # a path or a bundled name; None: the bundled default
    models_dir: str | None = None  # more checkpoints to offer in the model picker
    controlnets: list[str] = field(default_factory=list)  # ControlNet files offered by name
    lora_dir: str | None = None  # where prompts' <lora:NAME:WEIGHT> tags look
    embeddings_dir: str | None = None  # textual-inversion embeddings, used by name in prompts
    outputs: str = "outputs"
    api_key: str | None = None
    api_auth: str | None = None  # USER:PASS for HTTP Basic
    limits: Limits = field(default_factory=Limits)


class Models:
    """The checkpoints on offer (titled as the web UI titles them) and the one loaded."""

    def __init__(self, config: ServeConfig):
        from ldmkit.bundled import BUNDLED, HERE, resolve

        self.paths: dict[str, Path] = {}  # model_name -> path
        for name, entry in BUNDLED.items():
            if (HERE / entry.file).is_file():
                self.paths[name] = HERE / entry.file
        if config.models_dir:
            for p in sorted(Path(config.models_dir).expanduser().glob("*")):
                if p.suffix in (".safetensors", ".ckpt") or (p / "model_index.json").is_file():
                    self.paths.setdefault(p.stem if p.is_file() else p.name, p)
        first, _ = resolve(config.model)
        self.default = next((n for n, p in self.paths.items() if p == first), None)
        if self.default is None:
            self.default = first.stem if first.is_file() else first.name
            self.paths[self.default] = first
        self._hashes: dict[str, str] = {}
        self.pipe = None
        self.loaded: str | None = None
        self.controlnets: dict[str, Path] = {Path(p).stem: Path(p) for p in config.controlnets}
        self.lora_dir = config.lora_dir
        self._controlnet_files: dict[Path, Any] = {}
        self.embeddings_dir = config.embeddings_dir

    def short_hash(self, name: str) -> str | None:
        path = self.paths[name]
        if name not in self._hashes and path.is_file() and path.stat().st_size < 2**28:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
            self._hashes[name] = h.hexdigest()
        return self._hashes.get(name)

    def title(self, name: str) -> str:
        h = self.short_hash(name)
        filename = self.paths[name].name
        return f"{filename} [{h[:10]}]" if h else filename

    def find(self, wanted: str) -> str:
        """A model by title, file name, name, or title without its hash."""
        for name in self.paths:
            if wanted in (name, self.paths[name].name, str(self.paths[name])) or wanted == self.title(name):
                return name
            if wanted.split(" [")[0] in (self.paths[name].name, name):
                return name
        raise HTTPException(404, f"model {wanted!r} not found; available: {', '.join(self.titles())}")

    def titles(self) -> list[str]:
        return [self.title(n) for n in self.paths]

    def load(self, name: str):
        """On the worker thread only."""
        if self.loaded != name:
            from ldmkit.bundled import BUNDLED
            from ldmkit.pipelines import Pipeline

            self.pipe, self.loaded = None, None  # free the old model first; a failed load leaves none
            self.pipe = Pipeline.load(name if name in BUNDLED else self.paths[name])
            self.pipe.lora_dir = self.lora_dir
            if self.embeddings_dir:
                self.pipe.embeddings.load_folder(self.embeddings_dir)
            self.loaded = name
        return self.pipe

    def controlnet_path(self, name: str) -> Path:
        from ldmkit.bundled import bundled_controlnet

        if name in self.controlnets:
            return self.controlnets[name]
        stem = name.split(" [")[0]
        if stem in self.controlnets:
            return self.controlnets[stem]
        try:
            path = bundled_controlnet(self.pipe.path if self.pipe else None)
        except LdmkitError:
            path = None
        if path is not None and stem in (path.stem, path.name):
            return path
        raise RequestError(f"ControlNet model {name!r} not found; available: {', '.join(self.controlnet_names())}")

    def controlnet(self, name: str, base):
        """A ControlNet by name, read once and checked against the loaded model's UNet."""
        from ldmkit.checkpoints.controlnet_files import load_controlnet

        path = self.controlnet_path(name)
        if path not in self._controlnet_files:
            self._controlnet_files[path] = load_controlnet(path, base=base)
        net = self._controlnet_files[path]
        net.check_base(base)
        return net

    def controlnet_names(self) -> list[str]:
        from ldmkit.bundled import BUNDLED, HERE

        names = list(self.controlnets)
        names += [Path(e.controlnet).stem for e in BUNDLED.values() if e.controlnet and (HERE / e.controlnet).is_file()]
        return names


class Outputs:
    """Every image saved with its parameters, atomically, in the web UI's folder layout."""

    def __init__(self, root: str):
        self.root = Path(root).expanduser()
        self._lock = threading.Lock()
        self._count = len(list(self.root.glob("*-images/*/*.png"))) if self.root.exists() else 0

    def save(self, kind: str, image, seed: int, parameters: str) -> Path:
        from ldmkit.images import write_png

        with self._lock:
            self._count += 1
            n = self._count
        folder = self.root / f"{kind}-images" / date.today().isoformat()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{n:05d}-{seed}.png"
        write_png(path, image, parameters)
        return path


def _check_auth(config: ServeConfig, request: Request) -> bool:
    header = request.headers.get("authorization", "")
    if config.api_key:
        given = request.headers.get("x-api-key") or (header[7:] if header.lower().startswith("bearer ") else "")
        if given and secrets.compare_digest(given.encode(), config.api_key.encode()):
            return True
    if config.api_auth and header.lower().startswith("basic "):
        try:
            given = base64.b64decode(header[6:], validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        return secrets.compare_digest(given.encode(), config.api_auth.encode())
    return False


def create_app(config: ServeConfig) -> FastAPI:
    from ldmkit.diffusion.registry import SAMPLERS, from_webui

    worker = Worker()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.stop()

    app = FastAPI(
        title="ldmkit",
        version=__version__,
        description="The popular web UI's API, served by ldmkit.",
        lifespan=lifespan,
    )
    app.state.config = config
    app.state.worker = worker
    app.state.models = models = Models(config)
    app.state.outputs = outputs = Outputs(config.outputs)
    options: dict[str, Any] = {
        "sd_model_checkpoint": models.title(models.default),
        "CLIP_stop_at_last_layers": 1,
        "sd_vae": "Automatic",
        "samples_format": "png",
        "outdir_samples": str(outputs.root),
    }
    app.state.options = options
    model_lock = threading.Lock()

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if (config.api_key or config.api_auth) and not _check_auth(config, request):
            headers = {"WWW-Authenticate": 'Basic realm="ldmkit"'} if config.api_auth else {}
            return JSONResponse({"detail": "Not authenticated"}, status_code=401, headers=headers)
        return await call_next(request)

    @app.exception_handler(LdmkitError)
    async def user_error(request: Request, exc: LdmkitError):
        status = 404 if isinstance(exc, CheckpointError) and "no such file" in str(exc) else 422
        return JSONResponse({"error": type(exc).__name__, "detail": str(exc)}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def bad_fields(request: Request, exc: RequestValidationError):
        msgs = [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors()]
        return JSONResponse({"error": "RequestValidationError", "detail": "; ".join(msgs)}, status_code=422)

    # --- generation ----------------------------------------------------------------------------------
    def validate(req: GenerationRequest) -> None:
        lim = config.limits
        refuse_unsupported(req)
        for name in ("width", "height"):
            v = getattr(req, name)
            if v <= 0 or v % 8:
                raise RequestError(f"{name}: {v}; allowed: a positive multiple of 8")
        if req.width * req.height > lim.max_pixels:
            raise RequestError(f"width x height: {req.width}x{req.height}; allowed: at most {lim.max_pixels} pixels")
        if not 1 <= req.steps <= lim.max_steps:
            raise RequestError(f"steps: {req.steps}; allowed: 1 to {lim.max_steps}")
        if req.batch_size < 1 or req.n_iter < 1 or req.batch_size * req.n_iter > lim.max_images:
            raise RequestError(
                f"batch_size x n_iter: {req.batch_size}x{req.n_iter}; allowed: 1 to {lim.max_images} images"
            )
        for name in ("prompt", "negative_prompt"):
            if len(getattr(req, name)) > lim.max_prompt_chars:
                raise RequestError(f"{name}: {len(getattr(req, name))} characters; allowed: {lim.max_prompt_chars}")

    def sampler_of(req: GenerationRequest) -> str | None:
        name = req.sampler_name or req.sampler_index
        return from_webui(name, req.scheduler) if name else None

    def control_inputs(req: GenerationRequest, pipe) -> list:
        from ldmkit.pipelines.control import ControlInput

        found = [v for k, v in (req.alwayson_scripts or {}).items() if k.lower() == "controlnet"]
        units = found[0].get("args", []) if found and isinstance(found[0], dict) else []
        out = []
        for i, u in enumerate(units):
            if not isinstance(u, dict) or not u.get("enabled", True):
                continue
            where = f"alwayson_scripts.ControlNet.args[{i}]"
            image = u.get("image") or u.get("input_image")
            if isinstance(image, dict):
                image = image.get("image")
            if not image:
                raise RequestError(f"{where}: no image")
            module = str(u.get("module", "none"))
            module = {"invert (from white bg & black line)": "scribble", "depth": "depth"}.get(module, module)
            mode = u.get("control_mode", 0)
            if mode in (1, "My prompt is more important"):
                raise RequestError(f"{where}.control_mode: 'My prompt is more important' is not supported")
            resize = u.get("resize_mode", 1)
            img = decode_image(image, f"{where}.image")
            same_aspect = img.width * req.height == img.height * req.width
            if resize not in (0, "Just Resize") and not same_aspect:
                raise RequestError(f"{where}.resize_mode: only 'Just Resize' for images of another aspect ratio")
            net = models.controlnet(str(u.get("model", "")), pipe.model.unet.config)
            out.append(
                ControlInput(
                    net,
                    img,
                    module,
                    float(u.get("weight", 1.0)),
                    float(u.get("guidance_start", 0.0)),
                    float(u.get("guidance_end", 1.0)),
                    mode in (2, "ControlNet is more important"),
                    name=str(u.get("model")),
                )
            )
        return out

    def generate(req: GenerationRequest, kind: str) -> dict:
        from ldmkit.pipelines import Interrupted

        validate(req)
        sampler = sampler_of(req)
        init = mask = None
        if isinstance(req, Img2ImgRequest):
            if not req.init_images:
                raise RequestError("init_images: give one base64 image")
            init = decode_image(req.init_images[0], "init_images[0]")
            if req.mask:
                mask = decode_image(req.mask, "mask")
                if req.inpainting_mask_invert:
                    from PIL import ImageOps

                    mask = ImageOps.invert(mask.convert("L"))
        overrides = req.override_settings or {}
        wanted = overrides.get("sd_model_checkpoint") or options["sd_model_checkpoint"]
        name = models.find(wanted)
        clip_skip = int(overrides.get("CLIP_stop_at_last_layers", options["CLIP_stop_at_last_layers"]))
        seed = req.seed if req.seed >= 0 else secrets.randbelow(2**32)

        def run(w: Worker):
            with model_lock:
                pipe = models.load(name)
            control = control_inputs(req, pipe)
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
                result = pipe(
                    req.prompt,
                    negative_prompt=req.negative_prompt,
                    steps=req.steps,
                    cfg=req.cfg_scale,
                    sampler=sampler,
                    seed=seed + i * req.batch_size,
                    width=req.width,
                    height=req.height,
                    batch=req.batch_size,
                    init_image=init,
                    mask=mask,
                    strength=req.denoising_strength if req.denoising_strength is not None else 0.75,
                    mask_blur=float(getattr(req, "mask_blur", 4)),
                    clip_skip=clip_skip if clip_skip > 1 else None,
                    eta=req.eta if req.eta is not None else 0.0,
                    callback=on_step,
                    control=control or None,
                )
                results.append(result)
                w.progress.job_no = i + 1
            return pipe, results, w.progress.interrupted

        job = worker.submit(kind, run, req.force_task_id)
        pipe, results, interrupted = job.future.result()
        images, seeds, infotexts = [], [], []
        for r in results:
            images += r.images
            seeds += r.seeds
            infotexts += r.infotexts
        if not req.do_not_save_samples or req.save_images:
            for image, s, text in zip(images, seeds, infotexts):
                outputs.save(kind, image, s, text)
        spec = SAMPLERS[results[0].params.sampler] if results else None
        title = (spec.webui_name + (" Karras" if spec.webui_schedule == "Karras" else "")) if spec else ""
        strength = results[0].params.strength if results else None
        info = info_json(
            req,
            seeds=seeds,
            infotexts=infotexts,
            sampler_title=title,
            model_name=name,
            model_hash=(models.short_hash(name) or "")[:10],
            clip_skip=clip_skip,
            strength=strength,
            version=f"ldmkit {__version__}",
        )
        return {
            "images": [encode_png(im, t) for im, t in zip(images, infotexts)] if req.send_images else [],
            "parameters": req.model_dump(),
            "info": info,
            **({"interrupted": True} if interrupted else {}),
        }

    @app.post("/sdapi/v1/txt2img")
    def txt2img(req: Txt2ImgRequest) -> dict:
        return generate(req, "txt2img")

    @app.post("/sdapi/v1/img2img")
    def img2img(req: Img2ImgRequest) -> dict:
        return generate(req, "img2img")

    # --- state ---------------------------------------------------------------------------------------
    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False, id_task: str | None = None) -> dict:
        p = worker.progress
        running = worker.current is not None
        elapsed = time.time() - p.started if running else 0.0
        frac = p.fraction if running else 0.0
        image = None
        if running and not skip_current_image and p.step_info is not None:
            image = encode_png(p.step_info.preview()[0])
        out = {
            "progress": frac,
            "eta_relative": (elapsed / frac - elapsed) if frac > 0 else 0.0,
            "state": {
                "skipped": False,
                "interrupted": p.interrupted,
                "job": p.job if running else "",
                "job_count": p.job_count if running else 0,
                "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(p.started or time.time())),
                "job_no": p.job_no,
                "sampling_step": p.sampling_step,
                "sampling_steps": p.sampling_steps,
            },
            "current_image": image,
            "textinfo": None,
            "queue_pending": worker.pending,
        }
        if id_task is not None:
            out["queue_position"] = worker.position(id_task)
        return out

    @app.post("/sdapi/v1/interrupt")
    def interrupt() -> dict:
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    def skip() -> dict:
        worker.interrupt()  # one image per job at most in flight: skipping it is interrupting it
        return {}

    @app.get("/sdapi/v1/options")
    def get_options() -> dict:
        return dict(options)

    @app.post("/sdapi/v1/options")
    def set_options(update: dict[str, Any]) -> dict:
        for key, value in update.items():
            if key == "sd_model_checkpoint":
                name = models.find(str(value))

                def switch(w: Worker, name=name):
                    with model_lock:
                        models.load(name)

                worker.submit("load model", switch).future.result()
                options[key] = models.title(name)
            elif key == "CLIP_stop_at_last_layers":
                if not isinstance(value, int) or not 1 <= value <= 12:
                    raise RequestError(f"CLIP_stop_at_last_layers: {value!r}; allowed: 1 to 12")
                options[key] = value
            else:
                options[key] = value  # kept and echoed; nothing of ours reads it
        return {}

    @app.get("/sdapi/v1/sd-models")
    def sd_models() -> list[dict]:
        return [
            {
                "title": models.title(n),
                "model_name": n,
                "hash": (models.short_hash(n) or "")[:10] or None,
                "sha256": models.short_hash(n),
                "filename": str(models.paths[n]),
                "config": None,
            }
            for n in models.paths
        ]

    @app.get("/sdapi/v1/samplers")
    def samplers() -> list[dict]:
        out: dict[str, dict] = {}
        for s in SAMPLERS.values():
            entry = out.setdefault(s.webui_name, {"name": s.webui_name, "aliases": [], "options": {}})
            entry["aliases"].append(s.name)
        return list(out.values())

    @app.get("/sdapi/v1/schedulers")
    def schedulers() -> list[dict]:
        return [
            {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False},
            {"name": "uniform", "label": "Uniform", "aliases": None, "default_rho": -1, "need_inner_model": True},
            {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False},
        ]

    @app.post("/sdapi/v1/png-info")
    def png_info(req: PngInfoRequest) -> dict:
        from ldmkit.images import parse_infotext

        image = decode_image(req.image, "image")
        text = image.info.get("parameters", "")
        items = {k: v for k, v in image.info.items() if isinstance(v, str)}
        if not text:
            return {"info": "", "items": items, "parameters": {}}
        prompt, negative, fields = parse_infotext(text)
        return {"info": text, "items": items, "parameters": {"Prompt": prompt, "Negative prompt": negative, **fields}}

    # --- discovery routes clients call at start-up: what we have ------------------------------------
    @app.get("/sdapi/v1/scripts")
    def scripts() -> dict:
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/script-info")
    def script_info() -> list:
        return []

    @app.get("/sdapi/v1/loras")
    def loras() -> list[dict]:
        from ldmkit.models.lora import find_lora, list_loras

        return [
            {"name": n, "alias": n, "path": str(find_lora(n, config.lora_dir)), "metadata": {}}
            for n in list_loras(config.lora_dir)
        ]

    @app.get("/sdapi/v1/embeddings")
    def embeddings() -> dict:
        vectors = models.pipe.embeddings.vectors if models.pipe else {}
        loaded = {
            n: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": v.shape[1], "vectors": len(v)}
            for n, v in vectors.items()
        }
        return {"loaded": loaded, "skipped": {}}

    @app.get("/sdapi/v1/upscalers")
    def upscalers() -> list[dict]:
        return [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4}]

    for route in (
        "sd-vae",
        "hypernetworks",
        "face-restorers",
        "realesrgan-models",
        "prompt-styles",
        "latent-upscale-modes",
    ):
        app.add_api_route(f"/sdapi/v1/{route}", lambda: [], methods=["GET"])

    @app.get("/sdapi/v1/cmd-flags")
    def cmd_flags() -> dict:
        return {"api": True, "listen": False}

    @app.get("/sdapi/v1/memory")
    def memory() -> dict:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"ram": {"used": rss}, "cuda": {"error": "no CUDA device"}}

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh() -> dict:
        return {}

    @app.get("/controlnet/model_list")
    def controlnet_models() -> dict:
        return {"model_list": models.controlnet_names()}

    @app.get("/controlnet/module_list")
    def controlnet_modules() -> dict:
        from ldmkit.pipelines.control import PREPROCESSORS

        return {"module_list": list(PREPROCESSORS)}

    # --- the page ------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/ldmkit/info", include_in_schema=False)
    def ldmkit_info() -> dict:
        """What the page needs besides the web UI's API: the loaded model's own image size."""
        pipe = models.pipe
        return {"version": __version__, "image_size": pipe.model.config.image_size if pipe else None}

    def load_default(w: Worker):
        with model_lock:
            models.load(models.default)

    app.state.ready = worker.submit("load model", load_default).future  # the page's sizes come from it

    return app
