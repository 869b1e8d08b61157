"""SD3's text towers known from their weights alone, and read from a folder of separately distributed
towers (`--text-encoders DIR`): ComfyUI-style standalone files or a diffusers SD3 folder.

The shapes give every width, depth and vocabulary; the rest are SD3's rules, which no weight holds:
- CLIP: 64 channels per head (every CLIP text tower); CLIP-L with quick_gelu and padded with its
  end-of-text token, bigG with gelu and padded with "!" (SD3's tokenizer configs); both read at the
  penultimate layer without the final norm (models/sd3_text.sd3_text_config's towers). bigG's pooled
  vector goes through its `text_projection`, CLIP-L's does not: the SD3 reference and ComfyUI read it
  unprojected and diffusers' single-file reader puts the identity there, so a projection in such a file
  (CLIP-L's standalone files carry OpenAI's) is not used.
- T5: heads from `relative_attention_bias` [buckets, heads], channels per head = the attention's inner
  width / heads, gated GELU (v1.1) when `wi_0` is there, else ReLU; the relative-position reach (128)
  and the norm epsilon (1e-6) are T5's. Its tokenizer: T5 v1.1's, which ships with ldmkit."""

import re
from dataclasses import replace
from pathlib import Path

import torch

from ldmkit.checkpoints.components import strip_prefix
from ldmkit.checkpoints.detect import NOT_WEIGHTS, clip_config_from_weights
from ldmkit.checkpoints.files import read_tensors
from ldmkit.checkpoints.sd3_text_files import load_sd3_text_folder
from ldmkit.errors import CheckpointError
from ldmkit.models.sd3_text import T5Encoder, T5EncoderConfig, sd3_text_config
from ldmkit.models.text import TextEncoder, TextEncoderConfig
from ldmkit.models.tokenizers import T5Tokenizer

