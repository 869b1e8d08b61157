"""What a file or folder is for — a model (and its family), a ControlNet, a LoRA, an embedding, a VAE —
found cheaply, for `ldmkit models`. A safetensors file is read to the end of its header only: its keys
and shapes become tensors on the meta device and go through the detection `inspect` uses. A PyTorch
file is mapped, not read; a diffusers folder is read through its JSON configs. No weights are read, so
a folder of multi-gigabyte checkpoints lists in moments; the weights are checked when a file loads.
A file that cannot be identified is one entry saying why, never the end of the listing."""

import json
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

from ldmkit.checkpoints import ip_adapter_files
from ldmkit.checkpoints.detect import UNET, VAE_FILE_PREFIXES, detect
from ldmkit.checkpoints.families import FAMILIES, pipeline_family, unsupported_family
from ldmkit.checkpoints.files import (
    ALLOWED_GLOBALS,
    DIFFUSERS,
    SAFETENSORS,
    SAFETENSORS_TORCH,
    TORCH_ZIP,
    _header,
    sniff,
)
from ldmkit.errors import CheckpointError, LdmkitError, UnsupportedModelError

# Files a models folder holds weights in; anything else beside them (configs, previews, notes) is not listed.
WEIGHT_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
# Folders inside a models folder are searched this deep (a web UI's models/Lora/style/x.safetensors).
MAX_DEPTH = 3


def families_summary() -> tuple[list[str], list[str]]:
    """(titles of the families that load, titles of those recognised but not supported yet), from the
    family table. ldmkit's own family is left out: it is what the recipes train, not a download."""
    loads = [f.title for f in FAMILIES.values() if f.supported and f.name != "ldmkit"]
    return loads, [f.title for f in FAMILIES.values() if not f.supported]


def fits(width: int | None) -> list[str]:
    """The supported families whose cross-attention width (the text encoder's) is `width`: the models
    a ControlNet, LoRA or embedding of that width can be used with."""
    return [f.name for f in FAMILIES.values() if f.supported and width and f.adapter_context == width]


def scan(folder: str | Path) -> list[dict]:
    """One entry per weights file or diffusers folder in `folder` (or for `folder` itself if it is a
    file or a diffusers folder), each named by its path relative to `folder`."""
    root = Path(folder)
    if root.is_file() or _is_diffusers(root):
        return [{"name": root.name, **identify(root)}]
    out: list[dict] = []
    _walk(root, root, 0, out)
    return out


def _is_diffusers(path: Path) -> bool:
    try:
        return path.is_dir() and sniff(path) == DIFFUSERS
    except LdmkitError:
        return False


def _walk(root: Path, folder: Path, depth: int, out: list[dict]) -> None:
    try:
        children = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as e:
        out.append({"name": str(folder.relative_to(root)), "path": str(folder), **_unknown(f"unreadable folder ({e})")})
        return
    for p in children:
        name = str(p.relative_to(root))
        if _is_diffusers(p) or (p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES):
            out.append({"name": name, **identify(p)})
        elif p.is_dir() and depth + 1 < MAX_DEPTH:
            _walk(root, p, depth + 1, out)


def identify(path: str | Path) -> dict:
    """What one file or diffusers folder is: {"path", "kind", "size_bytes", ...}; kind is "model", "video-model",
    "controlnet", "lora", "embedding", "vae", or "unknown" with the reason in "note"."""
    p = Path(path)
    info: dict = {"path": str(p), "size_bytes": _size(p)}
    try:
        info.update(_folder(p) if sniff(p) == DIFFUSERS else _file(p))
    except LdmkitError as e:
        info.update(_unknown(str(e).removeprefix(f"{p}: ")))
    except Exception as e:  # a file from anywhere may break a reader in any way: the listing goes on
        info.update(_unknown(f"unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"))
    return info


def _unknown(reason: str) -> dict:
    return {"kind": "unknown", "note": reason}


def _size(p: Path) -> int:
    try:
        if p.is_file():
            return p.stat().st_size
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    except OSError:
        return 0


# --- single files ----------------------------------------------------------------------------------


