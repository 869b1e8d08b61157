"""ControlNet files: the original layout (`control_model.*`, or the same keys bare), diffusers
`ControlNetModel` folders and single files, and ours (original layout + config in the header).

The architecture comes from the weights. Head counts are not in the weights: they come from the
base model the ControlNet is used with (which it must match anyway) or, alone, from the family
rules of Stable Diffusion (context 768: SD 1.x, 8 heads; 1024: SD 2.x, 64 channels per head)."""

import json
import re
from dataclasses import replace
from pathlib import Path

import torch

from ldmkit.checkpoints import keymaps
from ldmkit.checkpoints.components import strict_load, strip_prefix
from ldmkit.checkpoints.detect import NOT_WEIGHTS, unet_config_from_weights
from ldmkit.checkpoints.families import FAMILIES, controlnet_family
from ldmkit.checkpoints.files import read_tensors, write_json, write_safetensors
from ldmkit.config import from_dict, to_dict
from ldmkit.errors import CheckpointError
from ldmkit.models.controlnet import ControlNet, ControlNetConfig
from ldmkit.models.unet import UNetConfig

PREFIX = "control_model."
METADATA_KEY = "ldmkit_controlnet"
WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def is_controlnet(keys) -> bool:
    return any(
        k.startswith((PREFIX + "input_hint_block.", "input_hint_block.", "controlnet_cond_embedding.")) for k in keys
    )


def is_controlnet_path(path: str | Path) -> bool:
    """Whether a file or folder holds a ControlNet (read from content, never the name)."""
    path = Path(path)
    if path.is_dir():
        cfg = path / "config.json"
        try:
            return cfg.is_file() and json.loads(cfg.read_text()).get("_class_name") == "ControlNetModel"
        except (OSError, ValueError):
            return False
    if not path.is_file():
        return False
    from ldmkit.checkpoints.files import SAFETENSORS, sniff

    if sniff(path) == SAFETENSORS:
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return is_controlnet(f.keys())
        except Exception:  # corrupt: the regular loaders report it
            return False
    try:
        return is_controlnet(read_tensors(path)[0])
    except CheckpointError:
        return False


def describe_controlnet(net: ControlNet) -> dict:
    c = net.control_config
    return {
        "family": family_of(c.unet),
        "supported": True,
        "parameters": {"controlnet": sum(p.numel() for p in net.parameters())},
        "context_dim": c.unet.context_dim,
        "hint_channels": c.hint_channels,
        "hint_downsample_factor": c.downsample_factor,
        "note": "a ControlNet: use it with --controlnet",
    }


def family_of(c: UNetConfig) -> str:
    family = controlnet_family(c.context_dim)
    return f"{family.name}-controlnet" if family else "controlnet"


def _family_heads(c: UNetConfig) -> UNetConfig:
    family = controlnet_family(c.context_dim) or FAMILIES["sd1"]
    return replace(c, **{"num_heads": 8, "num_head_channels": -1, **family.unet_heads}, norm_groups=32)


def hint_config_from_weights(state: dict[str, torch.Tensor], where: str) -> tuple[int, tuple[int, ...]]:
    """(hint channels, hint encoder stage channels) of `input_hint_block.*` (original layout)."""
    idx = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"input_hint_block\.(\d+)\.weight", k)))
    if len(idx) < 2 or len(idx) % 2:
        raise CheckpointError(f"{where}: the ControlNet's hint encoder (input_hint_block) has an unknown layout")
    convs = [state[f"input_hint_block.{i}.weight"] for i in idx]
    middle = convs[1:-1]  # pairs of (same-width conv, strided conv)
    return convs[0].shape[1], (convs[0].shape[0], *[w.shape[0] for w in middle[1::2]])


def _diffusers_unet_config(state: dict[str, torch.Tensor], where: str) -> UNetConfig:
    """A diffusers-layout ControlNet's architecture, read off its weights (single files carry no config)."""
    keys = set(state)
    try:
        levels = 1 + max(int(m.group(1)) for k in keys if (m := re.match(r"down_blocks\.(\d+)\.", k)))
        n_res = 1 + max(int(m.group(1)) for k in keys if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k)))
        widths = tuple(state[f"down_blocks.{lv}.resnets.0.conv2.weight"].shape[0] for lv in range(levels))
        attn = tuple(2**lv for lv in range(levels) if f"down_blocks.{lv}.attentions.0.norm.weight" in keys)
        ctx = state[next(k for k in sorted(keys) if k.endswith("attn2.to_k.weight"))].shape[1]
        proj = state[next(k for k in sorted(keys) if k.endswith(".proj_in.weight"))]
    except (KeyError, StopIteration, ValueError):
        raise CheckpointError(f"{where}: diffusers ControlNet weights with an unknown layout") from None
    return UNetConfig(
        in_channels=state["conv_in.weight"].shape[1],
        channels=widths,
        num_res_blocks=n_res,
        attention_resolutions=attn,
        context_dim=ctx,
        use_linear_in_transformer=proj.ndim == 2,
        time_cond_proj_dim=state["time_embedding.cond_proj.weight"].shape[1]
        if "time_embedding.cond_proj.weight" in keys
        else None,
    )


