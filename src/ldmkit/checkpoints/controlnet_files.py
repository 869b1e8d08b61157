"""ControlNet files: the original layout (`control_model.*`, or the same keys bare), diffusers
`ControlNetModel` folders and single files, and ours (original layout + config in the header).

The architecture comes from the weights (a diffusers single file is renamed to the original layout
first, then read as one). Head counts are not in the weights, nor is how an SDXL ControlNet's addition
embedding splits into the pooled vector and the micro-conditioning numbers: they come from the base
model the ControlNet is used with (which it must fit anyway) or, alone, from the family rules the
context width tells (768: SD 1.x, 8 heads; 1024: SD 2.x, 64 channels per head; 2048: SDXL, 64 channels
per head and 256 per micro-conditioning number)."""

import json
import re
from dataclasses import replace
from pathlib import Path

import torch

from ldmkit.checkpoints import keymaps
from ldmkit.checkpoints.components import strict_load, strip_prefix
from ldmkit.checkpoints.detect import NOT_WEIGHTS, groups_for, unet_config_from_weights
from ldmkit.checkpoints.families import FAMILIES, adapter_family
from ldmkit.checkpoints.files import read_tensors, write_json, write_safetensors
from ldmkit.config import from_dict, to_dict
from ldmkit.errors import CheckpointError, ConfigError
from ldmkit.models.controlnet import ControlNet, ControlNetConfig, misfit
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
    family = adapter_family(c.context_dim)
    return f"{family.name}-controlnet" if family else "controlnet"


def hint_config_from_weights(state: dict[str, torch.Tensor], where: str) -> tuple[int, tuple[int, ...]]:
    """(hint channels, hint encoder stage channels) of `input_hint_block.*` (original layout)."""
    idx = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"input_hint_block\.(\d+)\.weight", k)))
    if len(idx) < 2 or len(idx) % 2:
        raise CheckpointError(f"{where}: the ControlNet's hint encoder (input_hint_block) has an unknown layout")
    convs = [state[f"input_hint_block.{i}.weight"] for i in idx]
    middle = convs[1:-1]  # pairs of (same-width conv, strided conv)
    return convs[0].shape[1], (convs[0].shape[0], *[w.shape[0] for w in middle[1::2]])


def _count(keys, pattern: str) -> int:
    return 1 + max((int(m.group(1)) for k in keys if (m := re.match(pattern, k))), default=-1)


def _embedding_from_diffusers(state: dict[str, torch.Tensor]) -> dict:
    """UNetConfig fields of a diffusers-layout class or addition embedding (SDXL's text_time: the
    micro-conditioning width only picks the names here; `_rules` sets it)."""
    if "add_embedding.linear_1.weight" in state:
        return dict(
            num_classes="sequential",
            adm_in_channels=state["add_embedding.linear_1.weight"].shape[1],
            addition_time_embed_dim=1,
        )
    if "class_embedding.linear_1.weight" in state:
        return dict(num_classes="sequential", adm_in_channels=state["class_embedding.linear_1.weight"].shape[1])
    if "class_embedding.weight" in state:
        return dict(num_classes=state["class_embedding.weight"].shape[0])
    return {}


def _diffusers_skeleton(state: dict[str, torch.Tensor], where: str) -> ControlNetConfig:
    """As much of a diffusers-layout ControlNet's architecture as renaming its keys needs (levels,
    residual blocks, attention, middle block, embeddings, hint encoder); the rest is read off the
    renamed weights, as for the original layout."""
    keys = set(state)
    levels = _count(keys, r"down_blocks\.(\d+)\.")
    stages = _count(keys, r"controlnet_cond_embedding\.blocks\.(\d+)\.weight") // 2
    if not levels:
        raise CheckpointError(f"{where}: diffusers ControlNet weights with an unknown layout (no down_blocks)")
    try:
        widths = tuple(state[f"down_blocks.{lv}.resnets.0.conv2.weight"].shape[0] for lv in range(levels))
        embed_in = state["controlnet_cond_embedding.conv_in.weight"]
        hint = [state[f"controlnet_cond_embedding.blocks.{2 * k + 1}.weight"].shape[0] for k in range(stages)]
        hint_channels, in_channels = embed_in.shape[1], state["conv_in.weight"].shape[1]
        embedding = _embedding_from_diffusers(state)
    except (KeyError, IndexError) as e:
        what = repr(e.args[0]) if isinstance(e, KeyError) else "weights of the expected shapes"
        raise CheckpointError(f"{where}: diffusers ControlNet weights with an unknown layout (no {what})") from None
    mid = {"attentions", "resnets"} & {k.split(".")[1] for k in keys if k.startswith("mid_block.")}
    unet = UNetConfig(
        in_channels=in_channels,
        channels=widths,
        num_res_blocks=tuple(_count(keys, rf"down_blocks\.{lv}\.resnets\.(\d+)\.") for lv in range(levels)),
        attention_resolutions=tuple(
            2**lv for lv in range(levels) if _count(keys, rf"down_blocks\.{lv}\.attentions\.(\d+)\.")
        ),
        middle_block="attention" if "attentions" in mid else "resnet" if mid else "none",
        norm_groups=groups_for(widths),
        **embedding,
    )
    return ControlNetConfig(unet=unet, hint_channels=hint_channels, hint_block_channels=(embed_in.shape[0], *hint))


