"""Model upscalers for the hires fix: ESRGAN-family networks (ESRGAN, Real-ESRGAN, SwinIR, SPAN, ...) kept
as files in an upscaler folder, recognised and built by the spandrel library, run as the popular web UI
runs them.

- A model's name is its file's stem, directly in the folder (`4x-UltraSharp.pth` is "4x-UltraSharp"); a
  name that would leave the folder is refused like a missing one (the rules of LoRA names).
- spandrel never opens a file (its .pth reader unpickles): safetensors are read by our reader, pickles by
  our allow-listed weights_only loader (checkpoints/files.py); spandrel gets the weights and recognises
  the architecture from their names and shapes. Only image-to-image networks of 3 channels are taken.
- Running follows the web UI (modules/images.py resize_image, modules/upscaler.py Upscaler.upscale): the
  network is applied again while the image is smaller than the destination, at most 3 times, then a
  Lanczos resize makes the exact size; each pass runs in overlapping tiles (the web UI's ESRGAN defaults:
  192 pixels, 8 of overlap), fp32 on the CPU, from an 8-bit image to an 8-bit image (truncated, as the
  web UI does). Unlike the web UI, the network sees RGB, the channel order these models are trained on
  and spandrel documents (the web UI's ESRGAN code hands them BGR)."""

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldmkit.checkpoints.files import (
    SAFETENSORS,
    TORCH_ZIP,
    file_in_folder,
    names_in_folder,
    read_tensors,
    safe_torch_load,
    sniff,
)
from ldmkit.errors import ConfigError, LdmkitError

SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")
TILE, OVERLAP = 192, 8  # input pixels
MAX_PASSES = 3
# spandrel's purposes of plain image-to-image networks; face restorers want aligned 512-pixel faces and
# inpainters a mask, so neither upscales a picture
PURPOSES = ("SR", "Restoration")
# Keys training code nests the weights under, in the order spandrel unwraps them (params_ema before params:
# Real-ESRGAN's files hold both, and the averaged weights are the ones released)
WRAPPERS = ("model_state_dict", "state_dict", "params_ema", "params-ema", "params", "model", "net")


@dataclass
class ModelUpscaler:
    name: str
    path: Path
    architecture: str  # spandrel's name for it: "ESRGAN", "RealESRGAN Compact", "SwinIR", ...
    scale: int  # output pixels per input pixel, each side
    net: Callable[[torch.Tensor], torch.Tensor] | None = None  # [1, 3, H, W] in [0, 1] -> [1, 3, sH, sW]
    tiled: bool = True  # False: the network tiles itself (spandrel's ModelTiling.INTERNAL)


# --- names ------------------------------------------------------------------------------------------


def find_upscaler(name: str, folder: str | Path | None) -> Path | None:
    """NAME's file in the upscaler folder, or None: a name leaving the folder is not told apart from a
    missing one."""
    return file_in_folder(name, folder, SUFFIXES)


def list_upscalers(folder: str | Path | None) -> list[str]:
    """The names find_upscaler accepts: files directly in the folder, not symlinks leading out of it."""
    return names_in_folder(folder, SUFFIXES)


# --- reading ----------------------------------------------------------------------------------------


def _spandrel():
    try:
        import spandrel
    except Exception as e:  # not installed, or its torchvision built for another torch (fails at import)
        raise ConfigError(
            "model upscalers need spandrel (pip install 'ldmkit[upscalers]', with the torchvision built for "
            f"your torch), which did not import ({e!s:.160})"
        ) from None
    return spandrel


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    """The weights out of the wrapper training code saves them in."""
    for key in WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not state:
        raise ConfigError(f"{path}: not a recognised upscaler (it holds no weights)")
    return state


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """The file's weights, by our safe readers only: a pickle through the weights_only allow-list."""
    if sniff(path) == SAFETENSORS:
        return read_tensors(path)[0]
    return _unwrap(safe_torch_load(path), path)


class NotRecognised(ConfigError):
    """No architecture spandrel knows has weights of these names and shapes."""


def _build(state: dict, path: Path):
    """spandrel's descriptor of the network these weights make."""
    spandrel = _spandrel()
    try:
        return spandrel.MAIN_REGISTRY.load(state)
    except spandrel.UnsupportedModelError:
        raise NotRecognised(
            f"{path}: not a recognised upscaler (no architecture spandrel knows has these weights)"
        ) from None
    except Exception as e:  # weights that look like an architecture but do not fit it, in any way
        raise ConfigError(f"{path}: not a recognised upscaler ({type(e).__name__}: {str(e)[:120]})") from None


def _check(net, path: Path) -> None:
    """An image upscaler: a plain image-to-image network of RGB images at scale 1 or more."""
    if not isinstance(net, _spandrel().ImageModelDescriptor) or net.purpose not in PURPOSES:
        raise ConfigError(f"{path}: not an image upscaler ({net.architecture.name}, made for {net.purpose})")
    if net.scale < 1 or (net.input_channels, net.output_channels) != (3, 3):
        raise ConfigError(
            f"{path}: not an image upscaler ({net.architecture.name}: {net.input_channels} to"
            f" {net.output_channels} channels at scale {net.scale}; an upscaler takes and makes RGB images)"
        )


def read_upscaler(path: str | Path) -> ModelUpscaler:
    """A model upscaler file, recognised and ready to run (fp32, eval mode)."""
    path = Path(path)
    net = _build(_read_state(path), path)
    _check(net, path)
    net.to(torch.float32).eval()
    net.model.requires_grad_(False)
    internal = net.tiling.name == "INTERNAL"
    return ModelUpscaler(path.stem, path, net.architecture.name, net.scale, net, tiled=not internal)


