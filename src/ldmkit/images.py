"""Images in and out: files, PIL <-> tensors, masks, cheap latent previews, and PNGs with the popular
web UI's generation parameters text ("infotext") in their `parameters` chunk. Infotext format:

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x512, ..."""

import json
import math
import re
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageFilter, PngImagePlugin, UnidentifiedImageError

from ldmkit.checkpoints.files import atomic_write
from ldmkit.errors import ConfigError

# A linear map from SD 1.x/2.x latents to RGB, for previews without running the decoder (the
# coefficients the popular UIs use for their "approximate" preview).
SD_LATENT_RGB = torch.tensor(
    [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]]
)


# A small file can declare a huge image (a decompression bomb: a 657 KB PNG of 13000² pixels decodes to
# 676 MB). Sizes are read from the header and refused before anything is decoded.
MAX_PIXELS = 8192 * 8192


def open_image(source: str | Path | BinaryIO, what: str = "image", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A decoded image from a file or a binary stream, or one ConfigError line naming `what`: not
    readable, or declaring more than `max_pixels` pixels (refused before decoding)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                if im.width * im.height > max_pixels:
                    raise ConfigError(f"{what}: {im.width}x{im.height} pixels; allowed: at most {max_pixels} pixels")
                im.load()
                return im.copy()
    except FileNotFoundError:
        raise ConfigError(f"{what}: no such file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own guard, before ours, for sizes far beyond any limit ldmkit sets
        raise ConfigError(f"{what}: declares more than {max_pixels} pixels; allowed: at most {max_pixels}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise ConfigError(f"{what}: not a readable image ({str(e).splitlines()[0][:100]})") from None


def load_image(path: str | Path, what: str = "image", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An image file, read by open_image; messages name the option and the path."""
    return open_image(path, f"{what} {path}", max_pixels)


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


def image_grid(images: list, rows: int | None = None) -> Image.Image:
    """One image of several, as the web UI lays out its grids: `rows` rows (by default sqrt(n) rounded,
    the web UI's rule with its default settings), as many columns as the images need, filled left to
    right then down; cells the size of the largest image, smaller ones centred, empty cells white (the
    web UI's default background). `images` may instead be a list of rows, laid out as given (training's
    sample sheets: one row per seed or per kind of picture)."""
    if not images or (rows is not None and rows < 1):
        raise ValueError(f"image_grid: {len(images)} images in {rows} rows")
    if isinstance(images[0], (list, tuple)):
        table = [list(row) for row in images]
        rows = len(table)
    else:
        rows = min(rows or round(math.sqrt(len(images))), len(images))
        cols = math.ceil(len(images) / rows)
        table = [list(images[i : i + cols]) for i in range(0, len(images), cols)]
    w = max(im.width for row in table for im in row)
    h = max(im.height for row in table for im in row)
    grid = Image.new("RGB", (w * max(len(row) for row in table), h * rows), "white")
    for i, row in enumerate(table):
        for j, im in enumerate(row):
            grid.paste(to_rgb(im), (j * w + (w - im.width) // 2, i * h + (h - im.height) // 2))
    return grid


_FIELD = re.compile(r'\s*([\w \-/().+]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def format_infotext(prompt: str, negative: str, fields: dict) -> str:
    def value(v):
        text = f"{v:g}" if isinstance(v, float) else str(v)  # "CFG scale: 7", as the web UI writes
        # the web UI's quote(): JSON string syntax, so commas, colons and newlines survive the one line
        return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text

    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{k}: {value(v)}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def parse_infotext(text: str) -> tuple[str, str, dict]:
    """(prompt, negative prompt, fields) from an infotext (the web UI's or ours)."""
    lines = text.strip().split("\n")
    last = lines[-1] if lines else ""
    fields = {}
    if len(_FIELD.findall(last)) >= 3:
        fields = {k.strip(): _unquote(v) if v.startswith('"') else v.strip() for k, v in _FIELD.findall(last)}
        lines = lines[:-1]
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt).strip(), "\n".join(negative).strip(), fields


def _unquote(v: str) -> str:
    try:
        text = json.loads(v)
    except ValueError:  # not JSON (an older writer's quoting): only its quotes were escaped
        return v[1:-1].replace('\\"', '"')
    return text if isinstance(text, str) else v


def write_png(path: str | Path, image: Image.Image, parameters: str) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_png_parameters(path: str | Path) -> str:
    im = load_image(path, "PNG")
    text = im.info.get("parameters")
    if not text:
        raise ConfigError(f"{path}: has no 'parameters' text chunk (not written by ldmkit or the web UI)")
    return text
