"""LoRA (Hu et al. 2021), merged into a model's weights and removed exactly, and the prompt's
<lora:NAME:WEIGHT> tags. The files are read by checkpoints/lora_files.py.

A LoRA is, per layer, a low-rank update W <- W + strength * (alpha / rank) * up @ down. Layouts read:
- kohya / the popular web UI: `lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha` and
  `lora_te_<module>...` (SDXL: `lora_te1_` CLIP-L, `lora_te2_` OpenCLIP-bigG), module paths with dots as
  underscores, in diffusers' or the original LDM's (sgm's) names; LoCon-style updates of convolutions
  (down [r, in, k, k], up [out, r, 1, 1]);
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight`, `text_encoder.<module>...`,
  `text_encoder_2.<module>...` (SDXL's bigG); alpha from the file's adapter metadata when present (each
  network's lora_alpha, alpha_pattern, rsLoRA), else the rank: scale 1.

Merging keeps a copy of each touched weight; removing puts the copies back, so switching LoRAs
restores the originals bit for bit and never needs a reload."""

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ldmkit.errors import ConfigError


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

    hash: str  # the file's, as infotexts name it (checkpoints/lora_files.lora_hash)


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