def _file(p: Path) -> dict:
    fmt = sniff(p)
    if fmt == SAFETENSORS:
        return _classify(*_safetensors_shapes(p), str(p))
    if fmt != TORCH_ZIP:
        return _unknown("an old-style PyTorch pickle, not read for a listing (ldmkit inspect FILE reads it)")
    obj = _mapped_torch_file(p)
    if isinstance(obj, dict) and isinstance(obj.get("string_to_param"), dict):  # the web UI's embedding .pt
        vectors = next(iter(obj["string_to_param"].values()), None)
        if isinstance(vectors, torch.Tensor):
            return _embedding(vectors.shape)
    metadata = {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        metadata = {k: str(obj[k]) for k in ("global_step", "epoch") if isinstance(obj.get(k), int)}
        obj = obj["state_dict"]
    obj = ip_adapter_files.flatten(obj)  # the original IP-Adapter .bin: two nested dicts
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not state:
        raise CheckpointError("a PyTorch file, but it holds no state dict of tensors")
    return _classify(state, metadata, str(p))


def _safetensors_shapes(p: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A safetensors file's tensors as empty meta tensors of their shapes, and its metadata."""
    try:
        with open(p, "rb") as f:
            header, _ = _header(f)
        metadata = dict(header.pop("__metadata__", None) or {})
        state = {
            k: torch.empty(v["shape"], dtype=SAFETENSORS_TORCH.get(v["dtype"], torch.uint8), device="meta")
            for k, v in header.items()
        }
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"corrupt safetensors header ({type(e).__name__}: {str(e)[:120]})") from None
    return state, metadata


def _mapped_torch_file(p: Path):
    """A PyTorch zip file's contents with every tensor mapped from the file, not read; by the same
    safe loader as loading (weights_only, the inert allow-list): pickled code never runs."""
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(os.fspath(p), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = found.group(1) if found else "a non-tensor object"
        raise CheckpointError(f"the file pickles {what}, which is not an inert tensor container: refused") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"truncated or corrupt PyTorch checkpoint ({str(e).splitlines()[0][:120]})") from None


def _classify(state: dict[str, torch.Tensor], metadata: dict, where: str) -> dict:
    keys = set(state)
    from ldmkit.checkpoints.controlnet_files import METADATA_KEY as CONTROLNET_KEY
    from ldmkit.checkpoints.controlnet_files import is_controlnet

    if CONTROLNET_KEY in metadata or is_controlnet(keys):
        return _controlnet(state, metadata)
    if "ldmkit" in metadata or unsupported_family(keys) or any(k.startswith(UNET) for k in keys):
        return _model(state, metadata, where)
    lora = _lora(state)
    if lora is not None:
        return lora
    if "emb_params" in state:
        return _embedding(state["emb_params"].shape)
    if len(state) == 1 and next(iter(state.values())).ndim in (1, 2):  # diffusers' learned_embeds: {token: [d]}
        return _embedding(next(iter(state.values())).shape)
    from ldmkit.checkpoints import taesd_files

    if taesd_files.METADATA_KEY in metadata or taesd_files.is_tiny_autoencoder_state(
        {k: v for k, v in state.items() if k not in taesd_files.COMBINED_EXTRAS}
    ):
        return taesd_files.listing_summary(state, metadata, where)
    if ip_adapter_files.is_ip_adapter_state(state):
        return ip_adapter_files.describe(ip_adapter_files.config_from_state(state, where))
    if any(k.startswith(VAE_FILE_PREFIXES) for k in keys):
        return {"kind": "vae", "note": "an autoencoder alone"}
    detect(state, metadata, where)  # raises the reason it is no model
    raise CheckpointError("not recognised")  # unreachable: detect refuses every file without UNet weights


def _model(state, metadata, where) -> dict:
    from ldmkit.checkpoints import sd3_files

    if sd3_files.file_family(state, metadata) is not None:  # listed with the towers it carries: others may be elsewhere
        return sd3_files.summary(state, metadata, where)
    video = _video(state, metadata)
    if video is not None:
        return video
    try:
        config = detect(state, metadata, where)
    except UnsupportedModelError:
        family = unsupported_family(set(state))
        return {"kind": "model", "family": family.name, "title": family.title, "supported": False}
    return _model_entry(config.family, config.image_size)


def _video(state, metadata) -> dict | None:
    """A video model's entry (its header, or a video family's marker), or None."""
    from ldmkit.checkpoints.families import marked_family
    from ldmkit.checkpoints.svd_file import HEADER

    if HEADER in metadata:
        try:
            config = json.loads(metadata[HEADER])
            return {**_model_entry(str(config["family"]), int(config["width"])), "kind": "video-model"}
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"a video model header that does not read ({str(e)[:80]})") from None
    family = marked_family(state)
    if family is None or family.backbone != "video_unet":
        return None
    return {**_model_entry(family.name, family.image_size), "kind": "video-model"}


def _model_entry(family: str, image_size: int) -> dict:
    known = FAMILIES.get(family)
    title = known.title if known else family
    return {"kind": "model", "family": family, "title": title, "supported": True, "image_size": image_size}


def _controlnet(state, metadata) -> dict:
    from ldmkit.checkpoints.controlnet_files import METADATA_KEY as CONTROLNET_KEY

    width = None
    if CONTROLNET_KEY in metadata:
        width = json.loads(metadata[CONTROLNET_KEY]).get("unet", {}).get("context_dim")
    for k, v in state.items():
        if width is None and k.endswith("attn2.to_k.weight") and v.ndim == 2:
            width = v.shape[1]
    return {"kind": "controlnet", "width": width, "fits": fits(width)}


