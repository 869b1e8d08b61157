"""SD3 / SD3.5 single files, read and written. The original layout, which our module names already are:

    model.diffusion_model.*                  the MMDiT (models/mmdit.py)
    first_stage_model.*                      the 16-channel autoencoder, in SD's layout
    text_encoders.clip_l.transformer.*       CLIP-L (transformers' CLIPTextModel layout)
    text_encoders.clip_g.transformer.*       OpenCLIP bigG (the same, with text_projection.weight)
    text_encoders.t5xxl.transformer.*        T5 v1.1 XXL's encoder (shared.weight, encoder.*)

Stability ships files with all, some or none of the towers (sd3_medium.safetensors: none;
..._incl_clips: no T5; ..._incl_clips_t5xxlfp16: all; SD3.5 files usually none). A tower a file lacks
comes from a folder (`--text-encoders DIR`, sd3_towers.TextEncodersFolder); without T5 the model runs
without it, zeros in its place, as diffusers' pipeline with text_encoder_3=None. What no weight says
comes from the family row (heads, native size, latent scale and shift, the scheduler) and SD3's tower
rules (sd3_towers.py); our own files carry their config and any tokenizer other than the shipped ones
in the header, as for the other families."""

import json
import logging
from dataclasses import replace
from pathlib import Path

import torch

from ldmkit.checkpoints import keymaps, mmdit_keys
from ldmkit.checkpoints.components import strict_load, strip_prefix
from ldmkit.checkpoints.detect import (
    METADATA_KEY,
    NOT_WEIGHTS,
    UNET,
    VAE,
    config_from_metadata,
    vae_config_from_weights,
)
from ldmkit.checkpoints.families import FAMILIES, Family, marked_family
from ldmkit.checkpoints.files import SAFETENSORS, read_tensors, sniff, write_safetensors
from ldmkit.checkpoints.sd3_text_files import load_sd3_text_state
from ldmkit.checkpoints.sd3_towers import (
    FLOAT8,
    PREFIX,
    T5_EMBED,
    TOWER_FILES,
    TOWERS,
    TextEncodersFolder,
    config_from_shapes,
    tower_state,
    towers_in,
    widened,
)
from ldmkit.errors import CheckpointError, ConfigError
from ldmkit.models.ldm import LatentDiffusion, ModelConfig, ScheduleConfig
from ldmkit.models.sd3_text import SD3TextConfig
from ldmkit.models.tokenizers import ClipTokenizer, T5Tokenizer

log = logging.getLogger(__name__)

# Where a tokenizer other than the shipped ones travels in our header (single_file.py's names, in tower order).
TOKENIZER_KEYS = {"clip_l": "ldmkit_tokenizer", "clip_g": "ldmkit_tokenizer_2", "t5xxl": "ldmkit_tokenizer_3"}
GIVE = (
    "give a folder holding them with --text-encoders DIR ("
    + ", ".join(f[0] for f in TOWER_FILES.values())
    + " as ComfyUI keeps them, or a diffusers SD3 folder)"
)


def file_family(keys, metadata: dict | None = None) -> Family | None:
    """The family of a single file read here: one whose denoiser is the MMDiT, from its keys -- unless our
    header says it is another model (ldmkit's own transformers have those keys and one text tower)."""
    f = marked_family(keys)
    if f is None or f.backbone != "mmdit" or not f.supported:
        return None
    if METADATA_KEY in (metadata or {}) and not config_from_metadata(metadata, "header").sd3:
        return None  # our config says another model
    return f


