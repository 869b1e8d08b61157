"""Image encoders (CLIP vision towers, models/vision.py) from files.

A folder: config.json beside model.safetensors or pytorch_model.bin (diffusers' image_encoder/, where the
published IP-Adapters keep theirs). A single file in transformers' layout (what ComfyUI keeps in
models/clip_vision): its architecture is read off its shapes, and what shapes cannot say (heads, activation)
comes from the published tower of that width. Weights go through ldmkit's own readers: safetensors first,
pickles only by the safe loader."""

import json
from pathlib import Path

import torch

from ldmkit.checkpoints.components import check_state, layer_indices, strict_load
from ldmkit.checkpoints.files import read_tensors
from ldmkit.errors import CheckpointError
from ldmkit.models.vision import ImageEncoder

# Published CLIP vision towers by width: (name, heads, activation). ViT-H/14 and ViT-bigG/14 are
# OpenCLIP's (GELU), ViT-L/14 and ViT-B OpenAI's (quick GELU).
TOWERS = {
    768: ("ViT-B", 12, "quick_gelu"),
    1024: ("ViT-L/14", 16, "quick_gelu"),
    1280: ("ViT-H/14", 16, "gelu"),
    1664: ("ViT-bigG/14", 16, "gelu"),
}
FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
NOT_WEIGHTS = ("vision_model.embeddings.position_ids",)  # a buffer some files keep


def tower_name(width: int) -> str:
    return TOWERS[width][0] if width in TOWERS else f"a CLIP vision tower {width} wide"


LAYER_PREFIX = "vision_model.encoder.layers."


def _layer_count(state: dict, where: str) -> int:
    """Encoder layers 0..n-1 as the keys number them."""
    found = layer_indices(state, LAYER_PREFIX, where)
    if found != list(range(len(found))):
        raise CheckpointError(f"{where}: the tower's layers are not numbered 0, 1, 2, ...")
    return len(found)


def config_from_weights(state: dict[str, torch.Tensor], where: str) -> dict:
    """A transformers CLIPVisionConfig read off a single file's shapes."""
    try:
        width = state["vision_model.embeddings.class_embedding"].shape[0]
        patch = state["vision_model.embeddings.patch_embedding.weight"].shape[-1]
        positions = state["vision_model.embeddings.position_embedding.weight"].shape[0]
        projection = state["visual_projection.weight"].shape[0]
        intermediate = state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    except (KeyError, IndexError) as e:
        raise CheckpointError(f"{where}: not a CLIP vision tower in transformers' layout ({e})") from None
    if width not in TOWERS:
        raise CheckpointError(
            f"{where}: a CLIP vision tower {width} wide; a single file can be of the published widths only "
            f"({', '.join(str(w) for w in TOWERS)}): give its folder with config.json instead"
        )
    side = round((positions - 1) ** 0.5)
    _, heads, act = TOWERS[width]
    return dict(
        hidden_size=width,
        intermediate_size=intermediate,
        projection_dim=projection,
        num_hidden_layers=_layer_count(state, where),
        num_attention_heads=heads,
        image_size=side * patch,
        patch_size=patch,
        hidden_act=act,
    )


def _folder(path: Path) -> tuple[dict, Path]:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable config.json ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}/config.json: not a JSON object")
    if isinstance(config.get("vision_config"), dict):  # a whole CLIPConfig: its vision half
        config = {**config["vision_config"], "projection_dim": config.get("projection_dim", 512)}
    for name in FOLDER_WEIGHTS:
        if (path / name).is_file():
            return config, path / name
    raise CheckpointError(f"{path}: no {' or '.join(FOLDER_WEIGHTS)} beside config.json")


def load_image_encoder(path: str | Path) -> ImageEncoder:
    p = Path(path)
    where = str(p)
    if p.is_dir():
        config, weights = _folder(p)
        state, _ = read_tensors(weights)
    elif p.is_file():
        state, _ = read_tensors(p)
        config = config_from_weights(state, where)
    else:
        raise CheckpointError(f"{where}: no such image encoder file or folder")
    return build_image_encoder(config, state, where)


def build_image_encoder(config: dict, state: dict[str, torch.Tensor], where: str) -> ImageEncoder:
    """The tower a transformers config (a dict) describes, filled with `state` (transformers' layout)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    state = {k: v for k, v in state.items() if k not in NOT_WEIGHTS}
    try:
        config = CLIPVisionConfig(**{k: v for k, v in config.items() if k in CLIPVisionConfig().to_dict()})
        layers = _layer_count(state, where)
        if config.num_hidden_layers != layers:
            raise CheckpointError(
                f"{where}: config.json says {config.num_hidden_layers} layers; the weights have {layers}"
            )
        # every shape checked on an empty model first: sizes a config declares cost nothing unless the file has them
        with torch.device("meta"):
            check_state(CLIPVisionModelWithProjection(config), state, "image encoder", where)
        model = CLIPVisionModelWithProjection(config)
    except (TypeError, ValueError, KeyError, ZeroDivisionError, RuntimeError, IndexError) as e:
        raise CheckpointError(f"{where}: a vision tower config transformers refuses ({str(e)[:160]})") from None
    strict_load(model, state, "image encoder", where)
    return ImageEncoder(model.eval(), where)
