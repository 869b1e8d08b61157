"""A diffusers StableDiffusion3Pipeline folder (transformer/, vae/, text_encoder/, text_encoder_2/,
text_encoder_3/, their tokenizers, scheduler/) read into a LatentDiffusion whose denoiser is the MMDiT:
the transformer through checkpoints/mmdit_keys.py, the towers through sd3_text_files.py, the 16-channel
autoencoder with its scale and shift as any diffusers VAE. The scheduler config (FlowMatch*) travels in
the schedule, so its shift (static or resolution-dependent) decides every sampler's sigmas."""

from pathlib import Path

import torch

from ldmkit.checkpoints import mmdit_keys
from ldmkit.checkpoints.components import strict_load
from ldmkit.checkpoints.diffusers_text import component_weights, read_json
from ldmkit.checkpoints.sd3_text_files import load_sd3_text_folder
from ldmkit.errors import CheckpointError
from ldmkit.models.ldm import LatentDiffusion, ModelConfig, ScheduleConfig
from ldmkit.models.mmdit import MMDiT

WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def flow_schedule_config(folder: Path) -> ScheduleConfig:
    """The training schedule a flow model's scheduler config gives (its fields kept for the samplers)."""
    path = folder / "scheduler" / "scheduler_config.json"
    cfg = read_json(path) if path.exists() else {}
    steps = cfg.get("num_train_timesteps", 1000)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise CheckpointError(f"{path}: num_train_timesteps {steps!r}; expected a positive integer")
    return ScheduleConfig(num_train_timesteps=steps, prediction_type="flow", diffusers=cfg)


def load_sd3_folder(folder: Path, family: str, dtype_rule=None, t5: bool = True) -> LatentDiffusion:
    """dtype_rule: the transformer's and autoencoder's dtype for the config (as for U-Net models);
    t5=False leaves T5 out (zeros in its place, as diffusers runs SD3 without it)."""
    from ldmkit.checkpoints.diffusers_folder import load_diffusers_vae, vae_config_from_diffusers

    where = folder / "transformer"
    backbone = mmdit_keys.config_from_diffusers(read_json(where / "config.json"), str(where / "config.json"))
    text = load_sd3_text_folder(folder, t5=t5)
    config = ModelConfig(
        family=family,
        unet=backbone,
        vae=vae_config_from_diffusers(read_json(folder / "vae" / "config.json"), str(folder / "vae")),
        text=text.config,
        schedule=flow_schedule_config(folder),
        image_size=backbone.sample_size * 8,
    )
    dtype = dtype_rule(config) if dtype_rule else torch.float32
    convert = None if dtype == torch.float32 else dtype
    with torch.device("meta"):
        unet = MMDiT(backbone).to(dtype)
    state = mmdit_keys.diffusers_to_ours(component_weights(where, WEIGHTS, convert), backbone, str(where))
    strict_load(unet, state, "transformer", str(where))
    vae = load_diffusers_vae(folder / "vae", convert)
    config.image_size = backbone.sample_size * vae.config.downsample_factor
    return LatentDiffusion.from_parts(config, unet, vae, text).eval()