def _backbone(state: dict, header: ModelConfig | None, family: Family, where: str) -> ModelConfig:
    """The file's config without its text towers (`text` left None): from our header, or from the
    weights and the family row."""
    if header is not None:
        return replace(header, text=None, guessed=dict(header.guessed))
    vae = vae_config_from_weights(strip_prefix(state, VAE), where)
    vae = replace(vae, scale_factor=family.vae_scale_factor, shift_factor=family.vae_shift_factor)
    sample = family.image_size // vae.downsample_factor
    unet = mmdit_keys.config_from_weights(
        strip_prefix(state, UNET), sample_size=sample, where=where, **family.unet_heads
    )
    scheduler = dict(family.scheduler)
    steps = scheduler.get("num_train_timesteps", 1000)
    schedule = ScheduleConfig(num_train_timesteps=steps, prediction_type=family.prediction, diffusers=scheduler)
    guessed = {f"unet.{k}": v for k, v in family.unet_heads.items()}
    guessed.update(
        {
            "image_size": family.image_size,
            "vae.scale_factor": family.vae_scale_factor,
            "vae.shift_factor": family.vae_shift_factor,
            "schedule.diffusers": scheduler,
        }
    )
    return ModelConfig(
        family=family.name,
        unet=unet,
        vae=vae,
        text=None,
        schedule=schedule,
        image_size=family.image_size,
        guessed=guessed,
    )


def _file_tower(state: dict, name: str, header: ModelConfig | None, guessed: dict, where: str):
    """A tower the file carries: its config from our header, else from its shapes (SD3's rules guessed)."""
    if header is not None and getattr(header.text, name, None) is not None:
        return getattr(header.text, name)
    config = config_from_shapes(tower_state(strip_prefix(state, f"{PREFIX}{name}.transformer."), name), name, where)
    if name == "t5xxl":
        guessed["text.t5xxl.relative_attention_max_distance"] = config.relative_attention_max_distance
    else:
        guessed.update({f"text.{name}.num_heads": config.num_heads, f"text.{name}.hidden_act": config.hidden_act})
    return config


def sd3_config(
    state: dict, metadata: dict, where: str, extra: dict | None = None, folder: TextEncodersFolder | None = None
) -> ModelConfig:
    """The ModelConfig of an SD3 single file. extra: configs of the towers it lacks, found in `folder`."""
    family = file_family(state) or FAMILIES["sd3"]
    header = config_from_metadata(metadata, where)
    config = _backbone(state, header, family, where)
    present, extra = towers_in(state), dict(extra or {})
    towers = {n: _file_tower(state, n, header, config.guessed, where) for n in TOWERS if present[n]}
    towers.update({n: c for n, c in extra.items() if n not in towers})
    missing = [n for n in ("clip_l", "clip_g") if n not in towers]
    if missing:
        if folder is None:
            raise CheckpointError(f"{where}: an SD3 file without its {' and '.join(missing)} text encoder(s); {GIVE}")
        raise CheckpointError(
            f"{where}: no {' and '.join(missing)} text encoder in the file nor in --text-encoders {folder} "
            f"(looked for {', '.join(TOWER_FILES[n][0] for n in missing)}, or a diffusers SD3 folder's text_encoder*/)"
        )
    t5 = towers.get("t5xxl")
    unet = config.unet
    try:
        config.text = SD3TextConfig(towers["clip_l"], towers["clip_g"], t5, t5.d_model if t5 else unet.context_dim)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    if config.text.joint_width != unet.context_dim:
        raise CheckpointError(
            f"{where}: the transformer reads a context {unet.context_dim} wide, but T5 gives {config.text.joint_width}"
        )
    if config.text.pooled_width != unet.pooled_dim:
        raise CheckpointError(
            f"{where}: the transformer takes a pooled vector of {unet.pooled_dim}, but the CLIP towers give "
            f"{config.text.pooled_width}"
        )
    return config


def refuse_overrides(overrides: dict | None, where: str) -> None:
    """The overrides (detect.OVERRIDABLE) are U-Net models' and SD text towers': SD3's weights say theirs."""
    if overrides:
        raise CheckpointError(f"{where}: {', '.join(overrides)}: not for an SD3 file")


def refuse_text_encoders(text_encoders, path) -> None:
    """Separate text towers are for SD3 files, which may come without theirs."""
    if text_encoders is not None:
        raise CheckpointError(f"--text-encoders {text_encoders}: {path} is no SD3 file; only SD3 / SD3.5 files take it")


