"""The diffusers folder layout (unet/, vae/, text_encoder/, tokenizer/, scheduler/, model_index.json),
read and written through the key maps in keymaps.py and the config translations in diffusers_configs.py.

What diffusers has no place for travels in two extra files that diffusers ignores: `ldmkit.json`
(our ModelConfig: family, clip skip, what was guessed) and `ldmkit_extra.safetensors` (the stored
training schedule, and the parts of SD 2's OpenCLIP tower that diffusers drops: its unused last
block and `text_projection`)."""

import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from ldmkit.checkpoints import keymaps
from ldmkit.checkpoints.components import strict_load
from ldmkit.checkpoints.detect import NOT_WEIGHTS
from ldmkit.checkpoints.diffusers_configs import (
    DIFFUSERS_VERSION,
    schedule_from_diffusers,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    vae_config_from_diffusers,
    vae_config_from_diffusers_weights,
    vae_config_to_diffusers,
)
from ldmkit.checkpoints.families import sd_family
from ldmkit.checkpoints.files import read_tensors, write_json, write_safetensors
from ldmkit.errors import CheckpointError, ConfigError
from ldmkit.models.autoencoder import AutoencoderKL
from ldmkit.models.ldm import LatentDiffusion, ModelConfig, ScheduleConfig
from ldmkit.models.text import TextEncoderConfig, text_config_from_hf
from ldmkit.models.tokenizers import ClipTokenizer

# The config translations are read through this module too (loading single files, ControlNets).
__all__ = [
    "load_diffusers",
    "load_diffusers_vae",
    "save_diffusers",
    "schedule_from_diffusers",
    "unet_config_from_diffusers",
    "unet_config_to_diffusers",
    "vae_config_from_diffusers",
    "vae_config_from_diffusers_weights",
    "vae_config_to_diffusers",
]

EXTRA = "ldmkit_extra.safetensors"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data


