"""Stable Video Diffusion as a diffusers folder (StableVideoDiffusionPipeline: unet/, vae/, image_encoder/,
feature_extractor/, scheduler/), read and written through the key maps in keymaps.py and the config
translations in svd_configs.py. What diffusers has no place for (the default size) travels in `ldmkit.json`,
which diffusers ignores."""

from pathlib import Path

import torch

from ldmkit.checkpoints import keymaps
from ldmkit.checkpoints.components import strict_load
from ldmkit.checkpoints.diffusers_configs import DIFFUSERS_VERSION, schedule_from_diffusers
from ldmkit.checkpoints.diffusers_text import cast_floats, component_weights, read_json
from ldmkit.checkpoints.files import atomic_folder, write_json, write_safetensors
from ldmkit.checkpoints.image_encoder_files import load_image_encoder
from ldmkit.checkpoints.svd_configs import (
    check_video_unet_for_diffusers,
    temporal_vae_config_from_diffusers,
    temporal_vae_config_to_diffusers,
    video_unet_config_from_diffusers,
    video_unet_config_to_diffusers,
)
from ldmkit.config import from_dict
from ldmkit.errors import CheckpointError, ConfigError
from ldmkit.models.ldm import ScheduleConfig
from ldmkit.models.video_ldm import VideoDiffusion, VideoModelConfig

WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
PIPELINE = "StableVideoDiffusionPipeline"


def _image_normalisation(folder: Path) -> dict:
    path = folder / "feature_extractor" / "preprocessor_config.json"
    if not path.exists():
        return {}
    cfg = read_json(path)
    out = {}
    for ours, theirs in (("image_mean", "image_mean"), ("image_std", "image_std")):
        value = cfg.get(theirs)
        if value is not None:
            if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)):
                raise CheckpointError(f"{path}: {theirs} {value!r}; expected three numbers")
            out[ours] = tuple(float(v) for v in value)
    return out


def _config(folder: Path, family: str) -> VideoModelConfig:
    from ldmkit.checkpoints.families import FAMILIES

    where = str(folder)
    try:
        unet = video_unet_config_from_diffusers(read_json(folder / "unet" / "config.json"), f"{folder / 'unet'}")
        vae = temporal_vae_config_from_diffusers(read_json(folder / "vae" / "config.json"), f"{folder / 'vae'}")
        sched_file = folder / "scheduler" / "scheduler_config.json"
        scheduler = read_json(sched_file) if sched_file.exists() else dict(FAMILIES[family].scheduler)
        schedule = schedule_from_diffusers(scheduler)
        size = {}
        if (folder / "ldmkit.json").exists():
            saved = from_dict(VideoModelConfig, read_json(folder / "ldmkit.json"), str(folder / "ldmkit.json"))
            size = dict(width=saved.width, height=saved.height)
        return VideoModelConfig(family, unet, vae, schedule, **size, **_image_normalisation(folder))
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    except (TypeError, ValueError, AttributeError, IndexError, KeyError) as e:
        raise CheckpointError(f"{where}: a config value of the wrong kind ({str(e)[:200]})") from None


def load_svd_folder(path: str | Path, family: str = "svd") -> VideoDiffusion:
    folder = Path(path)
    config = _config(folder, family)
    image_dir = folder / "image_encoder"
    if not image_dir.is_dir():
        raise CheckpointError(f"{folder}: no image_encoder/ (the CLIP vision tower an image-to-video model needs)")
    with torch.device("meta"):
        model = VideoDiffusion(config)
    unet_state = keymaps.rename(
        component_weights(folder / "unet", WEIGHTS), keymaps.video_unet_to_diffusers(config.unet), reverse=True
    )
    model.model.diffusion_model = model.unet.to_empty(device="cpu")
    strict_load(model.unet, unet_state, "video UNet", str(folder / "unet"))
    vae_state = keymaps.vae_linear_attention_to_conv(
        keymaps.rename(
            component_weights(folder / "vae", WEIGHTS), keymaps.temporal_vae_to_diffusers(config.vae), reverse=True
        )
    )
    model.first_stage_model = model.vae.to_empty(device="cpu")
    strict_load(model.vae, vae_state, "temporal autoencoder", str(folder / "vae"))
    model.image_encoder = load_image_encoder(image_dir)
    return model.eval()


