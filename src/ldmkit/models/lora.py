"""LoRA (Hu et al. 2021) files as they circulate, merged into a model's weights and removed exactly.

A LoRA is, per layer, a low-rank update W <- W + strength * (alpha / rank) * up @ down. Layouts read:
- kohya / the popular web UI: `lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha` and
  `lora_te_<module>...`, module paths with dots as underscores, in diffusers' or the original LDM's
  names; LoCon-style updates of convolutions (down [r, in, k, k], up [out, r, 1, 1]);
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight`, `text_encoder.<module>...`
  (alpha from the file's adapter metadata when present, else the rank: scale 1).

Merging keeps a copy of each touched weight; removing puts the copies back, so switching LoRAs
restores the originals bit for bit and never needs a reload."""

import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import torch.nn as nn

from ldmkit.errors import CheckpointError, ConfigError

FILE_SUFFIXES = (".safetensors", ".pt", ".ckpt")
UNSUPPORTED_KINDS = {
    "lora_mid": "LoCon with a Tucker-decomposed middle (lora_mid)",
    "hada_w1_a": "LoHa",
    "lokr_w1": "LoKr",
    "dora_scale": "DoRA",
}


@dataclass
class Patch:
    target: str  # "unet" | "text"
    module: str  # our module path within that network
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """The full update for a weight of `shape` (linear or convolution), fp32, without strength."""
        scale = (self.alpha / self.rank) if self.alpha is not None else 1.0
        d = self.up.float().flatten(1) @ self.down.float().flatten(1)  # [out, in * k * k]
        if d.numel() != torch.Size(shape).numel():
            raise ValueError(f"update of {tuple(d.shape)} for a weight of {tuple(shape)}")
        return (d * scale).reshape(shape)


@dataclass
class Lora:
    name: str
    path: Path
    patches: list[Patch]

    @cached_property
    def hash(self) -> str:
        """For infotexts: computed once per loaded file, not once per image."""
        return lora_hash(self.path)


def module_names(model) -> dict[str, tuple[str, str]]:
    """Every name a LoRA file may use for one of the model's layers -> (network, our module path)."""
    from ldmkit.checkpoints.keymaps import rename, unet_to_diffusers

    names: dict[str, tuple[str, str]] = {}
    layers = (nn.Linear, nn.Conv2d)
    ours = [n for n, m in model.unet.named_modules() if isinstance(m, layers)]
    theirs = rename({n + ".weight": None for n in ours}, unet_to_diffusers(model.config.unet))
    for n, d in zip(ours, (k[: -len(".weight")] for k in theirs)):
        for alias in ("lora_unet_" + d.replace(".", "_"), "lora_unet_" + n.replace(".", "_"), "unet." + d):
            names[alias] = ("unet", n)
    for n, m in model.text_encoder.named_modules():
        if isinstance(m, layers) and n.startswith("transformer."):
            hf = n[len("transformer.") :]  # text_model.encoder...: transformers 5 drops the text_model level
            for path in (hf, hf.removeprefix("text_model.")):
                for alias in ("lora_te_" + path.replace(".", "_"), "text_encoder." + path):
                    names[alias] = ("text", n)
    return names


_KOHYA = re.compile(r"^(lora_(?:unet|te\d?)_.+?)\.(lora_down|lora_up)\.weight$")
_PEFT = re.compile(r"^((?:unet|text_encoder|text_encoder_2)\..+?)\.(lora_A|lora_B)(?:\.default)?\.weight$")


