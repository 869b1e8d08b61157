"""SD3 / SD3.5 transformer weights and configs between our layout (= the original files' keys under
`model.diffusion_model.`, as models/mmdit.py names its modules) and diffusers' `SD3Transformer2DModel`.

Two layout differences change tensors, not just names: diffusers splits each fused q/k/v projection in
three (to_q/to_k/to_v; add_q_proj/... for the context stream), and its continuous adaLN (the final
layer and the last block's context stream) orders the two modulation chunks (scale, shift) where the
original orders them (shift, scale)."""

import re

import torch

from ldmkit.errors import CheckpointError, ConfigError
from ldmkit.models.mmdit import QK_NORMS, MMDiT, MMDiTConfig

# The prefix of the transformer's keys in an original single file.
PREFIX = "model.diffusion_model."
# The diffusers release whose config format we write.
DIFFUSERS_VERSION = "0.42.1"

# (ours, theirs, how): "same" copies, "qkv" concatenates diffusers' three projections into one,
# "swap" exchanges the two halves (shift, scale) <-> (scale, shift). Module prefixes; each rule covers
# the module's weight and bias, whichever exist.
Rule = tuple[str, tuple[str, ...], str]


def _block_rules(i: int, c: MMDiTConfig) -> list[Rule]:
    ours, theirs = f"joint_blocks.{i}", f"transformer_blocks.{i}"
    x, ctx = f"{ours}.x_block", f"{ours}.context_block"
    last = i == c.depth - 1
    rules = [
        (f"{x}.attn.qkv", tuple(f"{theirs}.attn.to_{n}" for n in "qkv"), "qkv"),
        (f"{x}.attn.proj", (f"{theirs}.attn.to_out.0",), "same"),
        (f"{ctx}.attn.qkv", tuple(f"{theirs}.attn.add_{n}_proj" for n in "qkv"), "qkv"),
        (f"{x}.adaLN_modulation.1", (f"{theirs}.norm1.linear",), "same"),
        (f"{ctx}.adaLN_modulation.1", (f"{theirs}.norm1_context.linear",), "swap" if last else "same"),
        (f"{x}.mlp.fc1", (f"{theirs}.ff.net.0.proj",), "same"),
        (f"{x}.mlp.fc2", (f"{theirs}.ff.net.2",), "same"),
    ]
    if not last:
        rules += [
            (f"{ctx}.attn.proj", (f"{theirs}.attn.to_add_out",), "same"),
            (f"{ctx}.mlp.fc1", (f"{theirs}.ff_context.net.0.proj",), "same"),
            (f"{ctx}.mlp.fc2", (f"{theirs}.ff_context.net.2",), "same"),
        ]
    if c.qk_norm:
        rules += [
            (f"{x}.attn.ln_q", (f"{theirs}.attn.norm_q",), "same"),
            (f"{x}.attn.ln_k", (f"{theirs}.attn.norm_k",), "same"),
            (f"{ctx}.attn.ln_q", (f"{theirs}.attn.norm_added_q",), "same"),
            (f"{ctx}.attn.ln_k", (f"{theirs}.attn.norm_added_k",), "same"),
        ]
    if i in c.dual_attention_layers:
        rules += [
            (f"{x}.attn2.qkv", tuple(f"{theirs}.attn2.to_{n}" for n in "qkv"), "qkv"),
            (f"{x}.attn2.proj", (f"{theirs}.attn2.to_out.0",), "same"),
        ]
        if c.qk_norm:
            rules += [
                (f"{x}.attn2.ln_q", (f"{theirs}.attn2.norm_q",), "same"),
                (f"{x}.attn2.ln_k", (f"{theirs}.attn2.norm_k",), "same"),
            ]
    return rules


