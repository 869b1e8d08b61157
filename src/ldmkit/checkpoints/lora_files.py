"""LoRA files as they circulate (models/lora.py says what a LoRA is and how it is merged): read in the
kohya / popular web UI layout and the diffusers / PEFT layout, checked against the model, found by
name in a folder, and hashed as the web UI's infotexts name them.

SDXL's text towers are named as diffusers loads them: the CLIP-L tower is `text_encoder` (kohya's
`lora_te1_`, or `lora_te_`), OpenCLIP-bigG `text_encoder_2` (`lora_te2_`), also in the refiner, whose only
tower is bigG. sd-scripts names SDXL's UNet modules by the original (sgm) names, flattened with
underscores; diffusers' names are read too, as in latent-consistency's lcm-lora-sdxl: a UNet-only kohya file
over diffusers' names, e.g. `lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight` (tests/test_sdxl_lcm.py)."""

import json
import re
from pathlib import Path

import torch
import torch.nn as nn

from ldmkit.checkpoints.families import FAMILIES
from ldmkit.checkpoints.files import file_in_folder, listed, names_in_folder, read_tensors, sha256_file
from ldmkit.checkpoints.keymaps import rename, unet_to_diffusers
from ldmkit.errors import CheckpointError, ConfigError
from ldmkit.models.lora import Lora, Patch

FILE_SUFFIXES = (".safetensors", ".pt", ".ckpt")
UNSUPPORTED_KINDS = {
    "lora_mid": "LoCon with a Tucker-decomposed middle (lora_mid)",
    "hada_w1_a": "LoHa",
    "lokr_w1": "LoKr",
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
}
NETWORKS = ("unet", "text_encoder", "text_encoder_2")  # diffusers' names, as PEFT keys and metadata use them


def module_names(model) -> dict[str, tuple[str, str]]:
    """Every name a LoRA file may use for one of the model's layers -> (network, our module path)."""
    names: dict[str, tuple[str, str]] = {}
    layers = (nn.Linear, nn.Conv2d)
    ours = [n for n, m in model.unet.named_modules() if isinstance(m, layers)]
    theirs = rename({n + ".weight": None for n in ours}, unet_to_diffusers(model.config.unet))
    for n, d in zip(ours, (k[: -len(".weight")] for k in theirs)):
        for alias in ("lora_unet_" + d.replace(".", "_"), "lora_unet_" + n.replace(".", "_"), "unet." + d):
            names[alias] = ("unet", n)
    for root, tower, prefixes in _text_towers(model):
        for n, m in tower.named_modules():
            if isinstance(m, layers) and n.startswith("transformer."):
                hf = n[len("transformer.") :]  # text_model.encoder...: transformers 5 drops the text_model level
                for path in (hf, hf.removeprefix("text_model.")):
                    for prefix in prefixes:
                        flat = path.replace(".", "_") if prefix.startswith("lora_") else path
                        names[prefix + flat] = ("text", root + n)
    return names


def _text_towers(model) -> list[tuple[str, nn.Module, tuple[str, ...]]]:
    """(path within model.text_encoder, tower, the prefixes files name its layers by) of each text tower.
    SDXL (the conditioner's towers): the last one, bigG, is diffusers' text_encoder_2 (the refiner's too);
    the one before it, CLIP-L, text_encoder (diffusers reads kohya's lora_te_ as lora_te1_)."""
    te = model.text_encoder
    if not hasattr(te, "embedders"):
        return [("", te, ("lora_te_", "text_encoder."))]
    last = len(te.embedders) - 1
    first = ("lora_te1_", "lora_te_", "text_encoder.")
    return [
        (f"embedders.{i}.", e, ("lora_te2_", "text_encoder_2.") if i == last else first)
        for i, e in enumerate(te.embedders)
    ]


def _peft_configs(metadata: dict) -> dict[str, dict]:
    """Each network's PEFT config from diffusers' "lora_adapter_metadata": flat keys prefixed by the network
    ("unet.lora_alpha", as a pipeline's save_lora_weights writes), nested per network, or one unprefixed
    config (a model's own save_lora_adapter; key "" here, for every network)."""
    try:
        cfg = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except (ValueError, TypeError):
        return {}
    if not isinstance(cfg, dict):
        return {}
    out: dict[str, dict] = {}
    for key, value in cfg.items():
        net, _, field = key.partition(".")
        if net in NETWORKS and field:
            out.setdefault(net, {})[field] = value
        elif key in NETWORKS and isinstance(value, dict):
            out[key] = value
    return out or {"": cfg}


