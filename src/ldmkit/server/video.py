"""Video over HTTP: `POST /ldmkit/v1/video` (the web UI's API has no video route; the page uses this one). The
video models `ldmkit serve --video-model PATH` offers by name, the one loaded (one at a time), and the request:
an image (base64) for image-to-video or a prompt for text-to-video, every parameter of VideoParams under
diffusers' names, bounded by the server's limits. Answered with the clip as base64 in the asked format and
its parameters; the clip is also saved under outputs/video/."""

import asyncio
import base64
import threading
from datetime import date
from pathlib import Path

from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict

from ldmkit.errors import NotFoundError, RequestError

FORMATS = ("webp", "gif", "png", "mp4")


class VideoRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field must not be silently ignored

    model: str | None = None  # a --video-model's name; None: the first
    image: str | None = None  # base64: image-to-video
    prompt: str = ""  # text-to-video
    negative_prompt: str = ""
    num_frames: int | None = None
    fps: int | None = None
    motion_bucket_id: int | None = None
    noise_aug_strength: float | None = None
    min_guidance_scale: float | None = None
    max_guidance_scale: float | None = None
    cfg_scale: float | None = None
    steps: int | None = None
    sampler_name: str | None = None
    seed: int = -1
    width: int | None = None
    height: int | None = None
    decode_chunk_size: int | None = None
    format: str = "webp"


class VideoModels:
    def __init__(self, paths: list[str]):
        self.paths = {Path(p).stem if Path(p).is_file() else Path(p).name: Path(p) for p in paths}
        self.pipe, self.loaded = None, None
        self.lock = threading.Lock()
        self.count = 0

    def names(self) -> list[str]:
        return list(self.paths)

    def find(self, name: str | None) -> str:
        if not self.paths:
            raise NotFoundError("this server offers no video models (ldmkit serve --video-model PATH)")
        if name is None:
            return next(iter(self.paths))
        if name not in self.paths:
            raise NotFoundError(f"video model {name!r}: not offered; offered: {', '.join(self.paths)}")
        return name

    def pipeline(self, name: str):
        from ldmkit.pipelines.video import VideoPipeline

        if self.loaded != name:
            self.pipe, self.loaded = None, None  # the old one freed before the new one is read
            self.pipe, self.loaded = VideoPipeline.load(self.paths[name]), name
        return self.pipe


def params_of(req: VideoRequest, limits):
    """VideoParams from a request, within the server's limits (checked before any model is read)."""
    from ldmkit.pipelines.video_params import VideoParams
    from ldmkit.server.webui import decode_image

    if req.format not in FORMATS:
        raise RequestError(f"format {req.format!r}; allowed: {', '.join(FORMATS)}")
    if len(req.prompt) + len(req.negative_prompt) > limits.max_prompt_chars:
        raise RequestError(f"prompt: longer than {limits.max_prompt_chars} characters")
    if req.steps is not None and req.steps > limits.max_steps:
        raise RequestError(f"steps: {req.steps}; allowed: at most {limits.max_steps}")
    if req.num_frames is not None and req.num_frames > limits.max_frames:
        raise RequestError(f"num_frames: {req.num_frames}; allowed: at most {limits.max_frames}")
    if (req.width or 0) * (req.height or 0) > limits.max_pixels:
        raise RequestError(f"width x height: {req.width}x{req.height}; allowed: at most {limits.max_pixels} pixels")
    image = None if req.image is None else decode_image(req.image, "image", limits.max_input_pixels)
    return VideoParams(
        image=image,
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        frames=req.num_frames,
        fps=req.fps,
        motion_bucket=req.motion_bucket_id,
        noise_aug=req.noise_aug_strength,
        min_cfg=req.min_guidance_scale,
        max_cfg=req.max_guidance_scale,
        cfg=req.cfg_scale,
        steps=req.steps,
        sampler=req.sampler_name,
        seed=req.seed,
        width=req.width,
        height=req.height,
        decode_chunk=req.decode_chunk_size,
    )


def _run(server, videos: VideoModels, name: str, p, fmt: str, worker) -> dict:
    from ldmkit.videos import write_video

    pipe = videos.pipeline(name)
    limits = server.config.limits
    if p.width is None or p.height is None:  # the model's size, still within the limit
        w, h = p.width or pipe.defaults["width"], p.height or pipe.defaults["height"]
        if w * h > limits.max_pixels:
            raise RequestError(f"the model's size {w}x{h} exceeds the server's {limits.max_pixels} pixels")

    def progress(step, steps):
        worker.progress.sampling_step, worker.progress.sampling_steps = step + 1, steps

    result = pipe(p, callback=progress)
    with videos.lock:
        videos.count += 1
        n = videos.count
    path = Path(server.outputs.root) / "video" / date.today().isoformat() / f"{n:05d}-{result.params.seed}.{fmt}"
    write_video(path, result.videos[0], result.params.fps, result.infotexts[0])
    return {
        "video": base64.b64encode(path.read_bytes()).decode(),
        "format": fmt,
        "parameters": result.infotexts[0],
        "seed": result.params.seed,
        "frames": result.params.frames,
        "fps": result.params.fps,
    }


async def make_video(server, videos: VideoModels, req: VideoRequest) -> dict:
    params = await run_in_threadpool(params_of, req, server.config.limits)  # checked first, model or none
    name = videos.find(req.model)
    job = server.worker.submit("video", lambda w: _run(server, videos, name, params, req.format, w))
    return await asyncio.wrap_future(job.future)