def load_sd3_file(
    path: str | Path, state: dict, metadata: dict, overrides=None, dtype_rule=None, text_encoders=None
) -> LatentDiffusion:
    """An SD3 single file (tensors and metadata read by the caller), the towers it lacks from
    `text_encoders` (a folder); dtype_rule: the transformer's and autoencoder's dtype, as for U-Net models."""
    where = str(path)
    refuse_overrides(overrides, where)
    folder = TextEncodersFolder(text_encoders) if text_encoders is not None else None
    present = towers_in(state)
    extra = folder.towers([n for n in TOWERS if not present[n]]) if folder is not None else {}
    config = sd3_config(state, metadata, where, {n: c for n, (c, _, _) in extra.items()}, folder)
    dtype = dtype_rule(config) if dtype_rule else torch.float32
    fp8 = any(v.dtype in FLOAT8 for v in state.values())
    if dtype != torch.float32 and sniff(path) == SAFETENSORS and not fp8:
        del state
        state, _ = read_tensors(path, lambda k: dtype if k.startswith((UNET, VAE)) else None)
    state = widened(state, where)
    own_rules = METADATA_KEY not in metadata  # Stability's and others' files: their towers read by SD3's rules
    model = _build(config, state, where, dtype, {n: s for n, (_, s, _) in extra.items()}, own_rules)
    _use_tokenizers(model, metadata, {n: t for n, (_, _, t) in extra.items()}, where)
    if config.text.t5xxl is None:
        log.warning(
            "%s: no T5 text encoder (%s): SD3 runs without it, zeros in its place (as diffusers' pipeline does)",
            where,
            f"none in --text-encoders {folder} either" if folder else "add one with --text-encoders DIR",
        )
    return model


def _build(
    config: ModelConfig, state: dict, where: str, dtype: torch.dtype, extra: dict, own_rules: bool
) -> LatentDiffusion:
    """Every component strictly loaded: the file's, and the towers it lacks from `extra` ({name: weights
    as sd3_towers.tower_state gives them}). own_rules: the file's towers are read by SD3's rules
    (sd3_towers.tower_state); else as they are (ours, whose header says what they are)."""
    state = {k: v for k, v in state.items() if not NOT_WEIGHTS.search(k)}
    stray = sorted(k for k in state if not k.startswith((UNET, VAE, PREFIX)))
    if stray:
        raise CheckpointError(f"{where}: unexpected tensor(s) outside the model: {', '.join(stray[:3])}")
    model = LatentDiffusion(config, empty=True, dtype=dtype)
    strict_load(model.unet, strip_prefix(state, UNET), "transformer", where)
    strict_load(model.vae, keymaps.vae_linear_attention_to_conv(strip_prefix(state, VAE)), "autoencoder", where)
    text = {k: v for k, v in state.items() if k.startswith(PREFIX)}
    if own_rules:
        odd = sorted(k for k in text if not k.startswith(f"{PREFIX}{k.split('.')[1]}.transformer."))
        if odd:
            raise CheckpointError(f"{where}: {odd[0]}: a tower's weights are under {PREFIX}NAME.transformer.")
        text = {
            f"{PREFIX}{name}.{k}": v
            for name in {k.split(".")[1] for k in text}
            for k, v in tower_state(strip_prefix(text, f"{PREFIX}{name}.transformer."), name).items()
        }
    for name, part in extra.items():
        text.update({f"{PREFIX}{name}.{k}": v for k, v in part.items()})
    load_sd3_text_state(model.text_encoders, text, where)
    return model.eval()


def _use_tokenizers(model: LatentDiffusion, metadata: dict, extra: dict, where: str) -> None:
    """Each tower's tokenizer: the folder's it came from, or the one our header carries, or the shipped one
    (CLIP's BPE with the tower's padding, T5 v1.1's)."""
    for name, key in TOKENIZER_KEYS.items():
        tower = getattr(model.text_encoders, name)
        if tower is None:
            continue
        tokenizer = None
        if name in extra:  # a tower from the folder: the folder's tokenizer, or the shipped one
            tokenizer = extra[name]
        elif key in metadata:
            if name == "t5xxl":
                tokenizer = T5Tokenizer.from_header(metadata[key], where)
            else:
                tokenizer = ClipTokenizer.from_header(metadata[key], tower.config.max_length, where)
        if tokenizer is None and name == "t5xxl":
            tokenizer = T5Tokenizer()
        if tokenizer is not None:
            tower.use_tokenizer(tokenizer, where)


