"""Routes on the running state: progress of the running job, interrupting it, and the options the web UI
reads and sets (the model among them)."""

import asyncio
import threading
import time
from typing import Any

from fastapi import FastAPI

from ldmkit.errors import RequestError
from ldmkit.server import decoding
from ldmkit.server.state import ServerState
from ldmkit.server.webui import encode_png
from ldmkit.server.worker import Progress, Worker

PREVIEWING = threading.Lock()  # one preview drawn at a time, however many clients poll


def current_image(p: Progress) -> str | None:
    """The running job's current image as base64 PNG, drawn by its show_progress_type (Pipeline.preview)
    on this request thread, once per step: polls within a step get the same one, and a Full preview
    (a whole autoencoder pass) is not repeated per client."""
    info = p.step_info
    if info is None:
        return None
    with PREVIEWING:
        if p.preview is None or p.preview[0] is not info:
            p.preview = (info, encode_png(info.preview(p.preview_method)[0]))
        return p.preview[1]


def progress_json(worker: Worker, skip_current_image: bool, id_task: str | None) -> dict:
    """GET /sdapi/v1/progress: the running job's state, with a preview of its current image unless skipped."""
    p = worker.progress
    running = worker.current is not None
    elapsed = time.time() - p.started if running else 0.0
    frac = p.fraction if running else 0.0
    image = current_image(p) if running and not skip_current_image else None
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


def check_option(server: ServerState, key: str, value: Any) -> None:
    """A setting POST /sdapi/v1/options may change, with a value of its type: the ones this server acts
    on, and the web UI's inert ones at their inert values. Anything else is refused, so that the
    options stay the few small values they are."""
    from ldmkit.server.webui import INERT_OVERRIDES

    if key == "sd_model_checkpoint":
        if not isinstance(value, str):
            raise RequestError(f"sd_model_checkpoint: {value!r}; expected a model title")
        server.models.find(value)
    elif key == "CLIP_stop_at_last_layers":
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 12:
            raise RequestError(f"CLIP_stop_at_last_layers: {value!r}; allowed: 1 to 12")
    elif key in decoding.CHOICES:
        decoding.check(key, value, server.config.tiny_decoder)
    elif key in INERT_OVERRIDES:
        if not isinstance(value, str | None) or value not in INERT_OVERRIDES[key]:
            allowed = ", ".join(sorted(str(v) for v in INERT_OVERRIDES[key] if v is not None))
            raise RequestError(f"{key}: {value!r}; allowed: {allowed}")
    elif key == "outdir_samples":
        if value != server.options[key]:
            raise RequestError("outdir_samples: set by `ldmkit serve --outputs` when the server starts")
    else:
        known = ", ".join(server.options)
        raise RequestError(f"options: {str(key)[:80]!r} is not a setting of this server; allowed: {known}")


async def apply_options(server: ServerState, update: dict[str, Any]) -> None:
    """POST /sdapi/v1/options: every setting checked before any is set; a new sd_model_checkpoint is
    loaded (as a job, waited for without holding a thread) before it is set."""
    for key, value in update.items():
        check_option(server, key, value)
    for key, value in update.items():
        if key == "sd_model_checkpoint":
            name = server.models.find(value)

            def switch(w: Worker, name=name) -> None:
                server.load(name)

            await asyncio.wrap_future(server.worker.submit("load model", switch).future)
            value = server.models.title(name)
        server.options[key] = value


def add_routes(app: FastAPI, server: ServerState) -> None:
    worker = server.worker

    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False, id_task: str | None = None) -> dict:
        return progress_json(worker, skip_current_image, id_task)

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
        return dict(server.options)

    @app.post("/sdapi/v1/options")
    async def set_options(update: dict[str, Any]) -> dict:
        await apply_options(server, update)
        return {}