PREFIX = "text_encoders."
TOWERS = ("clip_l", "clip_g", "t5xxl")
# The names ComfyUI gives standalone towers (its models/text_encoders folder); the first found is read.
TOWER_FILES = {
    "clip_l": ("clip_l.safetensors",),
    "clip_g": ("clip_g.safetensors",),
    "t5xxl": ("t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn.safetensors", "t5xxl.safetensors"),
}
# T5EncoderModel ties its input embedding to `shared`: files keep one name or both.
T5_SHARED, T5_EMBED = "transformer.shared.weight", "transformer.encoder.embed_tokens.weight"
TowerConfig = TextEncoderConfig | T5EncoderConfig
# A diffusers SD3 folder's tower subfolders.
DIFFUSERS_FOLDERS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"}
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def widened(state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """float8 tensors (the *_fp8 files ComfyUI and Stability ship) as float32, which CPUs compute in. A
    scaled fp8 file (a scale per weight) is refused: its stored values are not the weights."""
    if "scaled_fp8" in state or any(k.endswith(".scale_weight") for k in state):
        raise CheckpointError(
            f"{where}: a scaled fp8 file (scale_weight tensors); ldmkit reads fp8 files only unscaled"
        )
    return {k: v.float() if v.dtype in FLOAT8 else v for k, v in state.items()}


def towers_in(keys) -> dict[str, bool]:
    """Which towers a single file carries (`text_encoders.NAME.*`)."""
    keys = list(keys)
    return {name: any(k.startswith(f"{PREFIX}{name}.") for k in keys) for name in TOWERS}


def tower_state(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """A tower's weights as our tower module names them (`transformer.*`), from a file without our header
    (keys relative to the tower in transformers' layout: `text_model.*` / `text_projection.weight`,
    `shared.weight` / `encoder.*`), read by SD3's rules: CLIP-L's projection the identity, T5's one
    embedding under both its names. A CLIP tower saved flat (transformers 5's CLIPTextModel, no
    `text_model.` level) gets the level back."""
    state = {k: v for k, v in state.items() if not NOT_WEIGHTS.search(k)}
    if name != "t5xxl":
        flat = ("text_model.", "text_projection.")
        state = {(k if k.startswith(flat) else "text_model." + k): v for k, v in state.items()}
    out = {"transformer." + k: v for k, v in state.items()}
    norm = out.get("transformer.text_model.final_layer_norm.weight")
    if name == "clip_l" and norm is not None:
        out["transformer.text_projection.weight"] = torch.eye(norm.shape[0], dtype=norm.dtype)
    if name == "t5xxl":
        one = out.get(T5_SHARED, out.get(T5_EMBED))
        if one is not None:
            out.setdefault(T5_SHARED, one)
            out.setdefault(T5_EMBED, one)
    return out


def clip_config_from_shapes(state: dict[str, torch.Tensor], name: str, where: str) -> TextEncoderConfig:
    """One of SD3's CLIP towers from its weights (`transformer.*`, as tower_state gives them)."""
    rule = getattr(sd3_text_config(t5=False), name)
    hf = strip_prefix(state, "transformer.")
    c = clip_config_from_weights(hf, "clip", where)
    if c.hidden_size % 64:
        raise CheckpointError(
            f"{where}: a CLIP tower {c.hidden_size} wide, no multiple of the 64 channels per head of every CLIP "
            "text tower (its header or a diffusers config would have to say its heads)"
        )
    projection = hf.get("text_projection.weight")
    return replace(
        c,
        hidden_act=rule.hidden_act,
        pad_token=rule.pad_token,
        skip_last_layers=rule.skip_last_layers,
        final_norm=rule.final_norm,
        pooled=True,
        projection_dim=c.hidden_size if projection is None else projection.shape[0],
        max_length=min(rule.max_length, c.max_position_embeddings),
    )


def t5_config_from_shapes(state: dict[str, torch.Tensor], where: str) -> T5EncoderConfig:
    """T5's encoder from its weights (`transformer.*`, as tower_state gives them)."""
    attention = "transformer.encoder.block.0.layer.0.SelfAttention."
    ff = "transformer.encoder.block.0.layer.1.DenseReluDense."
    try:
        vocab, width = state[T5_SHARED].shape
        buckets, heads = state[attention + "relative_attention_bias.weight"].shape
        inner = state[attention + "q.weight"].shape[0]
        gated = ff + "wi_0.weight" in state
        blocks = {int(m.group(1)) for k in state if (m := re.match(r"transformer\.encoder\.block\.(\d+)\.", k))}
        if inner % heads:
            raise CheckpointError(f"{where}: T5's attention is {inner} wide, which its {heads} heads do not divide")
        return T5EncoderConfig(
            vocab_size=vocab,
            d_model=width,
            d_kv=inner // heads,
            d_ff=state[ff + ("wi_0.weight" if gated else "wi.weight")].shape[0],
            num_layers=max(blocks) + 1,
            num_heads=heads,
            relative_attention_num_buckets=buckets,
            feed_forward_proj="gated-gelu" if gated else "relu",
        )
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{where}: not a T5 encoder in transformers' layout (missing {e})") from None


def config_from_shapes(state: dict[str, torch.Tensor], name: str, where: str) -> TowerConfig:
    return t5_config_from_shapes(state, where) if name == "t5xxl" else clip_config_from_shapes(state, name, where)


def check_tower(config: TowerConfig, state: dict[str, torch.Tensor], name: str, where: str) -> None:
    """Every weight the tower has, at its shape, and no other -- checked against an empty (meta) tower, so
    that a broken file is refused naming it before anything is built."""
    with torch.device("meta"):
        tower = T5Encoder(config, empty=True) if name == "t5xxl" else TextEncoder(config)
    expected = {k: v.shape for k, v in tower.state_dict().items() if not NOT_WEIGHTS.search(k)}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        what = f"missing weight {missing[0]}" if missing else f"unexpected weight {extra[0]}"
        raise CheckpointError(f"{where}: {name} text encoder: {what} ({len(missing)} missing, {len(extra)} unexpected)")
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise CheckpointError(
                f"{where}: {name} text encoder: {k} has shape {tuple(state[k].shape)}, expected {tuple(shape)}"
            )


class TextEncodersFolder:
    """Towers for SD3 single files that lack them: a folder of ComfyUI-style standalone files
    (clip_l.safetensors and clip_g.safetensors in transformers' CLIPTextModel layout, t5xxl_fp16.safetensors
    or another TOWER_FILES name as T5EncoderModel's `shared.weight` + `encoder.*`), or a diffusers SD3 folder
    (text_encoder/, text_encoder_2/, text_encoder_3/ and their tokenizers, read as sd3_text_files reads them)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"--text-encoders {folder}: no such folder")
        self.diffusers = (self.folder / "text_encoder").is_dir() or (self.folder / "model_index.json").is_file()

    def __str__(self) -> str:
        return str(self.folder)

    def _file(self, name: str) -> Path | None:
        return next((self.folder / f for f in TOWER_FILES[name] if (self.folder / f).is_file()), None)

    def has(self, name: str) -> bool:
        if self.diffusers:
            return (self.folder / DIFFUSERS_FOLDERS[name] / "config.json").is_file()
        return self._file(name) is not None

    def towers(self, names) -> dict[str, tuple[TowerConfig, dict[str, torch.Tensor], object | None]]:
        """Those of the named towers this folder has, each checked whole: {name: (config, weights as
        tower_state gives them, its tokenizer -- None: the shipped one)}."""
        names = [n for n in names if self.has(n)]
        if self.diffusers:
            return self._diffusers_towers(names)
        out = {}
        for name in names:
            path = self._file(name)
            state = tower_state(widened(read_tensors(path)[0], str(path)), name)
            config = config_from_shapes(state, name, str(path))
            check_tower(config, state, name, str(path))
            out[name] = (config, state, T5Tokenizer() if name == "t5xxl" else None)
        return out

    def _diffusers_towers(self, names: list[str]) -> dict:
        if not names:
            return {}
        encoders = load_sd3_text_folder(self.folder, t5="t5xxl" in names)  # T5 (XXL: 19 GB) only when wanted
        out = {}
        for name in names:
            tower = getattr(encoders, name)
            state = {k: v for k, v in tower.state_dict().items() if not NOT_WEIGHTS.search(k)}
            out[name] = (tower.config, state, tower.tokenizer)
        return out
