"""IP-Adapter files (models/ip_adapter.py) in the layout they are published in: `image_proj.*` (the
projection) and `ip_adapter.N.to_{k,v}_ip.weight` (one pair per cross-attention of the UNet), flat in
`.safetensors`, or as two nested dicts {"image_proj": ..., "ip_adapter": ...} in the original `.bin` files,
which only the safe loader reads (pickled code never runs).

Everything is read off the weights: the kind (which projection), the widths, the resampler's depth and
heads (64 channels per head, as every published file and diffusers assume), the base family (the context
width, from the family table) and the image tower it needs (the feature width). FaceID adapters, whose
features come from a face recognition model, are refused in one line."""

import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ldmkit.checkpoints.components import layer_indices, strict_load
from ldmkit.checkpoints.families import adapter_family
from ldmkit.checkpoints.files import SAFETENSORS, _header, read_tensors, safe_torch_load, sniff
from ldmkit.checkpoints.image_encoder_files import TOWERS
from ldmkit.errors import CheckpointError, ConfigError
from ldmkit.models.ip_adapter import IPAdapter, IPAdapterConfig

PARTS = ("image_proj", "ip_adapter")
DIM_HEAD = 64


def family_of(c: IPAdapterConfig) -> str:
    """The base family's title (from the family table), or the context width when no family has it."""
    f = adapter_family(c.context_dim)
    return f.title if f else f"a model with {c.context_dim}-wide cross-attention"


def encoder_of(c: IPAdapterConfig) -> str:
    """The image tower an adapter needs, in words."""
    if c.reads_hidden_states:
        name = TOWERS[c.image_dim][0] if c.image_dim in TOWERS else "a CLIP vision tower"
        return f"{name} ({c.image_dim}-wide hidden states)"
    return f"a CLIP vision tower with {c.image_dim}-d image embeddings (ViT-H/14: 1024, ViT-bigG/14: 1280)"


def describe(c: IPAdapterConfig) -> dict:
    return {
        "kind": "ip-adapter",
        "adapter": c.kind,
        "base family": family_of(c),
        "image encoder": encoder_of(c),
        "image tokens": c.tokens if c.kind != "full" else "one per hidden state",
        "cross-attention layers": len(c.layer_widths),
    }


@dataclass
class IPAdapterFile:
    adapter: IPAdapter
    where: str

    @property
    def config(self) -> IPAdapterConfig:
        return self.adapter.config

    @property
    def encoder(self) -> str:
        return encoder_of(self.config)


def flatten(obj):
    """The original .bin layout ({"image_proj": {...}, "ip_adapter": {...}}) as flat keys; else obj as it is."""
    if isinstance(obj, dict) and all(isinstance(obj.get(part), dict) for part in PARTS):
        return {f"{part}.{k}": v for part in PARTS for k, v in obj[part].items()}
    return obj


def _read(p: Path) -> dict[str, torch.Tensor]:
    if sniff(p) == SAFETENSORS:
        return read_tensors(p)[0]
    state = flatten(safe_torch_load(p))
    if not (isinstance(state, dict) and is_ip_adapter_state(state)):
        raise CheckpointError(f"{p}: not an IP-Adapter file (no image_proj and ip_adapter parts)")
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad:
        raise CheckpointError(f"{p}: {bad} is not a tensor")
    return state


def _shape(state: dict, key: str, where: str, ndim: int = 2) -> tuple[int, ...]:
    """A weight's shape, which must have `ndim` positive sizes."""
    if key not in state:
        raise CheckpointError(f"{where}: missing weight {key}")
    shape = tuple(state[key].shape)
    if len(shape) != ndim or min(shape) <= 0:
        raise CheckpointError(f"{where}: weight {key} has shape {shape}; expected {ndim} positive sizes")
    return shape


