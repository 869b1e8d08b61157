"""diffusers' component configs (a UNet's or VAE's config.json, a scheduler_config.json) read into
ours and written from ours. A diffusers value ldmkit cannot compute is refused in one line naming the
field, never dropped (UNET_FIXED, VAE_FIXED)."""

import torch

from ldmkit.errors import CheckpointError
from ldmkit.models.autoencoder import AutoencoderConfig
from ldmkit.models.ldm import ScheduleConfig
from ldmkit.models.unet import TIME_ACTIVATIONS, UNetConfig

# The diffusers release whose config format we write.
DIFFUSERS_VERSION = "0.42.1"


# --- UNet ---------------------------------------------------------------------------------------


# Fields of diffusers' UNet2DConditionModel config that change nothing ldmkit computes, or that it
# can only take at the value the SD 1.x / 2.x families use: (field, allowed values). Any other
# value is refused in one line naming the field; fields read into UNetConfig are below.
UNET_FIXED = {
    "act_fn": ["silu"],
    "flip_sin_to_cos": [True],
    "freq_shift": [0],
    "center_input_sample": [False],
    "downsample_padding": [1],
    "mid_block_scale_factor": [1, 1.0],
    "resnet_time_scale_shift": ["default"],
    "resnet_skip_time_act": [False],
    "resnet_out_scale_factor": [1, 1.0],
    "time_embedding_type": ["positional"],
    "time_embedding_dim": [None],
    "time_embedding_act_fn": [None],
    "addition_embed_type": [None, "text_time"],
    "addition_embed_type_num_heads": [64],  # read only by the "text" addition embedding
    "encoder_hid_dim": [None],
    "encoder_hid_dim_type": [None],
    "dual_cross_attention": [False],
    # Only UNetMidBlock2DSimpleCrossAttn reads it, a middle block SD families do not use.
    "mid_block_only_cross_attention": [None, False, True],
    "class_embed_type": [None, "projection"],
    "class_embeddings_concat": [False],
    "attention_type": ["default"],
    "cross_attention_norm": [None],
    "reverse_transformer_layers_per_block": [None],
    "num_attention_heads": [None],  # diffusers itself refuses it (attention_head_dim is the count)
    "dropout": [0, 0.0],
}
MID_BLOCKS = {"UNetMidBlock2DCrossAttn": "attention", "UNetMidBlock2D": "resnet", None: "none"}


def _refuse_unknown_values(cfg: dict, fixed: dict, where: str) -> None:
    for key, allowed in fixed.items():
        value = cfg.get(key, allowed[0])
        if value not in allowed:
            raise CheckpointError(f"{where}: {key}={value!r} is not supported; allowed: {allowed}")