def _lora(state) -> dict | None:
    from ldmkit.checkpoints.lora_files import _KOHYA, _PEFT, UNSUPPORTED_KINDS

    for marker, kind in UNSUPPORTED_KINDS.items():
        if any(marker in k for k in state):
            raise CheckpointError(f"a {kind} file; ldmkit reads LoRA and LoCon")
    if not any(_KOHYA.match(k) or _PEFT.match(k) for k in state):
        return None
    # The down (A) matrix of a cross-attention key projection takes the text encoder's width.
    widths = {
        v.shape[1]
        for k, v in state.items()
        if ("attn2_to_k.lora_down" in k or "attn2.to_k.lora_A" in k) and v.ndim == 2
    }
    width = widths.pop() if len(widths) == 1 else None
    return {"kind": "lora", "width": width, "fits": fits(width)}


def _embedding(shape) -> dict:
    width = int(shape[-1])
    return {
        "kind": "embedding",
        "vectors": int(shape[0]) if len(shape) == 2 else 1,
        "width": width,
        "fits": fits(width),
    }


# --- diffusers folders -----------------------------------------------------------------------------


def _folder(p: Path) -> dict:
    from ldmkit.checkpoints.diffusers_configs import (
        schedule_from_diffusers,
        unet_config_from_diffusers,
        vae_config_from_diffusers,
    )
    from ldmkit.checkpoints.diffusers_folder import family_of, read_json, text_configs
    from ldmkit.models.ldm import ModelConfig

    index = p / "model_index.json"
    if not index.is_file() and not (p / "unet").is_dir():
        return _component(read_json(p / "config.json"))
    cls = read_json(index).get("_class_name", "diffusers") if index.is_file() else "diffusers"
    family = pipeline_family(str(cls))
    if family is not None and family.backbone == "mmdit":
        return _transformer_folder(p, family)
    if family is not None and family.backbone == "video_unet":
        return _video_folder(p, family)
    if not (p / "unet" / "config.json").is_file():
        raise CheckpointError(f"a {cls} folder without unet/config.json; ldmkit loads UNet pipelines")
    try:
        if (p / "ldmkit.json").is_file():
            saved = ModelConfig.from_dict(read_json(p / "ldmkit.json"), str(p / "ldmkit.json"))
            return _model_entry(saved.family, saved.image_size)
        unet_json = read_json(p / "unet" / "config.json")
        unet = unet_config_from_diffusers(unet_json, "unet/config.json")
        vae = vae_config_from_diffusers(read_json(p / "vae" / "config.json"), "vae/config.json")
        text, text_2 = text_configs(p, {})
        sched = p / "scheduler" / "scheduler_config.json"
        prediction = schedule_from_diffusers(read_json(sched)).prediction_type if sched.is_file() else None
    except LdmkitError as e:
        raise CheckpointError(f"a {cls} folder, not loadable: {str(e).removeprefix(f'{p}/')}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise CheckpointError(f"a {cls} folder with a config value of the wrong kind ({str(e)[:120]})") from None
    family = family_of(text, text_2, unet.in_channels, prediction)
    return _model_entry(family, unet_json.get("sample_size", 64) * vae.downsample_factor)


def _transformer_folder(p: Path, family) -> dict:
    """An SD3 pipeline folder, from its transformer's and autoencoder's configs."""
    from ldmkit.checkpoints.diffusers_configs import vae_config_from_diffusers
    from ldmkit.checkpoints.diffusers_folder import read_json
    from ldmkit.checkpoints.mmdit_keys import config_from_diffusers

    try:
        backbone = config_from_diffusers(read_json(p / "transformer" / "config.json"), "transformer/config.json")
        vae = vae_config_from_diffusers(read_json(p / "vae" / "config.json"), "vae/config.json")
    except LdmkitError as e:
        raise CheckpointError(f"a {family.title} folder, not loadable: {str(e).removeprefix(f'{p}/')}") from None
    return _model_entry(family.name, backbone.sample_size * vae.downsample_factor)


def _video_folder(p: Path, family) -> dict:
    """An SVD pipeline folder, from its UNet's and autoencoder's configs."""
    from ldmkit.checkpoints.diffusers_folder import read_json
    from ldmkit.checkpoints.svd_configs import temporal_vae_config_from_diffusers, video_unet_config_from_diffusers

    try:
        unet_json = read_json(p / "unet" / "config.json")
        video_unet_config_from_diffusers(unet_json, "unet/config.json")
        vae = temporal_vae_config_from_diffusers(read_json(p / "vae" / "config.json"), "vae/config.json")
    except LdmkitError as e:
        raise CheckpointError(f"a {family.title} folder, not loadable: {str(e).removeprefix(f'{p}/')}") from None
    size = unet_json.get("sample_size", 128) * vae.downsample_factor
    return {**_model_entry(family.name, size), "kind": "video-model"}


def _component(config: dict) -> dict:
    """A diffusers folder holding one network (config.json beside its weights)."""
    cls = config.get("_class_name")
    if cls == "ControlNetModel":
        width = config.get("cross_attention_dim")
        return {"kind": "controlnet", "width": width, "fits": fits(width if isinstance(width, int) else None)}
    if cls == "AutoencoderKL":
        return {"kind": "vae", "note": "an autoencoder alone"}
    raise CheckpointError(f"a {cls or 'diffusers'} folder alone; models load as whole pipelines")
