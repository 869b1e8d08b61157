"""Images in and out: PIL <-> tensors, masks, cheap latent previews, compositing."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, UnidentifiedImageError

from ldmkit.errors import ConfigError

# A linear map from SD 1.x/2.x latents to RGB, for previews without running the decoder (the
# coefficients the popular UIs use for their "approximate" preview).
SD_LATENT_RGB = torch.tensor(
    [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]]
)


def load_image(path: str | Path, what: str = "image") -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ConfigError(f"{what} {path}: not a readable image ({str(e).splitlines()[0][:100]})") from None


def to_rgb(im: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """RGB, with transparency composited onto a plain background (a naive convert leaves fringes)."""
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        canvas = Image.new("RGBA", im.size, background + (255,))
        return Image.alpha_composite(canvas, im).convert("RGB")
    return im.convert("RGB")


def pil_to_tensor(im: Image.Image, width: int, height: int) -> torch.Tensor:
    """[1, 3, H, W] in [-1, 1]."""
    im = to_rgb(im)
    if im.size != (width, height):
        im = im.resize((width, height), Image.LANCZOS)
    arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None] * 2 - 1


def tensor_to_pil(x: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> 8-bit images, rounded as diffusers rounds them."""
    arr = (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]


def mask_to_tensor(mask: Image.Image, width: int, height: int, blur: float) -> torch.Tensor:
    """[1, 1, H, W] in [0, 1]: 1 where the image is repainted. Blurred so the seam is soft."""
    m = mask.convert("L")
    if m.size != (width, height):
        m = m.resize((width, height), Image.LANCZOS)
    if blur > 0:
        m = m.filter(ImageFilter.GaussianBlur(blur))
    return torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0)[None, None]


def latent_preview(x0: torch.Tensor, latent_rgb=None) -> list[Image.Image]:
    """Cheap preview: a linear map from latents to RGB at latent resolution (SD's, or a model's own
    fitted map: one row per channel, then a bias row)."""
    if latent_rgb is None:
        weight, bias = SD_LATENT_RGB, torch.zeros(3)
    else:
        table = torch.tensor(latent_rgb, dtype=torch.float32)
        weight, bias = table[:-1], table[-1]
    rgb = torch.einsum("bchw,cr->brhw", x0.float().cpu(), weight) + bias[None, :, None, None]
    return tensor_to_pil(rgb.clamp(-1, 1))
