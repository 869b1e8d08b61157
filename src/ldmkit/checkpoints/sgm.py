"""SDXL's original single-file layout (Stability's `sgm` code; their released files and the web UIs'):
beside the UNet (`model.diffusion_model.*`) and autoencoder (`first_stage_model.*`) of SD files, the text
towers as `conditioner.embedders.N` -- OpenAI CLIP ViT-L in transformers' layout under `transformer.`
(the base's N = 0), OpenCLIP ViT-bigG in its own under `model.` (fused q/k/v, `text_projection` applied
as x @ P; the base's N = 1, the refiner's N = 0). Our Conditioner has the same names but for bigG,
which is a transformers CLIPTextModel here: the towers are read into our names and written back."""

import re

import torch

from ldmkit.checkpoints import keymaps
from ldmkit.checkpoints.components import strip_prefix
from ldmkit.errors import CheckpointError

EMBEDDERS = "conditioner.embedders."
_INDEX = re.compile(r"conditioner\.embedders\.(\d+)\.")
# Each tower kind: its sub-prefix in a file, and what it must hold for its architecture to be read
# (the rest is checked weight by weight when it loads).
LAYOUTS = {
    "clip": (
        "transformer.",
        (
            "text_model.embeddings.token_embedding.weight",
            "text_model.embeddings.position_embedding.weight",
            "text_model.encoder.layers.0.mlp.fc1.weight",
        ),
    ),
    "openclip": (
        "model.",
        ("token_embedding.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc.weight"),
    ),
}
TITLES = {"clip": "CLIP ViT-L", "openclip": "OpenCLIP ViT-bigG"}


def is_sgm(keys) -> bool:
    return any(k.startswith(EMBEDDERS) for k in keys)


def tower_kinds(state: dict[str, torch.Tensor], where: str) -> list[str]:
    """The kind of each `conditioner.embedders.N`, in order ("clip" or "openclip"), each checked to be
    present, of a known layout and complete enough to read; the last must be bigG (the pooled vector)."""
    found = sorted({int(m.group(1)) for k in state if (m := _INDEX.match(k))})
    kinds = []
    for i in range(found[-1] + 1 if found else 0):
        if i not in found:
            raise CheckpointError(f"{where}: conditioner.embedders.{i} is missing (the file has embedders {found})")
        names = [k[len(f"{EMBEDDERS}{i}.") :] for k in state if k.startswith(f"{EMBEDDERS}{i}.")]
        kind = next((kd for kd, (sub, _) in LAYOUTS.items() if all(n.startswith(sub) for n in names)), None)
        if kind is None:
            raise CheckpointError(
                f"{where}: conditioner.embedders.{i}: unknown text tower layout ({sorted(names)[0]}); known: "
                "transformer.text_model.* (CLIP ViT-L), model.* (OpenCLIP ViT-bigG)"
            )
        sub, needs = LAYOUTS[kind]
        lacking = [n for n in needs if sub + n not in names]
        if lacking:
            raise CheckpointError(
                f"{where}: conditioner.embedders.{i} ({TITLES[kind]}) lacks {sub}{lacking[0]}: "
                "a truncated or unknown text tower"
            )
        kinds.append(kind)
    if kinds and kinds[-1] != "openclip":
        raise CheckpointError(
            f"{where}: conditioner.embedders.{len(kinds)} is missing: SDXL's last text tower is OpenCLIP ViT-bigG "
            "(model.*), which gives the UNet its pooled vector"
        )
    return kinds


def tower_shapes(state: dict[str, torch.Tensor], index: int, kind: str) -> dict[str, torch.Tensor]:
    """One tower's tensors in transformers' names (`text_model.*`, plus bigG's `text_projection`), for
    reading its architecture: bigG's fused q/k/v are left out (no shape needs them; splitting reads them)."""
    own = strip_prefix(state, f"{EMBEDDERS}{index}.{LAYOUTS[kind][0]}")
    if kind == "clip":
        return own
    return keymaps.openclip_to_hf({k: v for k, v in own.items() if ".attn.in_proj_" not in k})


def projection_dim(hf: dict[str, torch.Tensor], where: str, index: int) -> int:
    """bigG's pooled width: `text_projection` [hidden, P] (x @ P), or a Linear's [P, hidden] in files
    converted by diffusers' script."""
    if "text_projection" in hf:
        return hf["text_projection"].shape[-1]
    if "text_projection.weight" in hf:
        return hf["text_projection.weight"].shape[0]
    raise CheckpointError(
        f"{where}: conditioner.embedders.{index} (OpenCLIP ViT-bigG) lacks model.text_projection, which makes "
        "the pooled vector"
    )


def state_from_file(state: dict[str, torch.Tensor], kinds: list[str]) -> dict[str, torch.Tensor]:
    """The towers' tensors (file names) in our Conditioner's names (`embedders.N.*`)."""
    out = {}
    for i, kind in enumerate(kinds):
        sub = LAYOUTS[kind][0]
        own = strip_prefix(state, f"{EMBEDDERS}{i}.{sub}")
        if kind == "clip":
            out.update({f"embedders.{i}.{sub}{k}": v for k, v in own.items()})
            continue
        hf = keymaps.openclip_to_hf(own)
        if "text_projection.weight" in hf:  # a Linear (diffusers' script): ours is its transpose
            hf["text_projection"] = hf.pop("text_projection.weight").t().contiguous()
        # CLIP's contrastive temperature, never read; files converted from diffusers lack it.
        hf.setdefault("logit_scale", torch.zeros(()))
        for k, v in hf.items():
            out[f"embedders.{i}." + ("transformer." + k if k.startswith("text_model.") else k)] = v
    return out


def state_to_file(state: dict[str, torch.Tensor], kinds: list[str]) -> dict[str, torch.Tensor]:
    """Our Conditioner's tensors (`embedders.N.*`) in the file's names."""
    out = {}
    for i, kind in enumerate(kinds):
        own = strip_prefix(state, f"embedders.{i}.")
        if kind == "clip":
            out.update({f"{EMBEDDERS}{i}.{k}": v for k, v in own.items()})
            continue
        hf = keymaps.hf_to_openclip({k.removeprefix("transformer."): v for k, v in own.items()})
        out.update({f"{EMBEDDERS}{i}.model.{k}": v for k, v in hf.items()})
    return out