def _original_config(state: dict[str, torch.Tensor], where: str) -> ControlNetConfig:
    """An original-layout ControlNet's architecture, read off its weights (the same reader as a model's
    UNet); heads, norm groups and the addition embedding's split are filled by `_rules`."""
    hint_channels, hint_block = hint_config_from_weights(state, where)
    if "input_blocks.0.0.weight" not in state:
        raise CheckpointError(f"{where}: a ControlNet without its first convolution (input_blocks.0.0)")
    # The UNet reader wants an output layer; a ControlNet has none (its width equals the input's).
    unet = unet_config_from_weights({**state, "out.2.weight": state["input_blocks.0.0.weight"]}, where)
    unet = replace(unet, out_channels=unet.in_channels, conv_out_kernel=3)
    return ControlNetConfig(unet=unet, hint_channels=hint_channels, hint_block_channels=hint_block)


def _read(path: Path, where: str) -> tuple[dict[str, torch.Tensor], ControlNetConfig, bool]:
    """(original-layout state, config, complete) of any supported ControlNet file or folder; an
    incomplete config lacks what no weight says (see `_rules`)."""
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
        config = replace(_diffusers_skeleton(state, where), unet=unet_config_from_diffusers(cfg, where))
        return keymaps.rename(state, keymaps.controlnet_to_diffusers(config), reverse=True), config, True
    state, metadata = read_tensors(path)
    state = {k: v for k, v in state.items() if not NOT_WEIGHTS.search(k)}
    if not is_controlnet(state):
        raise CheckpointError(f"{where}: not a ControlNet (no input_hint_block / controlnet_cond_embedding weights)")
    if any(k.startswith("controlnet_cond_embedding.") for k in state):  # diffusers' names, no config
        state = keymaps.rename(state, keymaps.controlnet_to_diffusers(_diffusers_skeleton(state, where)), reverse=True)
    if any(k.startswith(PREFIX) for k in state):
        state = strip_prefix(state, PREFIX)
    if METADATA_KEY in metadata:
        return state, from_dict(ControlNetConfig, json.loads(metadata[METADATA_KEY]), f"{where} header"), True
    return state, _original_config(state, where), False


def _rules(config: ControlNetConfig, base: UNetConfig | None) -> ControlNetConfig:
    """What a ControlNet file's weights cannot say, from the base model it is used with or, alone, from
    its family's rules (told by its context width; SD 1.x's where none fits): heads, norm groups
    (SD's 32, or the most that divide every width) and, for an addition embedding (SDXL), each
    micro-conditioning number's width."""
    c = config.unet
    family = adapter_family(c.context_dim)
    src = base
    if src is None:
        heads = {"num_heads": 8, "num_head_channels": -1, **(family or FAMILIES["sd1"]).unet_heads}
        src = replace(c, **heads, norm_groups=groups_for(c.channels))
    width = None
    if c.num_classes == "sequential":
        if base is not None and base.num_classes == "sequential" and base.adm_in_channels == c.adm_in_channels:
            width = base.addition_time_embed_dim
        elif family is not None:
            width = family.controlnet_micro_width
    unet = replace(
        c,
        num_heads=src.num_heads,
        num_head_channels=src.num_head_channels,
        norm_groups=src.norm_groups,
        addition_time_embed_dim=width,
    )
    return replace(config, unet=unet)


def check_fits(config: UNetConfig, base: UNetConfig, where: str) -> None:
    """Refuse, in one line, a ControlNet whose base is another model: named by family where both
    context widths tell one (a ControlNet for SD 1.5 given to an SDXL model, or the reverse)."""
    why = misfit(config, base)
    if why is None:
        return
    mine, theirs = adapter_family(config.context_dim), adapter_family(base.context_dim)
    if mine is not None and theirs is not None and mine.name != theirs.name:
        a, b = (f.title.split(" (")[0] for f in (mine, theirs))
        raise ConfigError(
            f"{where}: a ControlNet for {a} (text context {config.context_dim}) does not fit this {b} model "
            f"(context {base.context_dim}); use a ControlNet made for {b}"
        )
    raise ConfigError(f"{where}: ControlNet does not fit this model: {why}")


def load_controlnet(path: str | Path, base: UNetConfig | None = None) -> ControlNet:
    """A ControlNet from a file or folder; with `base`, checked against that UNet (before anything is
    built) and given what its weights cannot say from it."""
    path = Path(path)
    where = str(path)
    if not path.exists():
        raise CheckpointError(f"{where}: no such file or folder")
    state, config, complete = _read(path, where)
    if not complete and base is not None and not any(k.endswith("attn2.to_k.weight") for k in state):
        # no cross-attention weights (transformer depth 0 everywhere): the context width is the base's
        config = replace(config, unet=replace(config.unet, context_dim=base.context_dim))
    if base is not None:
        check_fits(config.unet, base, where)
    if not complete:
        config = _rules(config, base)
    net = ControlNet(config)
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