def read_lora(path: str | Path, model, name: str | None = None) -> Lora:
    """A LoRA file in any supported layout, checked against the model: every layer must exist and
    fit, or the file is refused with one line naming it."""
    from ldmkit.checkpoints.files import read_tensors

    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise CheckpointError(f"{where}: no such LoRA file")
    state, metadata = read_tensors(path)
    for marker, kind in UNSUPPORTED_KINDS.items():
        if any(marker in k for k in state):
            raise CheckpointError(f"{where}: a {kind} file; ldmkit reads LoRA and LoCon")
    alpha_meta = None
    if "lora_adapter_metadata" in metadata:  # diffusers' record of the PEFT config
        try:
            cfg = json.loads(metadata["lora_adapter_metadata"])
            alpha_meta = cfg.get("lora_alpha") or next(iter(cfg.values()), {}).get("lora_alpha")
        except (ValueError, AttributeError, StopIteration):
            alpha_meta = None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = _KOHYA.match(key) or _PEFT.match(key)
        if m:
            role = {"lora_down": "down", "lora_A": "down", "lora_up": "up", "lora_B": "up"}[m.group(2)]
            pairs.setdefault(m.group(1), {})[role] = value
    if not pairs:
        raise CheckpointError(f"{where}: not a LoRA file (no lora_down/lora_up or lora_A/lora_B weights)")
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
        alpha = float(alpha) if alpha is not None else alpha_meta
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
    return Lora(name or path.stem, path, patches)


class LoraSet:
    """The LoRAs merged into a model's weights, with exact removal."""

    def __init__(self, model):
        self.model = model
        self._originals: dict[tuple[str, str], torch.Tensor] = {}
        self.applied: list[tuple[str, float]] = []

    def _weight(self, target: str, module: str) -> torch.Tensor:
        net = self.model.unet if target == "unet" else self.model.text_encoder
        return net.get_submodule(module).weight

    @torch.no_grad()
    def apply(self, loras: list[tuple[Lora, float]]) -> None:
        """Make exactly these LoRAs (with these strengths) the merged ones."""
        wanted = [(str(lora.path), float(s)) for lora, s in loras]
        if wanted == self.applied:
            return
        self.remove()
        for lora, strength in loras:
            for p in lora.patches:
                w = self._weight(p.target, p.module)
                self._originals.setdefault((p.target, p.module), w.detach().clone())
                w.add_((p.delta(w.shape) * strength).to(w.dtype))
        self.applied = wanted

    @torch.no_grad()
    def remove(self) -> None:
        for (target, module), original in self._originals.items():
            self._weight(target, module).copy_(original)
        self._originals.clear()
        self.applied = []


_TAG = re.compile(r"<lora:([^>]*)>")


def parse_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its <lora:NAME[:WEIGHT]> tags, and the tags' (name, weight) pairs."""
    found = []
    for m in _TAG.finditer(prompt):
        parts = m.group(1).split(":")
        if not parts[0].strip() or len(parts) > 3:
            raise ConfigError(f"malformed tag {m.group(0)!r}; expected <lora:NAME> or <lora:NAME:WEIGHT>")
        try:
            weight = float(parts[1]) if len(parts) > 1 and parts[1].strip() else 1.0
        except ValueError:
            raise ConfigError(f"malformed tag {m.group(0)!r}: weight {parts[1]!r} is not a number") from None
        found.append((parts[0].strip(), weight))
    return _TAG.sub("", prompt), found


def find_lora(name: str, folder: str | Path | None) -> Path:
    """NAME in a LoRA folder (any supported suffix), or one clear line listing what is there."""
    if folder is not None:
        for suffix in FILE_SUFFIXES:
            path = Path(folder).expanduser() / f"{name}{suffix}"
            if path.is_file():
                return path
    available = ", ".join(list_loras(folder)) or "none"
    where = f"in {folder}" if folder else "(no LoRA folder given: --lora-dir)"
    raise ConfigError(f"unknown LoRA {name!r} {where}; available: {available}")


def list_loras(folder: str | Path | None) -> list[str]:
    if folder is None or not Path(folder).expanduser().is_dir():
        return []
    return sorted(p.stem for p in Path(folder).expanduser().iterdir() if p.suffix in FILE_SUFFIXES)


def lora_hash(path: Path) -> str:
    """The first 12 hex digits of the file's sha256 (how the popular UI's infotexts name LoRAs)."""
    from ldmkit.checkpoints.files import sha256_file

    return sha256_file(path)[:12]
