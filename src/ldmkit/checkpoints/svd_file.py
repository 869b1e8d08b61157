"""Stable Video Diffusion as one file, in the original (generative-models) layout: `model.diffusion_model.*`
(the video UNet, by name), `first_stage_model.*` (the temporal autoencoder, by name; quant_conv only when the
file has one) and the OpenCLIP image tower at `conditioner.embedders.0.open_clip.model.visual.*`. The
conditioning frame's encoder at `conditioner.embedders.3.*` is a copy of the autoencoder's encoder: read once,
from `first_stage_model` (as other readers do). Files ldmkit writes carry their whole config in the header."""

import json
from dataclasses import asdict
from pathlib import Path

import torch

from ldmkit.checkpoints import keymaps
from ldmkit.checkpoints.components import strict_load, strip_prefix
from ldmkit.checkpoints.detect import NOT_WEIGHTS, unet_config_from_weights, vae_config_from_weights
from ldmkit.checkpoints.families import FAMILIES
from ldmkit.checkpoints.files import read_tensors, write_safetensors
from ldmkit.checkpoints.image_encoder_files import build_image_encoder, config_from_weights
from ldmkit.config import from_dict
from ldmkit.errors import CheckpointError, ConfigError
from ldmkit.models.ldm import ScheduleConfig
from ldmkit.models.video_ldm import VideoDiffusion, VideoModelConfig
from ldmkit.models.video_unet import VideoUNetConfig

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."
TOWER = "conditioner.embedders.0.open_clip.model.visual."
ENCODER_COPY = "conditioner.embedders.3."
HEADER = "ldmkit_video"
TOWER_HEADER = "ldmkit_image_encoder"  # the tower's transformers config, for towers of no published width


def _config_from_weights(unet: dict, vae: dict, family: str, where: str) -> VideoModelConfig:
    """What the weights say, and the family row for what they cannot (heads, latent scale, schedule)."""
    row = FAMILIES[family]
    base = unet_config_from_weights(unet, where)
    adm = base.adm_in_channels
    if adm is None or adm % 3:
        raise CheckpointError(f"{where}: the video UNet's conditioning embedding takes {adm}; SVD's takes 3 numbers")
    fields = {**asdict(base), **row.unet_heads, "num_heads": -1, "addition_time_embed_dim": adm // 3}
    fields.update(eps_layout="original")
    vae_config = vae_config_from_weights(vae, where)
    vae_config.scale_factor = row.vae_scale_factor
    schedule = ScheduleConfig(prediction_type=row.prediction, diffusers=dict(row.scheduler))
    defaults = row.call_defaults
    return VideoModelConfig(
        family, VideoUNetConfig(**fields), vae_config, schedule, defaults["width"], defaults["height"]
    )


def load_svd_file(path: str | Path, family: str = "svd") -> VideoDiffusion:
    where = str(path)
    state, metadata = read_tensors(path)
    stray = sorted(k for k in state if not k.startswith((UNET, VAE, TEXT, TOWER, ENCODER_COPY)))
    if stray:
        raise CheckpointError(f"{where}: weights no video model part holds: {', '.join(stray[:5])}")
    unet, vae, tower = strip_prefix(state, UNET), strip_prefix(state, VAE), strip_prefix(state, TOWER)
    try:
        if HEADER in metadata:
            config = from_dict(VideoModelConfig, json.loads(metadata[HEADER]), f"{where} header")
        else:
            config = _config_from_weights(unet, vae, family, where)
    except (ConfigError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None
    with torch.device("meta"):
        model = VideoDiffusion(config)
    model.model.diffusion_model = model.unet.to_empty(device="cpu")
    strict_load(model.unet, unet, "video UNet", where)
    model.first_stage_model = model.vae.to_empty(device="cpu")
    strict_load(model.vae, vae, "temporal autoencoder", where)
    if config.text is not None:
        from ldmkit.checkpoints.single_file import load_package_text_encoder
        from ldmkit.models.text import TextEncoder

        model.cond_stage_model = TextEncoder(config.text)
        if config.text.package:  # the file carries only what training changed in a package's tower
            load_package_text_encoder(model.cond_stage_model, strip_prefix(state, TEXT), where)
        else:
            strict_load(model.cond_stage_model, strip_prefix(state, TEXT), "text encoder", where)
    if tower:
        hf = keymaps.openclip_visual_to_hf(tower)
        tower_config = (
            json.loads(metadata[TOWER_HEADER]) if TOWER_HEADER in metadata else config_from_weights(hf, where)
        )
        model.image_encoder = build_image_encoder(tower_config, hf, where)
    return model.eval()


def video_state(model: VideoDiffusion, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    state = {UNET + k: v for k, v in model.unet.state_dict().items()}
    state.update({VAE + k: v for k, v in model.vae.state_dict().items()})
    text = model.text_encoder
    if text is not None and text.config.package:
        from ldmkit.checkpoints.single_file import text_changed_from_package

        state.update({TEXT + k: v for k, v in text_changed_from_package(text).items()})
    elif text is not None:
        own = text.state_dict()
        state.update({TEXT + k: v for k, v in own.items() if not NOT_WEIGHTS.search(k)})
    if model.image_encoder is not None:
        visual = keymaps.hf_to_openclip_visual(model.image_encoder.model.state_dict())
        state.update({TOWER + k: v for k, v in visual.items()})
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state


def save_svd_file(model: VideoDiffusion, path: str | Path, dtype: torch.dtype | None = None) -> None:
    metadata = {"format": "pt", HEADER: json.dumps(model.config.to_dict())}
    if model.image_encoder is not None:
        metadata[TOWER_HEADER] = model.image_encoder.model.config.to_json_string()
    write_safetensors(path, video_state(model, dtype), metadata)
