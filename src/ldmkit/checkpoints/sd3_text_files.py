"""SD3's text towers read from files: a diffusers StableDiffusion3Pipeline folder (text_encoder/ CLIP-L and
text_encoder_2/ bigG, both CLIPTextModelWithProjection; text_encoder_3/ T5EncoderModel, often sharded;
tokenizer/, tokenizer_2/, tokenizer_3/), and a single file's `text_encoders.*` keys, which our module's
names already are (`text_encoders.clip_l.transformer.*`, `.clip_g.transformer.*`, `.t5xxl.transformer.*`).
Strict: a missing or extra weight is a one-line CheckpointError."""

from pathlib import Path

import torch

from ldmkit.checkpoints.components import strict_load, strip_prefix
from ldmkit.checkpoints.detect import NOT_WEIGHTS
from ldmkit.checkpoints.diffusers_text import component_weights, read_json
from ldmkit.errors import CheckpointError, ConfigError
from ldmkit.models.sd3_text import (
    SD3TextConfig,
    SD3TextEncoders,
    T5Encoder,
    sd3_clip_config,
    t5_config_from_hf,
)
from ldmkit.models.tokenizers import ClipTokenizer, T5Tokenizer

PREFIX = "text_encoders."
# (our tower, its weights folder, its tokenizer folder)
CLIP_TOWERS = (("clip_l", "text_encoder", "tokenizer"), ("clip_g", "text_encoder_2", "tokenizer_2"))
T5_TOWER = ("t5xxl", "text_encoder_3", "tokenizer_3")
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# T5EncoderModel ties its input embedding to `shared`: files keep one name or both.
T5_SHARED, T5_EMBED = "transformer.shared.weight", "transformer.encoder.embed_tokens.weight"


def _folder_has_t5(folder: Path) -> bool:
    """model_index.json says whether the pipeline has T5 (saved with text_encoder_3=None: [null, null]);
    a folder it names must be there."""
    index = folder / "model_index.json"
    if index.exists():
        entry = read_json(index).get("text_encoder_3")
        named = isinstance(entry, list) and any(e is not None for e in entry)
        if named and not (folder / "text_encoder_3").is_dir():
            raise CheckpointError(f"{folder}: model_index.json names text_encoder_3 but the folder has none")
        return named
    return (folder / "text_encoder_3" / "config.json").exists()


def _joint_width(folder: Path) -> int:
    path = folder / "transformer" / "config.json"
    if not path.exists():
        raise CheckpointError(
            f"{folder}: without text_encoder_3/ the context width comes from transformer/config.json "
            "(joint_attention_dim), which is missing"
        )
    width = read_json(path).get("joint_attention_dim")
    if not isinstance(width, int) or width < 1:
        raise CheckpointError(f"{path}: joint_attention_dim {width!r}; expected a positive integer")
    return width


def sd3_text_config_from_folder(folder: Path, t5: bool = True) -> SD3TextConfig:
    """The towers' config from the folder's config.json files and tokenizers (t5=False: leave T5 out,
    as diffusers' text_encoder_3=None)."""
    return _config_and_tokenizers(Path(folder), t5)[0]


def _config_and_tokenizers(folder: Path, t5: bool) -> tuple[SD3TextConfig, list[ClipTokenizer]]:
    clips, tokenizers = [], []
    for _, sub, tok in CLIP_TOWERS:
        hf = read_json(folder / sub / "config.json")
        if not (folder / tok).is_dir():
            # bigG pads with "!" where CLIP-L pads with end-of-text: only the folder's tokenizer says which.
            raise CheckpointError(f"{folder}: {tok}/ is missing (SD3 reads each CLIP tower with its own tokenizer)")
        tokenizer = ClipTokenizer.from_folder(folder / tok, int(hf.get("max_position_embeddings", 77)))
        clips.append(sd3_clip_config(hf, tokenizer.pad_token, tokenizer.max_length))
        tokenizers.append(tokenizer)
    has_t5 = t5 and _folder_has_t5(folder)
    t5_hf = read_json(folder / T5_TOWER[1] / "config.json") if has_t5 else None
    transformer = folder / "transformer" / "config.json"
    try:
        t5_config = t5_config_from_hf(t5_hf) if has_t5 else None
        width = t5_config.d_model if t5_config is not None else _joint_width(folder)
        if t5_config is not None and transformer.exists():
            joint = read_json(transformer).get("joint_attention_dim", width)
            if joint != width:
                raise CheckpointError(f"{transformer}: joint_attention_dim {joint}, but T5 gives {width} channels")
        return SD3TextConfig(clips[0], clips[1], t5_config, width), tokenizers
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{folder}: {e}") from None


