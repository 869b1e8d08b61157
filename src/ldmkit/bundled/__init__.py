"""Models shipped inside the package, trained by our own recipes (recipes/), so that a fresh install
generates with no download. Each entry names its weights file, its recipe and the settings chosen for it
(docs/models.md)."""

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


BUNDLED = {
    "shapes": Bundled(
        "shapes.safetensors",
        "recipes/shapes.sh",
        {"sampler": "euler_a", "steps": 20, "cfg": 2.0},
        controlnet="shapes-canny.safetensors",
    ),
    # shapes' latent consistency distillation (configs/shapes-lcm.yaml): lcm, 4 steps, one UNet call each
    "shapes-fast": Bundled("shapes-fast.safetensors", "recipes/shapes.sh", {"sampler": "lcm", "steps": 4, "cfg": 2.0}),
    # 64x64 emoji from words (Noto and Twemoji art; NOTICE-emoji.txt), trained by recipes/emoji.sh
    "emoji": Bundled("emoji.safetensors", "recipes/emoji.sh", {"sampler": "dpmpp_2m_karras", "steps": 20, "cfg": 3.0}),
}
# --fast: a bundled model's few-step version
FAST: dict[str, str] = {"shapes": "shapes-fast"}
DEFAULT = "shapes"


def resolve(model: str | Path | None) -> tuple[Path, dict]:
    """The file to load and its recommended settings: a bundled model by name (the default one when
    `model` is None), otherwise the user's own path, which no bundled name shadows."""
    name = DEFAULT if model is None else str(model)
    if name in BUNDLED and (model is None or not Path(name).exists()):
        entry = BUNDLED[name]
        path = HERE / entry.file
        if not path.is_file():
            raise LdmkitError(f"bundled model {name!r}: {path} is missing from this install; reinstall ldmkit")
        return path, dict(entry.defaults)
    return Path(model), {}


def bundled_controlnet(model_path: Path | None) -> Path:
    """The bundled ControlNet of a bundled model (by its loaded file)."""
    for name, entry in BUNDLED.items():
        if model_path is not None and Path(model_path) == HERE / entry.file:
            if entry.controlnet is None or not (HERE / entry.controlnet).is_file():
                raise LdmkitError(f"the bundled model {name!r} has no bundled ControlNet yet: give --controlnet FILE")
            return HERE / entry.controlnet
    raise LdmkitError("--control needs --controlnet FILE for this model (only bundled models have their own)")
