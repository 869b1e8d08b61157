"""Models shipped inside the package, trained by our own recipes (recipes/), so that a fresh install
generates with no download. Each entry names its weights file, its recipe and the settings chosen for it
(docs/models.md)."""

import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ldmkit.errors import LdmkitError

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Bundled:
    file: str
    recipe: str
    defaults: dict = field(default_factory=dict)  # sampler, steps, cfg: what `generate` uses unless told
    controlnet: str | None = None  # its bundled ControlNet's file, used when no --controlnet is given
    world: str | None = None  # the closed world whose captions it learned ("shapes"), for its vocabulary
    tiny_decoder: str | None = None  # its bundled tiny autoencoder (TAESD), used by --decoder tiny
    # a bundled file whose autoencoder and text tower this one's UNet was trained with, frozen: the file
    # holds only its UNet and takes the rest from there, so the package does not carry them twice
    shares: str | None = None


BUNDLED = {
    # the shapes world at f = 2 with a text tower that hears a relation's two wordings as one (docs/models.md)
    "shapes": Bundled(
        "shapes.safetensors",
        "recipes/shapes.sh",
        {"sampler": "euler_a", "steps": 20, "cfg": 3.0},
        controlnet="shapes-canny.safetensors",
        world="shapes",
        tiny_decoder="shapes-tiny.safetensors",
    ),
    # shapes' latent consistency distillation (configs/shapes-f2-lcm.yaml): lcm, 4 steps, one UNet call each
    "shapes-fast": Bundled(
        "shapes-fast.safetensors",
        "recipes/shapes.sh",
        {"sampler": "lcm", "steps": 4, "cfg": 2.0},
        world="shapes",
        shares="shapes.safetensors",
        tiny_decoder="shapes-tiny.safetensors",  # the same autoencoder as shapes'
    ),
    # 64x64 emoji from words (Noto and Twemoji art; NOTICE-emoji.txt), trained by recipes/emoji.sh
    "emoji": Bundled("emoji.safetensors", "recipes/emoji.sh", {"sampler": "dpmpp_2m_karras", "steps": 20, "cfg": 3.0}),
}
# --fast: a bundled model's few-step version
FAST: dict[str, str] = {"shapes": "shapes-fast"}
DEFAULT = "shapes"


def bundled_entry(path: Path) -> Bundled | None:
    """The bundled model whose weights `path` is, or None."""
    return next((e for e in BUNDLED.values() if Path(path) == HERE / e.file), None)


def shared_file(path: Path) -> Path | None:
    """The bundled file holding the parts (all but the UNet) that the bundled file `path` shares, or None."""
    entry = bundled_entry(path)
    return None if entry is None or entry.shares is None else HERE / entry.shares


PREFIX = "bundled:"  # `bundled:emoji` always means the bundled model, whatever the current folder holds
log = logging.getLogger(__name__)


def resolve(model: str | Path | None) -> tuple[Path, dict]:
    """The file to load and its recommended settings: a bundled model by name (the default one when
    `model` is None, or `bundled:NAME`), otherwise the user's own path, which no bundled name shadows:
    a bare name that is both an existing path and a bundled model is the path, with a warning saying
    how to pick the other. A bare name that is neither is refused, naming the bundled model it is
    closest to."""
    if model is None:
        return _bundled(DEFAULT)
    text = str(model)
    if text.startswith(PREFIX):
        name = text[len(PREFIX) :]
        if name not in BUNDLED:
            raise LdmkitError(f"no bundled model {name!r}; {_suggest(name)}")
        return _bundled(name)
    path = Path(model)
    if text in BUNDLED:
        if not path.exists():
            return _bundled(text)
        what = "folder" if path.is_dir() else "file"
        log.warning(
            f"{text!r} is both a {what} here and a bundled model; using the {what} ./{text} "
            f"(write bundled:{text} for the bundled model)"
        )
        return path, {}
    if not path.exists() and _is_bare_name(text):
        raise LdmkitError(f"no model {text!r}: not a file, folder or bundled model; {_suggest(text)}")
    return path, {}


def _bundled(name: str) -> tuple[Path, dict]:
    entry = BUNDLED[name]
    path = HERE / entry.file
    if not path.is_file():
        raise LdmkitError(f"bundled model {name!r}: {path} is missing from this install; reinstall ldmkit")
    return path, dict(entry.defaults)


def _is_bare_name(text: str) -> bool:
    """A word with no folder in it: what a bundled name looks like. A missing path written as a path
    is left to the reader, whose message names the path."""
    return bool(text) and Path(text).name == text and not text.startswith((".", "~"))


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, BUNDLED, n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"bundled models: {', '.join(BUNDLED)} (ldmkit models lists them and the files in a folder)"


def bundled_controlnet(model_path: Path | None) -> Path:
    """The bundled ControlNet of a bundled model (by its loaded file)."""
    for name, entry in BUNDLED.items():
        if model_path is not None and Path(model_path) == HERE / entry.file:
            if entry.controlnet is None or not (HERE / entry.controlnet).is_file():
                raise LdmkitError(f"the bundled model {name!r} has no bundled ControlNet yet: give --controlnet FILE")
            return HERE / entry.controlnet
    raise LdmkitError("--control needs --controlnet FILE for this model (only bundled models have their own)")


def bundled_tiny_decoder(model: str | Path | None) -> Path | None:
    """The bundled tiny decoder of a bundled model (by name or by its file), or None."""
    try:
        path, _ = resolve(model)
    except LdmkitError:
        return None
    entry = bundled_entry(path)
    if entry is None or entry.tiny_decoder is None or not (HERE / entry.tiny_decoder).is_file():
        return None
    return HERE / entry.tiny_decoder