def _projection(proj: dict, context_dim: int, where: str) -> dict:
    """The kind and widths of the projection (keys without the image_proj. prefix)."""
    if "proj.weight" in proj:
        out, image_dim = _shape(proj, "proj.weight", where)
        if out % context_dim:
            raise CheckpointError(f"{where}: image_proj.proj makes {out} values, no whole number of tokens")
        return dict(kind="base", image_dim=image_dim, tokens=out // context_dim)
    if "proj.3.weight" in proj:
        return dict(kind="full", image_dim=_shape(proj, "proj.0.weight", where)[1], tokens=0)
    if "latents" in proj:
        _, tokens, width = _shape(proj, "latents", where, ndim=3)
        depth = len(layer_indices(proj, "layers.", where))
        if layer_indices(proj, "layers.", where) != list(range(depth)):
            raise CheckpointError(f"{where}: the resampler's layers are not numbered 0, 1, 2, ...")
        inner = _shape(proj, "layers.0.0.to_q.weight", where)[0]
        hidden = _shape(proj, "layers.0.1.1.weight", where)[0]
        return dict(
            kind="plus",
            image_dim=_shape(proj, "proj_in.weight", where)[1],
            tokens=tokens,
            width=width,
            depth=depth,
            heads=max(1, inner // DIM_HEAD),
            dim_head=inner // max(1, inner // DIM_HEAD),
            ff_mult=max(1, hidden // width),
        )
    if any(k.startswith("perceiver_resampler.") for k in proj) or ("proj.0.weight" in proj and "norm.weight" in proj):
        raise CheckpointError(
            f"{where}: an IP-Adapter FaceID file: its embeddings come from a face recognition model, "
            "which ldmkit does not run"
        )
    raise CheckpointError(f"{where}: an image_proj ldmkit does not know (not base, plus or full)")


def config_from_state(state: dict[str, torch.Tensor], where: str) -> IPAdapterConfig:
    """The adapter's config, from names and shapes alone."""
    proj = {k[len("image_proj.") :]: v for k, v in state.items() if k.startswith("image_proj.")}
    layers = {k for k in state if k.startswith("ip_adapter.")}
    if not proj or not layers:
        raise CheckpointError(f"{where}: not an IP-Adapter file (no image_proj.* and ip_adapter.* weights)")
    ids = layer_indices(layers, "ip_adapter.", where)
    if ids != list(range(1, 2 * len(ids), 2)):
        raise CheckpointError(f"{where}: ip_adapter layers numbered {ids[:6]}...; expected 1, 3, 5, ...")
    widths = tuple(_shape(state, f"ip_adapter.{i}.to_k_ip.weight", where)[0] for i in ids)
    context_dim = _shape(state, "ip_adapter.1.to_k_ip.weight", where)[1]
    fields = _projection(proj, context_dim, where)
    if fields["kind"] == "plus" and fields["dim_head"] * fields["heads"] != proj["layers.0.0.to_q.weight"].shape[0]:
        raise CheckpointError(f"{where}: the resampler's attention width is no multiple of {DIM_HEAD}")
    return IPAdapterConfig(context_dim=context_dim, layer_widths=widths, **fields)


def adapter_from_state(state: dict[str, torch.Tensor], where: str) -> IPAdapter:
    """Built empty (on the meta device) and given the file's tensors: every shape is checked against the
    file's before anything is allocated, so sizes a file declares cost nothing until they are there."""
    config = config_from_state(state, where)
    with torch.device("meta"):
        adapter = IPAdapter(config)
    strict_load(adapter, state, "IP-Adapter", where)
    return adapter.eval()


def read_ip_adapter(path: str | Path) -> IPAdapterFile:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such IP-Adapter file")
    state = _read(p)
    try:
        return IPAdapterFile(adapter_from_state(state, str(p)), str(p))
    except (ConfigError, ValueError, TypeError, ZeroDivisionError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"{p}: not a readable IP-Adapter ({str(e).splitlines()[0][:160]})") from None


def is_ip_adapter_state(state: dict) -> bool:
    keys = [k for k in state if isinstance(k, str)]
    return any(k.startswith("image_proj.") for k in keys) and any(k.startswith("ip_adapter.") for k in keys)


def is_ip_adapter_file(path: str | Path) -> bool:
    """A safetensors file whose header names both parts, or a .bin file that holds them."""
    p = Path(path)
    if not p.is_file():
        return False
    if sniff(p) == SAFETENSORS:
        with open(p, "rb") as f:
            try:
                return is_ip_adapter_state(_header(f)[0])
            except (OSError, ValueError, OverflowError, MemoryError, RecursionError, struct.error):
                return False
    if p.suffix.lower() != ".bin":
        return False
    try:
        state = flatten(safe_torch_load(p))
        return isinstance(state, dict) and is_ip_adapter_state(state)
    except (CheckpointError, TypeError, ValueError, RecursionError):  # however malformed: not an adapter
        return False


def find_image_encoder(adapter_path: str | Path) -> Path | None:
    """Where the published adapters keep their tower: image_encoder/ beside the file or one folder up
    (h94/IP-Adapter: models/image_encoder, sdxl_models/image_encoder)."""
    here = Path(adapter_path).absolute().parent
    for folder in (here / "image_encoder", here.parent / "image_encoder"):  # not resolved: a cache's symlinks
        if (folder / "config.json").is_file():
            return folder
    return None