def _weights(folder: Path, names: tuple[str, ...], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A component's weights: safetensors first, then the fp16 variant, then `.bin` (safe loader).
    dtype: a safetensors file's floating tensors converted to it as they are read."""
    for name in names:
        stem, ext = name.rsplit(".", 1)
        for candidate in (name, f"{stem}.fp16.{ext}"):
            if (folder / candidate).exists():
                state, _ = read_tensors(folder / candidate, None if dtype is None else (lambda k: dtype))
                return state
    raise CheckpointError(f"{folder}: no weights file (looked for {', '.join(names)})")


def load_diffusers_vae(folder: Path, dtype: torch.dtype | None = None) -> AutoencoderKL:
    """dtype: built empty in it and filled with the file's tensors, converted as they are read."""
    config = vae_config_from_diffusers(_read_json(folder / "config.json"), str(folder))
    if dtype is None:
        vae = AutoencoderKL(config)
    else:
        with torch.device("meta"):
            vae = AutoencoderKL(config).to(dtype)
    state = _weights(folder, ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"), dtype)
    strict_load(vae, keymaps.vae_from_diffusers(state, config), "autoencoder", str(folder))
    return vae.eval()


# --- text encoder --------------------------------------------------------------------------------


def _clip_kind(hf: dict, pad: str) -> str:
    """SD 2's OpenCLIP tower is a CLIPTextModel in diffusers: what tells it from OpenAI's CLIP is what
    OpenCLIP does differently, both together: gelu (not quick_gelu) and padding with "!" (not the
    end-of-text token). The kind decides only the single-file layout it is written in."""
    return "openclip" if hf.get("hidden_act") == "gelu" and pad == "!" else "clip"


def _text_config(folder: Path, saved: TextEncoderConfig | None, extra: dict) -> TextEncoderConfig:
    hf = _read_json(folder / "text_encoder" / "config.json")
    if saved is not None:
        return saved
    if hf.get("model_type") == "bert":
        return text_config_from_hf(hf, "bert")
    tok = folder / "tokenizer" / "tokenizer_config.json"
    pad, length = "<|endoftext|>", 77
    if tok.exists():
        tok_cfg = _read_json(tok)
        p = tok_cfg.get("pad_token", pad)
        pad = p["content"] if isinstance(p, dict) else p
        length = int(min(tok_cfg.get("model_max_length", length), 1 << 30))
    c = text_config_from_hf(hf, _clip_kind(hf, pad))
    extra_layers = {k for k in extra if k.startswith("text_encoder.transformer.text_model.encoder.layers.")}
    carried = len({k.split(".")[5] for k in extra_layers})
    return replace(
        c,
        pad_token=pad,
        max_length=min(length, c.max_position_embeddings),
        num_layers=c.num_layers + carried,
        skip_last_layers=carried,
    )


# --- reading a pipeline folder -------------------------------------------------------------------


def load_diffusers(path: str | Path, overrides: dict | None = None, dtype_rule=None) -> LatentDiffusion:
    """dtype_rule: the UNet's and autoencoder's dtype for the config (single_file.load_single_file)."""
    from ldmkit.checkpoints.detect import _apply_overrides

    folder = Path(path)
    where = str(folder)
    if not (folder / "unet" / "config.json").exists():
        raise CheckpointError(f"{where}: a diffusers folder without unet/config.json; only full pipelines load here")
    saved = None
    if (folder / "ldmkit.json").exists():
        try:
            saved = ModelConfig.from_dict(_read_json(folder / "ldmkit.json"), f"{folder / 'ldmkit.json'}")
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
    extra = {}
    if (folder / EXTRA).exists():
        extra, _ = read_tensors(folder / EXTRA)
    unet_json = _read_json(folder / "unet" / "config.json")
    try:  # configs are files from anywhere: a value of the wrong type is a refused file, not a crash
        unet = unet_config_from_diffusers(unet_json, f"{folder / 'unet'}")
        vae = vae_config_from_diffusers(_read_json(folder / "vae" / "config.json"), f"{folder / 'vae'}")
        text = _text_config(folder, saved.text if saved else None, extra)
        sched_file = folder / "scheduler" / "scheduler_config.json"
        schedule = schedule_from_diffusers(_read_json(sched_file)) if sched_file.exists() else ScheduleConfig()
    except KeyError as e:
        raise CheckpointError(f"{where}: a config lacks {str(e)[:100]}, which a diffusers config has") from None
    except (TypeError, ValueError, AttributeError, IndexError) as e:
        raise CheckpointError(f"{where}: a config value of the wrong kind ({str(e)[:200]})") from None
    guessed = {}
    if saved is not None:
        family, guessed = saved.family, dict(saved.guessed)
        guessed.pop("schedule.prediction_type", None)  # the scheduler config says it
    else:
        family = sd_family(text.kind, unet.in_channels, schedule.prediction_type).name
    image_size = saved.image_size if saved else unet_json.get("sample_size", 64) * vae.downsample_factor
    config = ModelConfig(
        family=family, unet=unet, vae=vae, text=text, schedule=schedule, guessed=guessed, image_size=image_size
    )
    _apply_overrides(config, dict(overrides or {}), where)
    dtype = dtype_rule(config) if dtype_rule else torch.float32
    model = LatentDiffusion(config, empty=True, dtype=dtype)
    convert = None if dtype == torch.float32 else dtype  # fp32 tensors stay mapped from the file
    strict_load(
        model.unet,
        keymaps.rename(
            _weights(folder / "unet", ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"), convert),
            keymaps.unet_to_diffusers(unet),
            reverse=True,
        ),
        "UNet",
        f"{folder / 'unet'}",
    )
    model.first_stage_model = load_diffusers_vae(folder / "vae", convert)
    te = _weights(folder / "text_encoder", ("model.safetensors", "pytorch_model.bin"))
    te = {k: v for k, v in te.items() if not NOT_WEIGHTS.search(k)}
    if text.kind == "bert":
        te = {k.removeprefix("bert."): v for k, v in te.items() if not k.startswith(("pooler.", "bert.pooler."))}
        state = {"transformer." + k: v for k, v in te.items()}
    else:
        # Files written by transformers 5 drop the `text_model.` prefix; older ones have it.
        state = {"transformer." + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in te.items()}
    state.update({k[len("text_encoder.") :]: v for k, v in extra.items() if k.startswith("text_encoder.")})
    if text.kind == "openclip" and "text_projection" not in state:
        # diffusers keeps neither of these (SD 2 never reads them); zeros stand in for them.
        state["text_projection"] = torch.zeros(text.hidden_size, text.hidden_size)
        state["logit_scale"] = torch.zeros(())
    strict_load(model.text_encoder, state, "text encoder", f"{folder / 'text_encoder'}")
    if (folder / "tokenizer").is_dir():
        if text.kind == "bert":
            model.text_encoder.tokenizer_folder = folder / "tokenizer"
        else:
            tokenizer = ClipTokenizer.from_folder(folder / "tokenizer", text.max_length)
            model.text_encoder.use_tokenizer(tokenizer, f"{folder / 'tokenizer'}")
    if "alphas_cumprod" in extra:
        model.alphas_cumprod = extra["alphas_cumprod"].float()
    return model.eval()


# --- writing one ---------------------------------------------------------------------------------


def save_diffusers(model: LatentDiffusion, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write a diffusers pipeline folder. Written beside the destination, then renamed into place:
    an interrupted conversion never leaves a half-written model."""
    dest = Path(path)
    if dest.exists() and not dest.is_dir():
        raise CheckpointError(f"{dest}: exists and is not a folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        _write_diffusers(model, tmp, dtype)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _cast(state, dtype):
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state.items()}


def _write_diffusers(model: LatentDiffusion, out: Path, dtype) -> None:
    c = model.config
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (out / sub).mkdir()
    _write_unet_and_vae(model, out, dtype)
    extra, text_class = _write_text_encoder(model, out / "text_encoder", dtype)
    tokenizer_class = _write_tokenizer(model, out / "tokenizer")
    scheduler = _scheduler_config(c.schedule)
    write_json(out / "scheduler" / "scheduler_config.json", scheduler)
    if model.alphas_cumprod is not None:
        extra["alphas_cumprod"] = model.alphas_cumprod
    if extra:
        write_safetensors(out / EXTRA, extra, {"format": "pt"})
    pipeline = "StableDiffusionInpaintPipeline" if c.unet.in_channels == 9 else "StableDiffusionPipeline"
    write_json(
        out / "model_index.json",
        {
            "_class_name": pipeline,
            "_diffusers_version": DIFFUSERS_VERSION,
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", text_class],
            "tokenizer": ["transformers", tokenizer_class],
            "scheduler": ["diffusers", scheduler["_class_name"]],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
        },
    )
    write_json(out / "ldmkit.json", c.to_dict())


def _write_unet_and_vae(model: LatentDiffusion, out: Path, dtype) -> None:
    c = model.config
    write_json(out / "unet" / "config.json", unet_config_to_diffusers(c.unet, c.image_size // c.vae.downsample_factor))
    write_safetensors(
        out / "unet" / "diffusion_pytorch_model.safetensors",
        _cast(keymaps.rename(model.unet.state_dict(), keymaps.unet_to_diffusers(c.unet)), dtype),
        {"format": "pt"},
    )
    write_json(out / "vae" / "config.json", vae_config_to_diffusers(c.vae, c.image_size))
    write_safetensors(
        out / "vae" / "diffusion_pytorch_model.safetensors",
        _cast(keymaps.vae_to_diffusers_state(model.vae.state_dict(), c.vae), dtype),
        {"format": "pt"},
    )


def _write_text_encoder(model: LatentDiffusion, folder: Path, dtype) -> tuple[dict[str, torch.Tensor], str]:
    """The text encoder as transformers reads it. Returns what diffusers has no place for (for
    ldmkit_extra.safetensors) and the encoder's transformers class."""
    c, te = model.config, model.text_encoder
    extra: dict[str, torch.Tensor] = {}
    # CLIP weights are written with the `text_model.` prefix that every transformers release reads.
    hf_state = {k: v for k, v in te.transformer.state_dict().items() if not NOT_WEIGHTS.search(k)}
    hf_config = te.hf_model.config.to_dict()
    if c.text.kind == "openclip":
        # diffusers' SD 2 text encoder stops at the layer SD 2 reads; carry the rest along.
        keep = c.text.num_layers - c.text.skip_last_layers
        for k in list(hf_state):
            if k.startswith("text_model.encoder.layers.") and int(k.split(".")[3]) >= keep:
                extra["text_encoder.transformer." + k] = hf_state.pop(k)
        extra["text_encoder.text_projection"] = te.text_projection.detach()
        extra["text_encoder.logit_scale"] = te.logit_scale.detach()
        hf_config["num_hidden_layers"] = keep
    hf_config["architectures"] = ["BertModel" if c.text.kind == "bert" else "CLIPTextModel"]
    for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        hf_config.pop(k, None)
    write_json(folder / "config.json", hf_config)
    write_safetensors(folder / "model.safetensors", _cast(hf_state, dtype), {"format": "pt"})
    return extra, hf_config["architectures"][0]


def _write_tokenizer(model: LatentDiffusion, folder: Path) -> str:
    """The tokenizer's files; returns its transformers class."""
    tokenizer = model.text_encoder.tokenizer
    if model.config.text.kind == "bert":
        tokenizer.save(folder)
        return "BertTokenizer"
    _write_clip_tokenizer(folder, tokenizer)
    return "CLIPTokenizer"


def _scheduler_config(schedule: ScheduleConfig) -> dict:
    """The model's own scheduler config, or for a model that came without one the PNDM config SD's
    folders ship; the training schedule's fields always ours."""
    scheduler = schedule.diffusers or {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "clip_sample": False,
        "trained_betas": None,
    }
    return {
        **scheduler,
        "num_train_timesteps": schedule.num_train_timesteps,
        "beta_start": schedule.beta_start,
        "beta_end": schedule.beta_end,
        "beta_schedule": schedule.beta_schedule,
        "prediction_type": schedule.prediction_type,
    }


def _write_clip_tokenizer(folder: Path, tokenizer: ClipTokenizer) -> None:
    """tokenizer.json for current transformers, vocab.json + merges.txt for older readers."""
    tokenizer.save(folder)
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    write_json(folder / "vocab.json", model["vocab"])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
