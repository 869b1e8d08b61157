"""A diffusers pipeline folder's text towers (text_encoder/, tokenizer/, and SDXL's text_encoder_2/,
tokenizer_2/), read into ours and written back, and the folder-reading helpers the folder reader shares."""

import json
from dataclasses import replace
from pathlib import Path

import torch

from ldmkit.checkpoints.components import strict_load
from ldmkit.checkpoints.detect import NOT_WEIGHTS
from ldmkit.checkpoints.families import sd_family
from ldmkit.checkpoints.files import read_tensors, write_json, write_safetensors
from ldmkit.errors import CheckpointError
from ldmkit.models.ldm import LatentDiffusion
from ldmkit.models.text import TextEncoderConfig, text_config_from_hf
from ldmkit.models.tokenizers import ClipTokenizer


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data


def component_weights(
    folder: Path, names: tuple[str, ...], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """A component's weights: safetensors first, then the fp16 variant, then `.bin` (safe loader); each
    whole or in shards named by its `.index.json` (what save_pretrained writes above 10 GB, e.g. SDXL's
    fp32 UNet). dtype: a safetensors file's floating tensors converted to it as they are read."""
    rule = None if dtype is None else (lambda k: dtype)
    for name in names:
        stem, ext = name.rsplit(".", 1)
        for candidate in (name, f"{stem}.fp16.{ext}"):
            if (folder / candidate).exists():
                return read_tensors(folder / candidate, rule)[0]
            if (folder / f"{candidate}.index.json").exists():
                state = {}
                for shard in _shards(folder, folder / f"{candidate}.index.json"):
                    state.update(read_tensors(shard, rule)[0])
                return state
    raise CheckpointError(f"{folder}: no weights file (looked for {', '.join(names)})")


def _shards(folder: Path, index: Path) -> list[Path]:
    """The shard files an index names: plain file names beside it, each present (an index is a file from
    anywhere: it never reaches outside the folder)."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no weight_map")
    names = sorted({v for v in weight_map.values()})
    for n in names:
        if not isinstance(n, str) or Path(n).name != n or n in (".", "..") or not (folder / n).is_file():
            raise CheckpointError(f"{index}: names a shard {str(n)[:100]!r} that is not a file of {folder.name}/")
    return [folder / n for n in names]


def cast_floats(state, dtype):
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state.items()}


# --- text encoder --------------------------------------------------------------------------------


def _clip_kind(hf: dict, pad: str) -> str:
    """SD 2's OpenCLIP tower is a CLIPTextModel in diffusers: what tells it from OpenAI's CLIP is what
    OpenCLIP does differently, both together: gelu (not quick_gelu) and padding with "!" (not the
    end-of-text token). The kind decides only the single-file layout it is written in."""
    return "openclip" if hf.get("hidden_act") == "gelu" and pad == "!" else "clip"


def _text_config(folder: Path, saved: TextEncoderConfig | None, extra: dict) -> TextEncoderConfig:
    hf = read_json(folder / "text_encoder" / "config.json")
    if saved is not None:
        return saved
    if hf.get("model_type") == "bert":
        return text_config_from_hf(hf, "bert")
    pad, length = _tokenizer_facts(folder / "tokenizer")
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


def _tokenizer_facts(folder: Path) -> tuple[str, int]:
    """(pad token, model_max_length) of a tokenizer folder (CLIP's when it has none)."""
    pad, length = "<|endoftext|>", 77
    tok = folder / "tokenizer_config.json"
    if tok.exists():
        tok_cfg = read_json(tok)
        p = tok_cfg.get("pad_token", pad)
        pad = p["content"] if isinstance(p, dict) else p
        length = int(min(tok_cfg.get("model_max_length", length), 1 << 30))
    return pad, length


# SDXL's towers (text_encoder/ CLIP-L if present, text_encoder_2/ OpenCLIP-bigG): read at the
# penultimate layer without the final norm, the last one also pooled through its projection.
SDXL_TOWERS = (("text_encoder", "tokenizer", "clip"), ("text_encoder_2", "tokenizer_2", "openclip"))


def _sdxl_text_configs(folder: Path) -> list[TextEncoderConfig]:
    out = []
    for sub, tok, kind in SDXL_TOWERS:
        if not (folder / sub / "config.json").exists():
            continue
        pad, length = _tokenizer_facts(folder / tok)
        c = text_config_from_hf(read_json(folder / sub / "config.json"), kind)
        out.append(replace(c, pad_token=pad, max_length=min(length, c.max_position_embeddings), skip_last_layers=1))
    if not out or not (folder / "text_encoder_2" / "config.json").exists():
        raise CheckpointError(f"{folder}: an SDXL-style folder without text_encoder_2/config.json")
    out = [replace(c, final_norm=False) for c in out]
    out[-1] = replace(out[-1], pooled=True)
    return out


def load_sdxl_towers(model: LatentDiffusion, folder: Path, extra: dict) -> None:
    towers = [(sub, tok) for sub, tok, _ in SDXL_TOWERS if (folder / sub / "config.json").exists()]
    for (sub, tok), encoder in zip(towers, model.text_encoder.embedders):
        te = component_weights(folder / sub, ("model.safetensors", "pytorch_model.bin"))
        te = {k: v for k, v in te.items() if not NOT_WEIGHTS.search(k)}
        state = {}
        for k, v in te.items():
            if k == "text_projection.weight":  # transformers' Linear: our x @ P is its weight transposed
                state["text_projection"] = v.t().contiguous()
            else:
                state["transformer." + (k if k.startswith("text_model.") else "text_model." + k)] = v
        if encoder.config.kind == "openclip":  # diffusers has no place for it: ldmkit_extra, or zeros
            state.setdefault("text_projection", torch.zeros_like(encoder.text_projection))
            state["logit_scale"] = extra.get(f"{sub}.logit_scale", torch.zeros(()))
        strict_load(encoder, state, "text encoder", f"{folder / sub}")
        if (folder / tok).is_dir():
            encoder.use_tokenizer(ClipTokenizer.from_folder(folder / tok, encoder.config.max_length), str(folder / tok))


def text_configs(folder: Path, extra: dict) -> tuple[TextEncoderConfig, TextEncoderConfig | None]:
    """(first tower, second tower or None) of a pipeline folder, from its configs alone."""
    if (folder / "text_encoder_2").is_dir():
        towers = _sdxl_text_configs(folder)
        return towers[0], (towers[1] if len(towers) > 1 else None)
    return _text_config(folder, None, extra), None


def family_of(text: TextEncoderConfig, text_2: TextEncoderConfig | None, in_channels: int, prediction) -> str:
    return sd_family(text.kind, in_channels, prediction, text_2, (text_2 or text).pooled).name


def load_text_tower(model: LatentDiffusion, folder: Path, text: TextEncoderConfig, extra: dict) -> None:
    te = component_weights(folder / "text_encoder", ("model.safetensors", "pytorch_model.bin"))
    te = {k: v for k, v in te.items() if not NOT_WEIGHTS.search(k)}
    if text.kind == "bert":
        te = {k.removeprefix("bert."): v for k, v in te.items() if not k.startswith(("pooler.", "bert.pooler."))}
        state = {"transformer." + k: v for k, v in te.items()}
    else:
        # Files written by transformers 5 drop the `text_model.` prefix; older ones have it.
        state = {"transformer." + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in te.items()}
    state.update({k[len("text_encoder.") :]: v for k, v in extra.items() if k.startswith("text_encoder.")})
    if text.kind == "openclip" and "text_projection" not in state:
        # diffusers keeps neither of these (SD 2 never reads them); zeros stand in for them, of the
        # config's projection_dim (transformers' default 512 under a tower 1024 wide), which need not be the width
        state["text_projection"] = torch.zeros(text.hidden_size, text.projection_dim or text.hidden_size)
        state["logit_scale"] = torch.zeros(())
    strict_load(model.text_encoder, state, "text encoder", f"{folder / 'text_encoder'}")
    if (folder / "tokenizer").is_dir():
        if text.kind == "bert":
            model.text_encoder.tokenizer_folder = folder / "tokenizer"
        else:
            tokenizer = ClipTokenizer.from_folder(folder / "tokenizer", text.max_length)
            model.text_encoder.use_tokenizer(tokenizer, f"{folder / 'tokenizer'}")


# --- writing ---------------------------------------------------------------------------------------


def write_text_encoder(model: LatentDiffusion, folder: Path, dtype) -> tuple[dict[str, torch.Tensor], str]:
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
    write_safetensors(folder / "model.safetensors", cast_floats(hf_state, dtype), {"format": "pt"})
    return extra, hf_config["architectures"][0]


def write_tokenizer(model: LatentDiffusion, folder: Path) -> str:
    """The tokenizer's files; returns its transformers class."""
    tokenizer = model.text_encoder.tokenizer
    if model.config.text.kind == "bert":
        tokenizer.save(folder)
        return "BertTokenizer"
    _write_clip_tokenizer(folder, tokenizer)
    return "CLIPTokenizer"


def _write_clip_tokenizer(folder: Path, tokenizer: ClipTokenizer) -> None:
    """tokenizer.json for current transformers, vocab.json + merges.txt for older readers."""
    tokenizer.save(folder)
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    write_json(folder / "vocab.json", model["vocab"])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def write_sdxl_towers(model: LatentDiffusion, out: Path, dtype) -> tuple[dict[str, torch.Tensor], dict]:
    """SDXL's towers as diffusers has them (text_encoder/ CLIPTextModel when there are two, text_encoder_2/
    CLIPTextModelWithProjection, their tokenizers). Returns what diffusers has no place for (OpenCLIP's
    logit_scale) and the model_index.json entries."""
    embedders = list(model.text_encoder.embedders)
    names = SDXL_TOWERS[-len(embedders) :]
    extra, index = {}, {"text_encoder": [None, None], "tokenizer": [None, None]}
    for (sub, tok, _), encoder in zip(names, embedders):
        (out / sub).mkdir()
        (out / tok).mkdir()
        state = {k: v for k, v in encoder.transformer.state_dict().items() if not NOT_WEIGHTS.search(k)}
        hf_config = encoder.hf_model.config.to_dict()
        cls = "CLIPTextModel"
        if encoder.config.pooled:
            cls = "CLIPTextModelWithProjection"
            state["text_projection.weight"] = encoder.text_projection.detach().t().contiguous()
            hf_config["projection_dim"] = encoder.text_projection.shape[1]
        if encoder.config.kind == "openclip":
            extra[f"{sub}.logit_scale"] = encoder.logit_scale.detach()
        hf_config["architectures"] = [cls]
        for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
            hf_config.pop(k, None)
        write_json(out / sub / "config.json", hf_config)
        write_safetensors(out / sub / "model.safetensors", cast_floats(state, dtype), {"format": "pt"})
        _write_clip_tokenizer(out / tok, encoder.tokenizer)
        index[sub], index[tok] = ["transformers", cls], ["transformers", "CLIPTokenizer"]
    index["force_zeros_for_empty_prompt"] = model.config.zero_empty_negative
    return extra, index
