"""Video generation parameters: every default and check of `ldmkit generate-video` and `VideoPipeline`, once,
named after diffusers' StableVideoDiffusionPipeline arguments (frames, fps, motion bucket, noise augmentation,
a guidance scale ramped from min_cfg on the first frame to max_cfg on the last, decode chunk). What the user
leaves out is the model's (its family row's call defaults, its UNet's frame count); the parameters written
into a video file's metadata are `infotext`."""

import math
import secrets
from dataclasses import dataclass, field, replace

from PIL import Image

from ldmkit.diffusion.registry import get_sampler
from ldmkit.errors import ConfigError
from ldmkit.images import format_infotext
from ldmkit.pipelines.params import MAX_SIDE, _check_size, _is_int

MAX_FRAMES = 128  # a clip's latents, activations and decoded frames all grow with it
MAX_FPS = 120
MAX_MOTION_BUCKET = 1023
MAX_BATCH = 16
# What a call leaves out when the model's family row does not say.
VIDEO_DEFAULTS = {"steps": 25, "sampler": "euler", "min_cfg": 1.0, "max_cfg": 3.0, "fps": 7, "motion_bucket": 127}
VIDEO_DEFAULTS.update(noise_aug=0.02, cfg=5.0)


def _number(name: str, value, low: float, high: float) -> None:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not ok or not low <= value <= high:
        raise ConfigError(f"{name}: {value!r}; allowed: {low:g} to {high:g}")


@dataclass(frozen=True, kw_only=True)
class VideoParams:
    image: Image.Image | None = field(default=None, repr=False)  # the conditioning frame (image-to-video)
    prompt: str = ""  # what a text-to-video model draws
    negative_prompt: str = ""
    cfg: float | None = None  # a text-to-video model's guidance scale (the same on every frame)
    frames: int | None = None  # None: the model's own clip length
    width: int | None = None  # None: the model's default size
    height: int | None = None
    steps: int | None = None  # None here and below: the model's (its family's call defaults)
    sampler: str | None = None
    seed: int = -1  # below 0: drawn at random; clip i of a batch uses seed + i
    batch: int = 1
    fps: int | None = None  # the frame rate the model is told (SVD conditions on fps − 1) and the file plays at
    motion_bucket: int | None = None  # how much motion (SVD: 127 by default, higher moves more)
    noise_aug: float | None = None  # noise added to the conditioning frame (more: less like it)
    min_cfg: float | None = None  # guidance on the first frame, ramped linearly ...
    max_cfg: float | None = None  # ... to the last
    decode_chunk: int | None = None  # frames decoded at a time (None: the whole clip at once)

    def __post_init__(self):
        if self.image is not None and not isinstance(self.image, Image.Image):
            raise ConfigError("image: a PIL image")
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            raise ConfigError("prompt, negative_prompt: strings")
        for name in ("frames", "steps", "decode_chunk"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise ConfigError(f"{name}: {v!r}; allowed: 1 or more")
        if self.frames is not None and self.frames > MAX_FRAMES:
            raise ConfigError(f"frames: {self.frames}; allowed: 1 to {MAX_FRAMES}")
        if self.sampler is not None:
            get_sampler(self.sampler)
        if not _is_int(self.batch) or not 1 <= self.batch <= MAX_BATCH:
            raise ConfigError(f"batch: {self.batch!r}; allowed: 1 to {MAX_BATCH}")
        if self.seed is None or not _is_int(self.seed) or self.seed + self.batch > 2**64:
            raise ConfigError(
                f"seed: {self.seed!r}; allowed: an integer below {2**64 - self.batch + 1} (below 0: random)"
            )
        if self.fps is not None and (not _is_int(self.fps) or not 1 <= self.fps <= MAX_FPS):
            raise ConfigError(f"fps: {self.fps!r}; allowed: 1 to {MAX_FPS}")
        if self.motion_bucket is not None and (
            not _is_int(self.motion_bucket) or not 0 <= self.motion_bucket <= MAX_MOTION_BUCKET
        ):
            raise ConfigError(f"motion_bucket: {self.motion_bucket!r}; allowed: 0 to {MAX_MOTION_BUCKET}")
        if self.noise_aug is not None:
            _number("noise_aug", self.noise_aug, 0.0, 1.0)
        for name in ("min_cfg", "max_cfg", "cfg"):
            if getattr(self, name) is not None:
                _number(name, getattr(self, name), 0.0, 100.0)
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 1 <= v <= MAX_SIDE):
                raise ConfigError(f"{name}: {v!r}; allowed: 1 to {MAX_SIDE}")

    def for_model(self, defaults: dict, frames: int, factor: int, name: str = "model", text: bool = False):
        """Every left-out value filled from the model (`defaults`: its call defaults; `frames`: its clip
        length; `text`: it draws from a prompt, not an image), the size checked against its latent factor, a
        random seed drawn."""
        filled = {
            k: (getattr(self, k) if getattr(self, k) is not None else v)
            for k, v in {**VIDEO_DEFAULTS, **defaults}.items()
            if hasattr(self, k)
        }
        p = replace(self, **filled, frames=self.frames or frames)
        for side in ("width", "height"):
            _check_size(side, getattr(p, side), factor)
        if text and p.image is not None:
            raise ConfigError(f"{name} makes video from a prompt, not from an image")
        if not text and p.image is None:
            raise ConfigError(f"{name} makes video from an image: give an image file")
        if not text and p.prompt:
            raise ConfigError(f"{name} makes video from an image; it takes no prompt")
        seed = p.seed if p.seed >= 0 else secrets.randbelow(2**32)
        return replace(p, seed=seed, decode_chunk=min(p.decode_chunk or p.frames, p.frames))

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.batch)]

    def infotext(self, index: int, model: str, version: str) -> str:
        """The parameters as the popular web UI's infotext: a prompt model's guidance scale, an image model's
        conditioning (the entries the web UI's SVD extension writes)."""
        fields = {"Steps": self.steps, "Sampler": self.sampler, "Seed": self.seeds[index]}
        fields.update({"Size": f"{self.width}x{self.height}", "Frames": self.frames, "FPS": self.fps})
        if self.image is None:
            fields["CFG scale"] = self.cfg
        else:
            fields.update({"Motion bucket id": self.motion_bucket, "Augmentation level": self.noise_aug})
            fields.update({"Min guidance scale": self.min_cfg, "Max guidance scale": self.max_cfg})
        fields.update({"Decode chunk": self.decode_chunk, "Model": model, "Version": f"ldmkit {version}"})
        return format_infotext(self.prompt, self.negative_prompt, fields)


__all__ = ["MAX_FRAMES", "MAX_SIDE", "VideoParams", "VIDEO_DEFAULTS"]