def describe(path: str | Path) -> ModelUpscaler:
    """A file's architecture and scale (no network to run), for listings, reading as little as it can:
    a safetensors file's header, a PyTorch zip file mapped; the network is built on the meta device."""
    path = Path(path)
    _spandrel()  # without it nothing can be recognised: said before any file is read
    try:
        stat = path.stat()
    except OSError:
        raise ConfigError(f"{path}: not a recognised upscaler (unreadable)") from None
    found = _describe(path, stat.st_mtime_ns, stat.st_size)
    if isinstance(found, str):
        raise ConfigError(found)
    return found


@functools.lru_cache(maxsize=256)  # a listing asked again reads nothing while the files are unchanged
def _describe(path: Path, mtime_ns: int, size: int) -> ModelUpscaler | str:
    from ldmkit.checkpoints.catalog import _mapped_torch_file, _safetensors_shapes

    try:
        fmt = sniff(path)
        if fmt == SAFETENSORS:
            state = _safetensors_shapes(path)[0]
        else:
            state = _unwrap(_mapped_torch_file(path) if fmt == TORCH_ZIP else safe_torch_load(path), path)
        try:
            with torch.device("meta"):  # shapes only: no weight is read or copied
                net = _build({k: v.to("meta") for k, v in state.items()}, path)
        except NotRecognised:
            raise
        except ConfigError:  # an architecture computing with tensors as it is built: the meta device cannot
            net = _build(_read_state(path) if fmt == SAFETENSORS else state, path)
        _check(net, path)
    except LdmkitError as e:
        return str(e) if str(e).startswith(str(path)) else f"{path}: {e}"
    return ModelUpscaler(path.stem, path, net.architecture.name, net.scale)


class UpscalerCache:
    """The last model upscaler read, kept while its file is unchanged: a server's requests and a run's
    batches use one model over and over; a file replaced on disk is read again."""

    def __init__(self):
        self._key: tuple | None = None
        self._model: ModelUpscaler | None = None

    def get(self, path: str | Path) -> ModelUpscaler:
        path = Path(path)
        try:
            stat = path.stat()
        except OSError:
            raise ConfigError(f"{path}: not a recognised upscaler (unreadable)") from None
        key = (path.resolve(), stat.st_mtime_ns, stat.st_size)
        if key != self._key:
            self._key, self._model = None, None  # the old network freed before the new one is read
            self._model = read_upscaler(path)
            self._key = key
        return self._model


# --- running ----------------------------------------------------------------------------------------


def upscale(
    image: Image.Image, width: int, height: int, model: ModelUpscaler, tile: int = TILE, overlap: int = OVERLAP
) -> Image.Image:
    """`image` made width x height with `model`, as the web UI's resize_image does with an upscaler."""
    scale = max(width / image.width, height / image.height)
    if scale > 1.0:
        dest = (int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8))  # Upscaler.upscale
        for _ in range(MAX_PASSES):
            before = image.size
            image = run(model, image, tile, overlap)
            if image.size == before or (image.width >= dest[0] and image.height >= dest[1]):
                break
        if image.size != dest:
            image = image.resize(dest, Image.LANCZOS)
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    return image


def run(model: ModelUpscaler, image: Image.Image, tile: int = TILE, overlap: int = OVERLAP) -> Image.Image:
    """One pass of the network over an 8-bit image, in tiles of `tile` input pixels (0: whole)."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        y = tiled(model.net, x, model.scale, tile if model.tiled else 0, overlap)
    return Image.fromarray((255.0 * y[0].clamp(0, 1)).permute(1, 2, 0).numpy().astype(np.uint8))


def tiled(net, x: torch.Tensor, scale: int, tile: int, overlap: int) -> torch.Tensor:
    """net(x) computed tile by tile: tiles of `tile` pixels overlapping by at least `overlap`, each
    weighted down linearly across the overlaps it shares, so seams fade instead of showing. A network sees
    only its tile, so the result differs from the whole image's near the seams, by as much as the
    network's reach past `overlap` allows."""
    _, c, h, w = x.shape
    if tile <= 0 or (h <= tile and w <= tile):
        return net(x)
    if not 0 <= overlap < tile:
        raise ConfigError(f"upscaler tile overlap {overlap}; allowed: 0 to {tile - 1}")
    out = x.new_zeros(1, c, h * scale, w * scale)
    total = x.new_zeros(1, 1, h * scale, w * scale)
    th, tw = min(tile, h), min(tile, w)
    for top in _starts(h, tile, overlap):
        rows = _ramp(th * scale, overlap * scale, top > 0, top + th < h)
        for left in _starts(w, tile, overlap):
            cols = _ramp(tw * scale, overlap * scale, left > 0, left + tw < w)
            y = net(x[..., top : top + th, left : left + tw])
            weight = rows[:, None] * cols[None, :]
            where = (..., slice(top * scale, (top + th) * scale), slice(left * scale, (left + tw) * scale))
            out[where] += y * weight
            total[where] += weight
    return out / total


def _starts(n: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets along a side of n pixels: a stride of tile - overlap, the last tile flush with the end."""
    if n <= tile:
        return [0]
    return [*range(0, n - tile, tile - overlap), n - tile]


def _ramp(n: int, width: int, lead: bool, trail: bool) -> torch.Tensor:
    """A tile's weights along one side: 1, falling linearly to near 0 over `width` pixels at each end that
    another tile overlaps (never 0, so every pixel keeps a weight)."""
    ramp = torch.ones(n)
    edge = torch.arange(1, min(width, n) + 1, dtype=torch.float32) / (width + 1)
    if lead:
        ramp[: len(edge)] *= edge
    if trail:
        ramp[n - len(edge) :] *= edge.flip(0)
    return ramp