def load_sd3_text_folder(folder: Path, t5: bool = True, t5_dtype: torch.dtype | None = None) -> SD3TextEncoders:
    """SD3's text towers and tokenizers from a diffusers folder. t5_dtype: T5's weights are read into it
    (it is built empty and takes the file's tensors: XXL is 19 GB in float32); the CLIP towers stay float32."""
    folder = Path(folder)
    config, tokenizers = _config_and_tokenizers(folder, t5)
    encoders = SD3TextEncoders(config, empty_t5=True, t5_dtype=t5_dtype or torch.float32)
    for (name, sub, tok), tokenizer in zip(CLIP_TOWERS, tokenizers):
        tower = getattr(encoders, name)
        # CLIPTextModelWithProjection's keys (`text_model.*`, `text_projection.weight`) are ours below
        # `transformer.`; a flattened CLIPTextModel's (transformers 5) lack `text_model.`.
        state = {}
        for k, v in _weights(folder / sub).items():
            state["transformer." + (k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k)] = v
        strict_load(tower, state, f"{name} text encoder", str(folder / sub))
        tower.use_tokenizer(tokenizer, str(folder / tok))
    if encoders.t5xxl is not None:
        _, sub, tok = T5_TOWER
        state = {"transformer." + k: v for k, v in _weights(folder / sub, t5_dtype).items()}
        _load_t5(encoders.t5xxl, state, str(folder / sub))
        if not (folder / tok).is_dir():
            raise CheckpointError(f"{folder}: {tok}/ is missing (T5's tokenizer comes with its weights)")
        encoders.t5xxl.use_tokenizer(T5Tokenizer(folder / tok), str(folder / tok))
    return encoders


def _weights(folder: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    return {k: v for k, v in component_weights(folder, WEIGHTS, dtype).items() if not NOT_WEIGHTS.search(k)}


def _load_t5(tower: T5Encoder, state: dict[str, torch.Tensor], where: str) -> None:
    """strict_load, with T5's one embedding under whichever of its two names the file used."""
    if T5_SHARED in state and T5_EMBED in state and not torch.equal(state[T5_SHARED], state[T5_EMBED]):
        raise CheckpointError(f"{where}: T5 has two different token embeddings ({T5_SHARED}, {T5_EMBED}); it ties them")
    if T5_SHARED not in state and T5_EMBED in state:
        state[T5_SHARED] = state[T5_EMBED]
    if T5_SHARED in state:
        state[T5_EMBED] = state[T5_SHARED]
    strict_load(tower, state, "t5xxl text encoder", where)


def load_sd3_text_state(encoders: SD3TextEncoders, state: dict[str, torch.Tensor], where: str) -> None:
    """A single file's `text_encoders.*` tensors into our towers, by name. CLIP-L's projection is often
    absent from SD3 files (the reference never projects CLIP-L's pooled vector): identity, as diffusers'
    single-file reader puts; T5's tied embedding may be under either name or both."""
    state = {k: v for k, v in strip_prefix(state, PREFIX).items() if not NOT_WEIGHTS.search(k)}
    towers = {"clip_l": encoders.clip_l, "clip_g": encoders.clip_g, "t5xxl": encoders.t5xxl}
    unknown = sorted({k.split(".")[0] for k in state} - {n for n, t in towers.items() if t is not None})
    if unknown:
        raise CheckpointError(f"{where}: unexpected text tower {PREFIX}{unknown[0]} (this model has no such tower)")
    for name, tower in towers.items():
        if tower is None:
            continue
        part = strip_prefix(state, name + ".")
        if name == "clip_l" and "transformer.text_projection.weight" not in part:
            part["transformer.text_projection.weight"] = torch.eye(tower.config.hidden_size)
        if name == "t5xxl":
            _load_t5(tower, part, f"{where}: {PREFIX}{name}")
        else:
            strict_load(tower, part, f"{name} text encoder", f"{where}: {PREFIX}{name}")
