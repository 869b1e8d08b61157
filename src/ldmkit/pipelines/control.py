"""Control images for ControlNets: preprocessors that need no learned weights, and what a
generation call is given per ControlNet.

A control image of any size is first resized to the output size (stretched, as diffusers does),
then preprocessed, so that edges stay one pixel wide."""

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ldmkit.errors import ConfigError
from ldmkit.images import to_rgb
from ldmkit.models.controlnet import ControlNet


def canny(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """Canny edges, white on black (the popular UI's default thresholds)."""
    import cv2

    return Image.fromarray(cv2.Canny(np.asarray(image.convert("L")), low, high)).convert("RGB")


def scribble(image: Image.Image) -> Image.Image:
    """Dark strokes drawn on a light page -> white strokes on black, as scribble ControlNets expect."""
    return threshold(Image.fromarray(255 - np.asarray(image.convert("L"))))


def threshold(image: Image.Image, level: int = 127) -> Image.Image:
    """Pixels brighter than `level` white, the rest black."""
    return Image.fromarray(((np.asarray(image.convert("L")) > level) * 255).astype(np.uint8)).convert("RGB")


def passthrough(image: Image.Image) -> Image.Image:
    """Maps the user already has (depth, segmentation, normals, edges): used as given."""
    return to_rgb(image)


PREPROCESSORS = {
    "canny": canny,
    "scribble": scribble,
    "threshold": threshold,
    "none": passthrough,
    "depth": passthrough,
    "seg": passthrough,
    "normal": passthrough,
    "edges": passthrough,
}


def preprocess(kind: str, image: Image.Image, width: int, height: int) -> Image.Image:
    if kind not in PREPROCESSORS:
        raise ConfigError(f"control type {kind!r}; allowed: {', '.join(PREPROCESSORS)}")
    image = to_rgb(image)
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return PREPROCESSORS[kind](image)


@dataclass
class ControlInput:
    """One ControlNet for a generation call."""

    net: ControlNet
    image: Image.Image
    kind: str = "none"  # a PREPROCESSORS name
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False
    name: str = "controlnet"

    def check(self) -> None:
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ConfigError(f"control start {self.start}, end {self.end}; allowed: 0 <= start < end <= 1")
        if not -10.0 <= self.strength <= 10.0:
            raise ConfigError(f"control strength {self.strength}; allowed: -10 to 10")
        if self.kind not in PREPROCESSORS:
            raise ConfigError(f"control type {self.kind!r}; allowed: {', '.join(PREPROCESSORS)}")

    def hint(self, width: int, height: int) -> tuple[Image.Image, torch.Tensor]:
        """The preprocessed control image and its [1, 3, H, W] tensor in [0, 1]."""
        image = preprocess(self.kind, self.image, width, height)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        return image, x