def _from_diffusers_state(state, where, unet: UNetConfig | None = None) -> tuple[dict, ControlNetConfig]:
    unet = unet or _diffusers_unet_config(state, where)
    n = sum(1 for k in state if re.fullmatch(r"controlnet_cond_embedding\.blocks\.\d+\.weight", k))
    chs = [state["controlnet_cond_embedding.conv_in.weight"].shape[0]]
    chs += [state[f"controlnet_cond_embedding.blocks.{2 * k + 1}.weight"].shape[0] for k in range(n // 2)]
    config = ControlNetConfig(
        unet=unet,
        hint_channels=state["controlnet_cond_embedding.conv_in.weight"].shape[1],
        hint_block_channels=tuple(chs),
    )
    return keymaps.rename(state, keymaps.controlnet_to_diffusers(config), reverse=True), config


def _read(path: Path, where: str) -> tuple[dict[str, torch.Tensor], ControlNetConfig, bool]:
    """(original-layout state, config, heads known) of any supported ControlNet file or folder."""
    if path.is_dir():
        cfg_path = path / "config.json"
        weights = next((path / w for w in WEIGHTS if (path / w).is_file()), None)
        if not cfg_path.is_file() or weights is None:
            raise CheckpointError(f"{where}: a ControlNet folder needs config.json and {WEIGHTS[0]}")
        from ldmkit.checkpoints.diffusers_folder import unet_config_from_diffusers

        cfg = json.loads(cfg_path.read_text())
        if cfg.get("_class_name") != "ControlNetModel":
            raise CheckpointError(f"{where}: config.json is a {cfg.get('_class_name')!r}, not a ControlNetModel")
        cfg = {**cfg, "up_block_types": [t.replace("Down", "Up") for t in reversed(cfg["down_block_types"])]}
        state, _ = read_tensors(weights)
        state, config = _from_diffusers_state(state, where, unet_config_from_diffusers(cfg, where))
        return state, config, True
    state, metadata = read_tensors(path)
    state = {k: v for k, v in state.items() if not NOT_WEIGHTS.search(k)}
    if not is_controlnet(state):
        raise CheckpointError(f"{where}: not a ControlNet (no input_hint_block / controlnet_cond_embedding weights)")
    if any(k.startswith("controlnet_cond_embedding.") for k in state):
        state, config = _from_diffusers_state(state, where)
        return state, config, False
    if any(k.startswith(PREFIX) for k in state):
        state = strip_prefix(state, PREFIX)
    if METADATA_KEY in metadata:
        return state, from_dict(ControlNetConfig, json.loads(metadata[METADATA_KEY]), f"{where} header"), True
    hint_channels, hint_block = hint_config_from_weights(state, where)
    # The UNet reader wants an output layer; a ControlNet has none (its width equals the input's).
    unet = unet_config_from_weights({**state, "out.2.weight": state["input_blocks.0.0.weight"]}, where)
    return state, ControlNetConfig(unet=unet, hint_channels=hint_channels, hint_block_channels=hint_block), False


def load_controlnet(path: str | Path, base: UNetConfig | None = None) -> ControlNet:
    """A ControlNet from a file or folder; with `base`, checked against that UNet and given its heads."""
    path = Path(path)
    where = str(path)
    if not path.exists():
        raise CheckpointError(f"{where}: no such file or folder")
    state, config, heads_known = _read(path, where)
    if not heads_known:  # nor group-norm groups: neither is in the weights
        src = base if base is not None else _family_heads(config.unet)
        unet = replace(
            config.unet, num_heads=src.num_heads, num_head_channels=src.num_head_channels, norm_groups=src.norm_groups
        )
        config = replace(config, unet=unet)
    net = ControlNet(config)
    if base is not None:
        net.check_base(base)
    strict_load(net, state, "ControlNet", where)
    return net.eval()


def controlnet_state(net: ControlNet, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    return {PREFIX + k: (v.to(dtype) if dtype and v.is_floating_point() else v) for k, v in net.state_dict().items()}


def save_controlnet(net: ControlNet, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Original layout (`control_model.*`, what the popular UIs read) with our config in the header."""
    meta = {METADATA_KEY: json.dumps(to_dict(net.control_config))}
    write_safetensors(path, {k: v.contiguous() for k, v in controlnet_state(net, dtype).items()}, meta)


def save_controlnet_diffusers(net: ControlNet, folder: str | Path, dtype: torch.dtype | None = None) -> None:
    """A diffusers ControlNetModel folder (config.json + diffusion_pytorch_model.safetensors)."""
    from ldmkit.checkpoints.diffusers_folder import unet_config_to_diffusers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = net.control_config
    cfg = unet_config_to_diffusers(c.unet, 64)
    # Fields ControlNetModel does not take (its output is the residuals; its kernels are fixed at 3).
    for key in (
        "up_block_types",
        "out_channels",
        "sample_size",
        "time_cond_proj_dim",
        "conv_in_kernel",
        "conv_out_kernel",
        "timestep_post_act",
    ):
        cfg.pop(key, None)
    cfg.update(
        _class_name="ControlNetModel",
        conditioning_channels=c.hint_channels,
        conditioning_embedding_out_channels=list(c.hint_block_channels),
    )
    state = keymaps.rename(net.state_dict(), keymaps.controlnet_to_diffusers(c))
    state = {k: (v.to(dtype) if dtype and v.is_floating_point() else v).contiguous() for k, v in state.items()}
    write_safetensors(folder / WEIGHTS[0], state)
    write_json(folder / "config.json", cfg)