def _peft_alpha(configs: dict[str, dict], prefix: str, rank: int) -> float | None:
    """The alpha PEFT scales a diffusers-layout layer by: the network's lora_alpha, or its alpha_pattern's
    entry for this module (module names matched literally, as diffusers writes them, not as regexes),
    times sqrt(rank) with rsLoRA (scale alpha / sqrt(rank)). None: no record (scale 1, as diffusers)."""
    net, _, module = prefix.partition(".")
    cfg = configs.get(net) or configs.get("") or {}
    alpha = cfg.get("lora_alpha")
    pattern = cfg.get("alpha_pattern")
    for key, value in pattern.items() if isinstance(pattern, dict) else ():
        if module == key or module.endswith("." + key):
            alpha = value
            break
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        return None
    return float(alpha) * (rank**0.5 if cfg.get("use_rslora") is True else 1.0)


_KOHYA = re.compile(r"^(lora_(?:unet|te\d?)_.+?)\.(lora_down|lora_up)\.weight$")
_PEFT = re.compile(r"^((?:unet|text_encoder|text_encoder_2)\..+?)\.(lora_A|lora_B)(?:\.default)?\.weight$")


def read_lora(path: str | Path, model, name: str | None = None) -> Lora:
    """A LoRA file in any supported layout, checked against the model: every layer must exist and
    fit, or the file is refused with one line naming it."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise CheckpointError(f"{where}: no such LoRA file")
    state, metadata = read_tensors(path)
    for marker, kind in UNSUPPORTED_KINDS.items():
        if any(marker in k for k in state):
            raise CheckpointError(f"{where}: a {kind} file; ldmkit reads LoRA and LoCon")
    peft = _peft_configs(metadata)  # diffusers' record of the PEFT configs
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = _KOHYA.match(key) or _PEFT.match(key)
        if m:
            role = {"lora_down": "down", "lora_A": "down", "lora_up": "up", "lora_B": "up"}[m.group(2)]
            pairs.setdefault(m.group(1), {})[role] = value
    if not pairs:
        raise CheckpointError(f"{where}: not a LoRA file (no lora_down/lora_up or lora_A/lora_B weights)")
    _refuse_without_unet(pairs, model, where)
    names = module_names(model)
    unet_modules = dict(model.unet.named_modules())
    text_modules = dict(model.text_encoder.named_modules())
    patches, unknown, misfit = [], [], []
    for prefix, p in sorted(pairs.items()):
        if set(p) != {"down", "up"}:
            raise CheckpointError(f"{where}: {prefix} has only lora_{next(iter(p))}")
        if prefix not in names:
            unknown.append(prefix)
            continue
        target, module = names[prefix]
        alpha = state.get(prefix + ".alpha")
        if alpha is not None:
            alpha = float(alpha)
        elif not prefix.startswith("lora_"):
            alpha = _peft_alpha(peft, prefix, p["down"].shape[0])
        patch = Patch(target, module, p["down"], p["up"], alpha)
        weight = (unet_modules if target == "unet" else text_modules)[module].weight
        try:
            patch.delta(weight.shape)
        except ValueError as e:
            misfit.append(f"{prefix} ({e})")
            continue
        patches.append(patch)
    if unknown or misfit:
        what = f"{len(unknown)} of its layers match nothing in this model (e.g. {unknown[0]})" if unknown else ""
        what += ("; " if what else "") + (f"wrong shapes: {misfit[0]}" if misfit else "")
        raise CheckpointError(f"{where}: a LoRA for another architecture: {what}")
    return Lora(name or path.stem, path, patches, lora_hash(path))


def _refuse_without_unet(pairs: dict, model, where: str) -> None:
    """The layouts read here name U-Net models' layers: a model whose denoiser is a transformer (its family
    row's backbone) takes none of them."""
    family = FAMILIES.get(model.config.family)
    if family is None or family.backbone == "unet":
        return
    unet = any(p.startswith(("lora_unet_", "unet.")) for p in pairs)
    what = "a LoRA for a U-Net model" if unet else "a LoRA"
    raise CheckpointError(f"{where}: {what}; this model is {family.title} (a transformer), which takes no LoRAs yet")


def find_lora(name: str, folder: str | Path | None) -> Path:
    """NAME in a LoRA folder (any supported suffix), or one line listing what is there. A name leaving
    the folder, a missing file and a file that is not a LoRA are refused alike: the message never says
    whether something exists outside the folder."""
    path = file_in_folder(name, folder, FILE_SUFFIXES)
    if path is not None:
        return path
    where = "in the LoRA folder" if folder is not None else "(no LoRA folder given: --lora-dir)"
    raise ConfigError(f"unknown LoRA {name!r} {where}; available: {listed(list_loras(folder)) or 'none'}")


def list_loras(folder: str | Path | None) -> list[str]:
    """The names find_lora accepts: LoRA files directly in the folder, not symlinks leading out of it."""
    return names_in_folder(folder, FILE_SUFFIXES)


def lora_hash(path: Path) -> str:
    """The first 12 hex digits of the file's sha256 (how the popular UI's infotexts name LoRAs)."""
    return sha256_file(path)[:12]
