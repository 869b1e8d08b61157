"""Stable Video Diffusion's component configs in diffusers folders (UNetSpatioTemporalConditionModel,
AutoencoderKLTemporalDecoder) read into ours and written from ours; what ours cannot compute is refused
in one line naming the field."""

from ldmkit.checkpoints.diffusers_configs import DIFFUSERS_VERSION, _per_level
from ldmkit.errors import CheckpointError
from ldmkit.models.autoencoder import AutoencoderConfig
from ldmkit.models.video_unet import VideoUNetConfig

ATTENTION_DOWN, PLAIN_DOWN = "CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"
ATTENTION_UP, PLAIN_UP = "CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal"


def _block_types(cfg: dict, levels: int, where: str) -> list[bool]:
    """Which levels attend, from down_block_types; up_block_types must mirror them."""
    down = list(cfg.get("down_block_types", [ATTENTION_DOWN] * 3 + [PLAIN_DOWN]))
    up = list(cfg.get("up_block_types", [PLAIN_UP] + [ATTENTION_UP] * 3))
    if len(down) != levels or len(up) != levels:
        raise CheckpointError(f"{where}: {len(down)} down and {len(up)} up block types for {levels} levels")
    for t in down:
        if t not in (ATTENTION_DOWN, PLAIN_DOWN):
            raise CheckpointError(f"{where}: down block type {t!r}; allowed: {ATTENTION_DOWN}, {PLAIN_DOWN}")
    attn = [t == ATTENTION_DOWN for t in down]
    mirrored = [ATTENTION_UP if a else PLAIN_UP for a in reversed(attn)]
    if up != mirrored:
        raise CheckpointError(f"{where}: up_block_types {up} do not mirror down_block_types (expected {mirrored})")
    return attn


def video_unet_config_from_diffusers(cfg: dict, where: str) -> VideoUNetConfig:
    channels = tuple(cfg.get("block_out_channels", (320, 640, 1280, 1280)))
    levels = len(channels)
    attn = _block_types(cfg, levels, where)
    context = cfg.get("cross_attention_dim", 1024)
    if isinstance(context, (list, tuple)):
        if len(set(context)) != 1:
            raise CheckpointError(f"{where}: cross_attention_dim {context}: one width for every level is supported")
        context = context[0]
    heads = _per_level(cfg, "num_attention_heads", (5, 10, 20, 20), levels, where)
    added = cfg.get("addition_time_embed_dim", 256)
    return VideoUNetConfig(
        in_channels=cfg.get("in_channels", 8),
        out_channels=cfg.get("out_channels", 4),
        channels=channels,
        num_res_blocks=_per_level(cfg, "layers_per_block", 2, levels, where),
        attention_resolutions=tuple(2**i for i, a in enumerate(attn) if a),
        num_heads=heads,
        num_head_channels=-1,
        transformer_depth=_per_level(cfg, "transformer_layers_per_block", 1, levels, where),
        context_dim=context,
        adm_in_channels=cfg.get("projection_class_embeddings_input_dim", 768),
        addition_time_embed_dim=added,
        num_frames=cfg.get("num_frames", 25),
        eps_layout="diffusers",
    )


def video_unet_config_to_diffusers(c: VideoUNetConfig, sample_size: int) -> dict:
    attn = [c.has_attention(i) for i in range(c.levels)]
    return {
        "_class_name": "UNetSpatioTemporalConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": sample_size,
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "down_block_types": [ATTENTION_DOWN if a else PLAIN_DOWN for a in attn],
        "up_block_types": [ATTENTION_UP if a else PLAIN_UP for a in reversed(attn)],
        "block_out_channels": list(c.channels),
        "addition_time_embed_dim": c.addition_time_embed_dim,
        "projection_class_embeddings_input_dim": c.adm_in_channels,
        "layers_per_block": [c.res_blocks_at(i) for i in range(c.levels)],
        "cross_attention_dim": c.context_dim,
        "transformer_layers_per_block": [c.depth_at(i) for i in range(c.levels)],
        "num_attention_heads": [c.heads_at(i, w)[0] for i, w in enumerate(c.channels)],
        "num_frames": c.num_frames,
    }


def check_video_unet_for_diffusers(c: VideoUNetConfig, where: str) -> None:
    """What diffusers' port cannot express (written folders would compute something else)."""
    if not (c.addition_time_embed_dim and c.num_classes == "sequential" and c.use_linear_in_transformer):
        raise CheckpointError(f"{where}: diffusers' video UNet needs added conditioning numbers and linear projections")
    if c.merge_strategy != "learned_with_images" or c.video_kernel != 3 or c.norm_groups != 32 or c.norm_eps != 1e-5:
        raise CheckpointError(f"{where}: diffusers' video UNet has SVD's mixing, kernel and norms only")


def temporal_vae_config_from_diffusers(cfg: dict, where: str) -> AutoencoderConfig:
    for t in cfg.get("down_block_types", ["DownEncoderBlock2D"]):
        if t != "DownEncoderBlock2D":
            raise CheckpointError(f"{where}: down block type {t!r}; allowed: DownEncoderBlock2D")
    layers = cfg.get("layers_per_block", 1)
    if layers != 2:
        # diffusers builds the decoder's middle block with this many residual blocks but runs two (one skips
        # its attention): the original decoder's middle (block, attention, block) only at 2.
        raise CheckpointError(f"{where}: layers_per_block={layers!r}; a temporal decoder is read at 2 only")
    latent = cfg.get("latent_channels", 4)
    return AutoencoderConfig(
        in_channels=cfg.get("in_channels", 3),
        out_channels=cfg.get("out_channels", 3),
        channels=tuple(cfg.get("block_out_channels", (64,))),
        num_res_blocks=layers,
        z_channels=latent,
        embed_dim=latent,
        scale_factor=cfg.get("scaling_factor", 0.18215),
    )


def temporal_vae_config_to_diffusers(c: AutoencoderConfig, sample_size: int) -> dict:
    if c.num_res_blocks != 2 or not c.use_quant_conv or c.norm_groups != 32 or not c.mid_attention:
        raise CheckpointError(
            "diffusers' temporal autoencoder has 2 blocks per level, quant_conv, 32 groups, mid attention"
        )
    return {
        "_class_name": "AutoencoderKLTemporalDecoder",
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(c.channels),
        "block_out_channels": list(c.channels),
        "layers_per_block": c.num_res_blocks,
        "latent_channels": c.z_channels,
        "sample_size": sample_size,
        "scaling_factor": c.scale_factor,
        "force_upcast": True,
    }