def _per_level(cfg: dict, key: str, default, levels: int, where: str) -> int | tuple[int, ...]:
    """An int or a per-level list in a diffusers config; one int when every level agrees."""
    value = cfg.get(key, default)
    if isinstance(value, (list, tuple)):
        if len(value) != levels or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise CheckpointError(f"{where}: {key}={value!r}: expected an int or one int per level ({levels})")
        return value[0] if len(set(value)) == 1 else tuple(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointError(f"{where}: {key}={value!r}: expected an int or one int per level ({levels})")
    return value


def unet_config_from_diffusers(cfg: dict, where: str) -> UNetConfig:
    _refuse_unknown_values(cfg, UNET_FIXED, where)
    channels = tuple(cfg.get("block_out_channels", (320, 640, 1280, 1280)))
    levels = len(channels)
    down = list(cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    up = list(cfg.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
    kinds = {"CrossAttnDownBlock2D": True, "DownBlock2D": False, "CrossAttnUpBlock2D": True, "UpBlock2D": False}
    for t in down + up:
        if t not in kinds:
            raise CheckpointError(f"{where}: block type {t!r} is not supported; allowed: {sorted(kinds)}")
    if len(down) != levels or len(up) != levels:
        raise CheckpointError(f"{where}: {levels} block_out_channels but {len(down)} down and {len(up)} up blocks")
    attention = [kinds[t] for t in down]
    if [kinds[t] for t in reversed(up)] != attention:
        raise CheckpointError(f"{where}: up_block_types do not mirror down_block_types")
    mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid not in MID_BLOCKS:
        raise CheckpointError(f"{where}: mid_block_type={mid!r} is not supported; allowed: {list(MID_BLOCKS)}")
    context = cfg.get("cross_attention_dim", 1280)
    if isinstance(context, (list, tuple)):
        if len(set(context)) != 1:
            raise CheckpointError(f"{where}: cross_attention_dim={context!r} per level is not supported")
        context = context[0]
    heads = _per_level(cfg, "attention_head_dim", 8, levels, where)  # diffusers: a head count
    num_heads, head_channels = heads, -1
    if (
        isinstance(heads, tuple)
        and len({c // h for c, h in zip(channels, heads)}) == 1
        and all(c % h == 0 for c, h in zip(channels, heads))
    ):
        num_heads, head_channels = UNetConfig.num_heads, channels[0] // heads[0]  # SD 2: 64 per head
    num_classes, adm, time_dim = cfg.get("num_class_embeds"), None, None
    if cfg.get("class_embed_type") == "projection":
        num_classes, adm = "sequential", cfg["projection_class_embeddings_input_dim"]
    if cfg.get("addition_embed_type") == "text_time":  # SDXL: pooled text + embedded sizes
        if num_classes is not None:
            raise CheckpointError(f"{where}: a class embedding and a text_time addition embedding together")
        num_classes, adm = "sequential", cfg["projection_class_embeddings_input_dim"]
        time_dim = cfg["addition_time_embed_dim"]
    only_cross = cfg.get("only_cross_attention", False)
    if isinstance(only_cross, (list, tuple)):
        if len(only_cross) != levels or not all(isinstance(v, bool) for v in only_cross):
            raise CheckpointError(f"{where}: only_cross_attention={only_cross!r}: expected a bool or one per level")
        only_cross = only_cross[0] if len(set(only_cross)) == 1 else tuple(only_cross)
    elif not isinstance(only_cross, bool):
        raise CheckpointError(f"{where}: only_cross_attention={only_cross!r}: expected a bool or one per level")
    post_act = cfg.get("timestep_post_act")
    if post_act is not None and post_act not in TIME_ACTIVATIONS:
        raise CheckpointError(
            f"{where}: timestep_post_act={post_act!r} is not supported; allowed: {[None, *TIME_ACTIVATIONS]}"
        )
    groups = cfg.get("norm_num_groups", 32)
    if groups is None:
        raise CheckpointError(f"{where}: norm_num_groups=None (no output norm) is not supported")
    return UNetConfig(
        in_channels=cfg.get("in_channels", 4),
        out_channels=cfg.get("out_channels", 4),
        channels=channels,
        num_res_blocks=_per_level(cfg, "layers_per_block", 2, levels, where),
        attention_resolutions=tuple(2**i for i, a in enumerate(attention) if a),
        num_heads=num_heads,
        num_head_channels=head_channels,
        transformer_depth=_per_level(cfg, "transformer_layers_per_block", 1, levels, where),
        context_dim=context,
        use_linear_in_transformer=bool(cfg.get("use_linear_projection")),
        middle_block=MID_BLOCKS[mid],
        num_classes=num_classes,
        adm_in_channels=adm,
        addition_time_embed_dim=time_dim,
        time_cond_proj_dim=cfg.get("time_cond_proj_dim"),
        norm_groups=groups,
        norm_eps=float(cfg.get("norm_eps", 1e-5)),
        conv_in_kernel=cfg.get("conv_in_kernel", 3),
        conv_out_kernel=cfg.get("conv_out_kernel", 3),
        upcast_attention=bool(cfg.get("upcast_attention", False)),
        disable_self_attention=only_cross,
        time_embed_post_act=post_act,
    )


def unet_config_to_diffusers(c: UNetConfig, sample_size: int) -> dict:
    levels = c.levels
    attn = [c.has_attention(i) for i in range(levels)]
    cfg = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": sample_size,
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "block_out_channels": list(c.channels),
        "layers_per_block": c.num_res_blocks if isinstance(c.num_res_blocks, int) else list(c.num_res_blocks),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "mid_block_type": {v: k for k, v in MID_BLOCKS.items()}[c.middle_block],
        "attention_head_dim": [c.heads_at(i, ch)[0] for i, ch in enumerate(c.channels)],
        "cross_attention_dim": c.context_dim,
        "use_linear_projection": c.use_linear_in_transformer,
        "transformer_layers_per_block": [c.depth_at(i) for i in range(levels)],
        "norm_num_groups": c.norm_groups,
        "norm_eps": c.norm_eps,
        "conv_in_kernel": c.conv_in_kernel,
        "conv_out_kernel": c.conv_out_kernel,
        "upcast_attention": c.upcast_attention,
        "only_cross_attention": [c.self_attention_disabled_at(i) for i in range(levels)],
        "timestep_post_act": c.time_embed_post_act,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
        "time_cond_proj_dim": c.time_cond_proj_dim,
    }
    if isinstance(c.num_classes, int):
        cfg["num_class_embeds"] = c.num_classes
    elif c.num_classes == "sequential":
        if c.addition_time_embed_dim:
            cfg["addition_embed_type"] = "text_time"
            cfg["addition_time_embed_dim"] = c.addition_time_embed_dim
        else:
            cfg["class_embed_type"] = "projection"
        cfg["projection_class_embeddings_input_dim"] = c.adm_in_channels
    return cfg


# --- VAE ----------------------------------------------------------------------------------------


# As UNET_FIXED, for AutoencoderKL. force_upcast only tells fp16 pipelines to decode in fp32; ldmkit
# decodes in fp32 or bf16, never fp16, so either value means the same here.
VAE_FIXED = {
    "act_fn": ["silu"],
    "latents_mean": [None],
    "latents_std": [None],
    "force_upcast": [True, False],
}


def vae_config_from_diffusers(cfg: dict, where: str) -> AutoencoderConfig:
    channels = tuple(cfg.get("block_out_channels", (64,)))
    _refuse_unknown_values(cfg, VAE_FIXED, where)
    for key, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        for t in cfg.get(key, []):
            if t != allowed:
                raise CheckpointError(f"{where}: VAE {key} {t!r} is not supported; allowed: {allowed}")
    if cfg.get("use_quant_conv", True) != cfg.get("use_post_quant_conv", True):
        raise CheckpointError(f"{where}: a VAE with only one of quant_conv/post_quant_conv is not supported")
    return AutoencoderConfig(
        in_channels=cfg.get("in_channels", 3),
        out_channels=cfg.get("out_channels", 3),
        channels=channels,
        num_res_blocks=cfg.get("layers_per_block", 1),
        z_channels=cfg.get("latent_channels", 4),
        embed_dim=cfg.get("latent_channels", 4),
        scale_factor=cfg.get("scaling_factor", 0.18215),
        shift_factor=cfg.get("shift_factor") or 0.0,
        use_quant_conv=cfg.get("use_quant_conv", True),
        norm_groups=cfg.get("norm_num_groups", 32),
        mid_attention=cfg.get("mid_block_add_attention", True),
    )


def vae_config_from_diffusers_weights(state: dict[str, torch.Tensor], where: str) -> AutoencoderConfig:
    """A lone diffusers-layout VAE file has no config.json beside it: read the shapes."""
    try:
        levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.down_blocks."))
        nrb = 1 + max(int(k.split(".")[4]) for k in state if k.startswith("encoder.down_blocks.0.resnets."))
        z = state["decoder.conv_in.weight"].shape[1]
        return AutoencoderConfig(
            channels=tuple(state[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels)),
            num_res_blocks=nrb,
            z_channels=z,
            embed_dim=z,
            use_quant_conv="quant_conv.weight" in state,
            in_channels=state["encoder.conv_in.weight"].shape[1],
            out_channels=state["decoder.conv_out.weight"].shape[0],
            mid_attention=any(k.startswith("encoder.mid_block.attentions.0.") for k in state),
        )
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{where}: diffusers-layout VAE weights are incomplete (missing {e})") from None


def vae_config_to_diffusers(c: AutoencoderConfig, sample_size: int) -> dict:
    if c.embed_dim != c.z_channels:
        raise CheckpointError(
            f"diffusers' AutoencoderKL needs embed_dim == z_channels (got {c.embed_dim}, {c.z_channels})"
        )
    n = len(c.channels)
    cfg = {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "block_out_channels": list(c.channels),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "layers_per_block": c.num_res_blocks,
        "latent_channels": c.z_channels,
        "norm_num_groups": c.norm_groups,
        "act_fn": "silu",
        "sample_size": sample_size,
        "scaling_factor": c.scale_factor,
        "use_quant_conv": c.use_quant_conv,
        "use_post_quant_conv": c.use_quant_conv,
        "mid_block_add_attention": c.mid_attention,
    }
    if c.shift_factor:
        cfg["shift_factor"] = c.shift_factor
    return cfg


# --- scheduler ----------------------------------------------------------------------------------


def schedule_from_diffusers(cfg: dict) -> ScheduleConfig:
    """The training schedule a scheduler_config.json gives. The whole config is kept: the samplers
    read their settings from it (SamplerSpec.build_schedule)."""
    return ScheduleConfig(
        num_train_timesteps=cfg.get("num_train_timesteps", 1000),
        beta_start=cfg.get("beta_start", 0.00085),
        beta_end=cfg.get("beta_end", 0.012),
        beta_schedule=cfg.get("beta_schedule", "scaled_linear"),
        prediction_type=cfg.get("prediction_type", "epsilon"),
        diffusers=cfg,
    )