def rules(c: MMDiTConfig) -> list[Rule]:
    """Every module of the model, ours against diffusers'."""
    top = [
        ("x_embedder.proj", ("pos_embed.proj",), "same"),
        ("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",), "same"),
        ("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",), "same"),
        *(
            [
                ("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",), "same"),
                ("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",), "same"),
            ]
            if c.pooled_dim
            else []
        ),
        ("context_embedder", ("context_embedder",), "same"),
        ("final_layer.linear", ("proj_out",), "same"),
        ("final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap"),
    ]
    return top + [r for i in range(c.depth) for r in _block_rules(i, c)]


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _convert(state: dict, c: MMDiTConfig, to_ours: bool, where: str) -> dict:
    state = dict(state)
    out = {}
    # The position table is a bare tensor, not a module's weight.
    src, dst = ("pos_embed.pos_embed", "pos_embed") if to_ours else ("pos_embed", "pos_embed.pos_embed")
    if src in state:
        out[dst] = state.pop(src)
    for ours, theirs, how in rules(c):
        for suffix in (".weight", ".bias"):
            names = [t + suffix for t in theirs]
            if to_ours:
                if not all(n in state for n in names):
                    continue
                tensors = [state.pop(n) for n in names]
                out[ours + suffix] = torch.cat(tensors) if how == "qkv" else tensors[0]
            else:
                if ours + suffix not in state:
                    continue
                tensor = state.pop(ours + suffix)
                parts = tensor.chunk(3) if how == "qkv" else [tensor]
                out.update(zip(names, parts))
            if how == "swap":
                key = ours + suffix if to_ours else names[0]
                out[key] = _swap_halves(out[key])
    if state:
        example = next(iter(state))
        raise CheckpointError(f"{where}: {len(state)} weights this SD3 transformer has no place for, e.g. {example}")
    return out


def diffusers_to_ours(state: dict, c: MMDiTConfig, where: str = "transformer") -> dict:
    """A diffusers SD3Transformer2DModel state dict -> ours (original names, without PREFIX). A key with no
    place is an error; a missing one is left for strict loading to name."""
    return _convert(state, c, to_ours=True, where=where)


def ours_to_diffusers(state: dict, c: MMDiTConfig, where: str = "transformer") -> dict:
    return {k: v.contiguous() for k, v in _convert(state, c, to_ours=False, where=where).items()}


# --- configs ------------------------------------------------------------------------------------

DIFFUSERS_FIELDS = {
    "sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
    "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels",
    "pos_embed_max_size", "dual_attention_layers", "qk_norm",
}  # fmt: skip