def save_svd_folder(model: VideoDiffusion, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Written beside the destination, then renamed into place."""
    check_video_unet_for_diffusers(model.config.unet, str(path))
    if model.image_encoder is None:
        raise CheckpointError(f"{path}: this model has no image encoder to write")
    atomic_folder(path, lambda tmp: _write(model, tmp, dtype))


def _identity_quant_conv(channels: int) -> dict[str, torch.Tensor]:
    """diffusers' temporal autoencoder always has quant_conv; the original's has none: identity is exact."""
    return {"quant_conv.weight": torch.eye(channels)[:, :, None, None], "quant_conv.bias": torch.zeros(channels)}


def _write(model: VideoDiffusion, out: Path, dtype) -> None:
    c = model.config
    f = c.vae.downsample_factor
    for sub in ("unet", "vae", "scheduler", "feature_extractor"):
        (out / sub).mkdir()
    write_json(out / "unet" / "config.json", video_unet_config_to_diffusers(c.unet, c.height // f))
    unet = keymaps.rename(model.unet.state_dict(), keymaps.video_unet_to_diffusers(c.unet))
    write_safetensors(out / "unet" / WEIGHTS[0], cast_floats(unet, dtype), {"format": "pt"})
    vae_config = c.vae if c.vae.use_quant_conv else _with_quant_conv(c.vae)
    write_json(out / "vae" / "config.json", temporal_vae_config_to_diffusers(vae_config, c.height))
    own = model.vae.state_dict()
    if not c.vae.use_quant_conv:
        own.update(_identity_quant_conv(2 * c.vae.z_channels))
    vae = keymaps.rename(own, keymaps.temporal_vae_to_diffusers(vae_config))
    vae = {k: (v[:, :, 0, 0] if keymaps._VAE_ATTN_PROJ.search(k) and v.ndim == 4 else v) for k, v in vae.items()}
    write_safetensors(out / "vae" / WEIGHTS[0], cast_floats(vae, dtype), {"format": "pt"})
    model.image_encoder.model.save_pretrained(out / "image_encoder", safe_serialization=True)
    write_json(
        out / "feature_extractor" / "preprocessor_config.json",
        {
            "image_processor_type": "CLIPImageProcessor",
            "do_normalize": True,
            "image_mean": list(c.image_mean),
            "image_std": list(c.image_std),
            "do_resize": True,
            "size": {"shortest_edge": model.image_encoder.size},
            "crop_size": {"height": model.image_encoder.size, "width": model.image_encoder.size},
            "do_center_crop": True,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "resample": 3,
        },
    )
    write_json(out / "scheduler" / "scheduler_config.json", _scheduler(c.schedule))
    index = {"_class_name": PIPELINE, "_diffusers_version": DIFFUSERS_VERSION}
    index.update(
        unet=["diffusers", "UNetSpatioTemporalConditionModel"],
        vae=["diffusers", "AutoencoderKLTemporalDecoder"],
        image_encoder=["transformers", "CLIPVisionModelWithProjection"],
        feature_extractor=["transformers", "CLIPImageProcessor"],
        scheduler=["diffusers", "EulerDiscreteScheduler"],
    )
    write_json(out / "model_index.json", index)
    write_json(out / "ldmkit.json", c.to_dict())


def _with_quant_conv(vae):
    from dataclasses import replace

    return replace(vae, use_quant_conv=True)


def _scheduler(schedule: ScheduleConfig) -> dict:
    from ldmkit.checkpoints.families import FAMILIES

    base = schedule.diffusers or dict(FAMILIES["svd"].scheduler)
    return {**base, "_diffusers_version": DIFFUSERS_VERSION, "prediction_type": schedule.prediction_type}
