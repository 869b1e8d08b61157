"""`ldmkit serve`: the popular web UI's HTTP API and a web page, over one global worker.

Every generation is a job on the worker (server/worker.py), run in arrival order. A request thread
validates, submits and waits; errors a user can cause come back as 4xx with one message.

This module assembles the app: its configuration, credentials, how errors are answered, the routes
(server/routes/), which share one ServerState (server/state.py), and its console lines (server/console.py)."""

import base64
import binascii
import logging
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware

from ldmkit import __version__
from ldmkit.errors import BusyError, CheckpointError, LdmkitError, NotFoundError
from ldmkit.pipelines.allocator import release_freed
from ldmkit.server.console import RequestLog, announce_models, announce_ready, note_generation
from ldmkit.server.decoding import DEFAULTS as DECODING_DEFAULTS
from ldmkit.server.errors import RETRY_AFTER, DeclaredBodyLimit, body_limit_detail, document_errors, error_body
from ldmkit.server.outputs import Outputs
from ldmkit.server.registry import Models
from ldmkit.server.routes import discovery, generation, page, status, video
from ldmkit.server.state import ServerState
from ldmkit.server.video import VideoModels
from ldmkit.server.worker import Worker

log = logging.getLogger("ldmkit.server")


@dataclass
class Limits:
    """What one request may ask for: every resource it can make the server spend is bounded here."""

    max_pixels: int = 1024 * 1024  # width x height of the images made
    max_steps: int = 150
    max_images: int = 16  # batch_size x n_iter
    max_prompt_chars: int = 4000
    # width x height an uploaded image may declare (read from its header before decoding); 4 MP takes
    # photos up to 2560x1600 while one decoded upload stays under 16 MB
    max_input_pixels: int = 4 * 1024 * 1024
    max_prompt_chunks: int = 8  # 75-token chunks (the web UI's, BREAK starts one): each lengthens every step
    max_queue: int = 32  # jobs waiting for the worker; beyond, 503 with Retry-After
    max_body_bytes: int = 32 * 2**20  # a request body (base64 images included)
    max_frames: int = 32  # a video's frames (each costs a frame's worth of every activation)


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
    upscaler_dir: str | None = None  # the hires fix's model upscalers (ESRGAN...), named by hr_upscaler
    tiny_decoder: str | None = None  # a TAESD decoder file or a folder of them: previews and decodes (decoding.py)
    backend: str = "torch"  # what runs each model's backbone: torch or openvino (models/backends.py)
    ip_adapters: list[str] = field(default_factory=list)  # IP-Adapter files offered by name (image_prompts.py)
    image_encoders: list[str] = field(default_factory=list)  # the CLIP vision towers they read
    video_models: list[str] = field(default_factory=list)  # video models offered by name (server/video.py)


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


def _answer_errors(app: FastAPI, config: ServeConfig) -> None:
    """Credentials first; errors a user can cause as 4xx with one message (422 unless said otherwise)."""

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if (config.api_key or config.api_auth) and not _check_auth(config, request):
            headers = {"WWW-Authenticate": 'Basic realm="ldmkit"'} if config.api_auth else {}
            return JSONResponse(error_body("NotAuthenticated", "Not authenticated"), status_code=401, headers=headers)
        return await call_next(request)

    @app.exception_handler(LdmkitError)
    async def user_error(request: Request, exc: LdmkitError):
        missing = isinstance(exc, NotFoundError) or (isinstance(exc, CheckpointError) and "no such file" in str(exc))
        status, headers = (404 if missing else 422), {}
        if isinstance(exc, BusyError):
            status, headers = 503, {"Retry-After": str(RETRY_AFTER)}
        detail = " ".join(str(exc).split())  # one line, whatever names a client sent
        return JSONResponse({"error": type(exc).__name__, "detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        kind = {413: "RequestTooLarge", 404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "HTTPError")
        detail = str(exc.detail)
        if exc.status_code == 413:
            detail = body_limit_detail(config.limits.max_body_bytes)
        return JSONResponse(error_body(kind, detail), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_fields(request: Request, exc: RequestValidationError):
        msgs = [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors()]
        return JSONResponse({"error": "RequestValidationError", "detail": "; ".join(msgs)}, status_code=422)


def create_app(config: ServeConfig) -> FastAPI:
    models = Models(config)  # first: what it refuses (a missing --tiny-decoder) leaves no worker thread behind
    worker = Worker(config.limits.max_queue, on_idle=release_freed)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await announce_ready(app.state.ready)
        yield
        worker.stop()
        log.info("stopped")

    app = FastAPI(
        title="ldmkit",
        version=__version__,
        description="The popular web UI's API, served by ldmkit.",
        lifespan=lifespan,
        dependencies=[Depends(note_generation)],  # a generation's size, steps and images for its log line
    )
    announce_models(models)
    outputs = Outputs(config.outputs)
    options: dict[str, Any] = {
        "sd_model_checkpoint": models.title(models.default),
        "CLIP_stop_at_last_layers": 1,
        "sd_vae": "Automatic",
        **DECODING_DEFAULTS,  # show_progress_type, sd_vae_decode_method
        "sd_vae_encode_method": "Full",
        "samples_format": "png",
        "outdir_samples": str(outputs.root),
    }
    server = ServerState(config, worker, models, outputs, options, videos=VideoModels(config.video_models))
    app.state.config = config
    app.state.worker = worker
    app.state.models = models
    app.state.outputs = outputs
    app.state.options = options

    _answer_errors(app, config)
    for routes in (generation, status, discovery, page, video):
        routes.add_routes(app, server)
    document_errors(app)
    # A body is refused by its declared length before it is read (DeclaredBodyLimit, outermost), or as
    # soon as the bytes that arrive pass the limit (Starlette's, answered in the error shape).
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=config.limits.max_body_bytes)
    app.add_middleware(DeclaredBodyLimit, limit=config.limits.max_body_bytes)
    app.add_middleware(RequestLog)  # outermost: the refusals above are logged too

    def load_default(w: Worker) -> None:  # None: a future holding the pipeline would keep it alive
        start = time.perf_counter()
        server.load(models.default)
        log.debug("model %s loaded in %.2f s", models.default, time.perf_counter() - start)

    app.state.ready = worker.submit("load model", load_default).future  # the page's sizes come from it
    return app