def config_from_diffusers(cfg: dict, where: str = "transformer/config.json") -> MMDiTConfig:
    """Our config from a diffusers SD3Transformer2DModel config.json; defaults are diffusers' own."""
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in DIFFUSERS_FIELDS)
    if unknown:
        raise CheckpointError(f"{where}: {unknown[0]}={cfg[unknown[0]]!r} is not a field ldmkit's MMDiT reads")
    heads, head_dim = cfg.get("num_attention_heads", 18), cfg.get("attention_head_dim", 64)
    for key, value in (("num_attention_heads", heads), ("attention_head_dim", head_dim)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CheckpointError(f"{where}: {key}={value!r}; allowed: a positive int")
    width = heads * head_dim
    caption = cfg.get("caption_projection_dim", 1152)
    if caption != width:
        raise CheckpointError(
            f"{where}: caption_projection_dim={caption!r}; allowed: num_attention_heads * attention_head_dim = {width}"
        )
    if cfg.get("qk_norm") not in QK_NORMS:
        raise CheckpointError(f"{where}: qk_norm={cfg['qk_norm']!r} is not supported; allowed: {list(QK_NORMS)}")
    if cfg.get("pos_embed_max_size", 96) is None:
        raise CheckpointError(f"{where}: pos_embed_max_size=None (a position table of sample_size) is not supported")
    in_channels = cfg.get("in_channels", 16)
    out_channels = cfg.get("out_channels", 16)
    try:
        return MMDiTConfig(
            in_channels=in_channels,
            out_channels=in_channels if out_channels is None else out_channels,
            patch_size=cfg.get("patch_size", 2),
            depth=cfg.get("num_layers", 18),
            hidden_size=width,
            head_dim=head_dim,
            context_dim=cfg.get("joint_attention_dim", 4096),
            pooled_dim=cfg.get("pooled_projection_dim", 2048),
            pos_embed_max_size=cfg.get("pos_embed_max_size", 96),
            sample_size=cfg.get("sample_size", 128),
            qk_norm=cfg.get("qk_norm"),
            dual_attention_layers=tuple(cfg.get("dual_attention_layers", ())),
        )
    except (ConfigError, TypeError) as e:  # the config's own checks, or a value of the wrong type
        raise CheckpointError(f"{where}: {e}") from None


def config_to_diffusers(c: MMDiTConfig) -> dict:
    return {
        "_class_name": "SD3Transformer2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": c.sample_size,
        "patch_size": c.patch_size,
        "in_channels": c.in_channels,
        "num_layers": c.depth,
        "attention_head_dim": c.head_dim,
        "num_attention_heads": c.num_heads,
        "joint_attention_dim": c.context_dim,
        "caption_projection_dim": c.hidden_size,
        "pooled_projection_dim": c.pooled_dim,
        "out_channels": c.out_channels,
        "pos_embed_max_size": c.pos_embed_max_size,
        "dual_attention_layers": list(c.dual_attention_layers),
        "qk_norm": c.qk_norm,
    }


def config_from_weights(
    state: dict, head_dim: int = 64, sample_size: int = 128, where: str = "model.diffusion_model"
) -> MMDiTConfig:
    """The architecture from original-layout weights (keys without PREFIX). The weights give every width,
    the depth, the patch size, the position table's side, qk norm and the dual-attention blocks; they
    cannot give the head split nor the native size, which come from the SD3 family: 64 channels per head
    (every release: heads = depth) and 128-latent (1024 px) native size. A tensor of any other shape
    than the derived config's is refused in one line."""
    try:
        hidden, in_channels, p, _ = state["x_embedder.proj.weight"].shape
        depth = 1 + max(int(m[1]) for k in state if (m := re.match(r"joint_blocks\.(\d+)\.", k)))
        side = round(state["pos_embed"].shape[1] ** 0.5)
        config = MMDiTConfig(
            in_channels=in_channels,
            out_channels=state["final_layer.linear.weight"].shape[0] // (p * p),
            patch_size=p,
            depth=depth,
            hidden_size=hidden,
            head_dim=head_dim,
            context_dim=state["context_embedder.weight"].shape[1],
            pooled_dim=state["y_embedder.mlp.0.weight"].shape[1] if "y_embedder.mlp.0.weight" in state else 0,
            pos_embed_max_size=side,
            sample_size=sample_size,
            qk_norm="rms_norm" if "joint_blocks.0.x_block.attn.ln_q.weight" in state else None,
            dual_attention_layers=tuple(
                i for i in range(depth) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in state
            ),
        )
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{where}: not an SD3 transformer ({type(e).__name__}: {e})") from None
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    _check_shapes(state, config, where)
    return config


def _check_shapes(state: dict, config: MMDiTConfig, where: str) -> None:
    """Every tensor the derived architecture has, at its shape, and no other: what SD3 variants the
    original code allows and releases do not use (RMS-normed blocks, SwiGLU, scale-only modulation,
    registers, another MLP ratio, LayerNorm q/k) shows up here."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in MMDiT(config).state_dict().items()}
    for key, tensor in state.items():
        if key not in expected:
            raise CheckpointError(f"{where}: unexpected weight {key} for {config}")
        if tuple(tensor.shape) != tuple(expected[key]):
            raise CheckpointError(f"{where}: {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key])}")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{where}: missing weight {missing[0]} ({len(missing)} missing)")