def sd3_state(model: LatentDiffusion, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """An SD3 model's tensors in the original layout. T5's embedding is written once, as `shared.weight`
    (transformers' own files keep that name of the tied pair)."""
    tied = f"{PREFIX}t5xxl.{T5_EMBED}"
    state = {k: v for k, v in model.state_dict().items() if not NOT_WEIGHTS.search(k) and k != tied}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state


def save_sd3_file(model: LatentDiffusion, path: str | Path, dtype: torch.dtype | None = None) -> None:
    metadata = {"format": "pt", METADATA_KEY: json.dumps(model.config.to_dict())}
    for name, key in TOKENIZER_KEYS.items():
        tower = getattr(model.text_encoders, name)
        try:
            tokenizer = tower.tokenizer if tower is not None else None
        except CheckpointError:  # a tower built in code, with no tokenizer of its own
            tokenizer = None
        if tokenizer is not None and not tokenizer.is_bundled():
            metadata[key] = tokenizer.to_header()  # a folder's own vocabulary travels with the file
    write_safetensors(path, sd3_state(model, dtype), metadata)


# --- what a file holds, from names and shapes alone (inspect, the models listing) --------------------


def _tower_info(config) -> dict:
    if config is None:
        return {"present": False}
    width = config.d_model if hasattr(config, "d_model") else config.hidden_size  # T5 or CLIP
    return {"present": True, "layers": config.num_layers, "width": width, "heads": config.num_heads}


def describe_config(config: ModelConfig, towers: dict) -> dict:
    """inspect's description of an SD3 model: its config, and its towers ({name: config or None})."""
    c = config.unet
    return {
        "family": config.family,
        "supported": True,
        "latent_channels": c.in_channels,
        "vae_downsample_factor": config.vae.downsample_factor,
        "vae_scale_factor": config.vae.scale_factor,
        "vae_shift_factor": config.vae.shift_factor,
        "prediction_type": config.schedule.prediction_type,
        "image_size": config.image_size,
        "context_dim": c.context_dim,
        "transformer": {
            "depth": c.depth,
            "hidden_size": c.hidden_size,
            "heads": c.num_heads,
            "patch_size": c.patch_size,
        },
        "text_encoders": {n: _tower_info(towers.get(n)) for n in TOWERS},
        "guessed": config.guessed,
    }


def describe_file(state: dict, metadata: dict, where: str) -> dict:
    """What an SD3 file holds without building it (no tower folder needed): its config, which towers it
    carries, and parameter counts from the tensors' shapes."""
    family = file_family(state) or FAMILIES["sd3"]
    header = config_from_metadata(metadata, where)
    config = _backbone(state, header, family, where)
    present = towers_in(state)
    towers = {n: _file_tower(state, n, header, config.guessed, where) for n in TOWERS if present[n]}
    info = describe_config(config, towers)

    def count(prefix: str) -> int:
        return sum(v.numel() for k, v in state.items() if k.startswith(prefix) and not NOT_WEIGHTS.search(k))

    info["parameters"] = {"unet": count(UNET), "vae": count(VAE)}
    info["parameters"].update({f"text_encoder.{n}": count(f"{PREFIX}{n}.") for n in towers})
    clips = [n for n in ("clip_l", "clip_g") if not present[n]]
    if clips:
        info["note"] = f"without {' and '.join(clips)}: it loads with --text-encoders DIR holding them"
    elif not present["t5xxl"]:
        info["note"] = "without T5: it runs without it unless --text-encoders DIR holds one"
    return info


def summary(state: dict, metadata: dict, where: str) -> dict:
    """The models listing's entry for an SD3 file."""
    title = (file_family(state) or FAMILIES["sd3"]).title
    try:
        info = describe_file(state, metadata, where)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {title} file, not loadable: {str(e).removeprefix(f'{where}: ')}") from None
    entry = {"kind": "model", "family": info["family"], "title": title, "supported": True}
    entry["image_size"] = info["image_size"]
    entry["text_encoders"] = [n for n, t in info["text_encoders"].items() if t["present"]]
    return entry | ({"note": info["note"]} if "note" in info else {})
