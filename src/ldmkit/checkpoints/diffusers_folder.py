"""The diffusers folder layout (unet/, vae/, text_encoder/, tokenizer/, scheduler/, model_index.json),
read and written through the key maps in keymaps.py and the config translations in diffusers_configs.py.

What diffusers has no place for travels in two extra files that diffusers ignores: `ldmkit.json`
(our ModelConfig: family, clip skip, what was guessed) and `ldmkit_extra.safetensors` (the stored
training schedule, and the parts of SD 2's OpenCLIP tower that diffusers drops: its unused last
block and `text_projection`)."""

from pathlib import Path

import torch

from ldmkit.checkpoints import keymaps
from ldmkit.checkpoints.components import strict_load
from ldmkit.checkpoints.diffusers_configs import (
    DIFFUSERS_VERSION,
    schedule_from_diffusers,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    vae_config_from_diffusers,
    vae_config_from_diffusers_weights,
    vae_config_to_diffusers,
)
from ldmkit.checkpoints.diffusers_text import (
    cast_floats,
    component_weights,
    family_of,
    load_sdxl_towers,
    load_text_tower,
    read_json,
    text_configs,
    write_sdxl_towers,
    write_text_encoder,
    write_tokenizer,
)
from ldmkit.checkpoints.families import pipeline_family
from ldmkit.checkpoints.files import atomic_folder, read_tensors, write_json, write_safetensors
from ldmkit.checkpoints.sd3_folder import load_sd3_folder
from ldmkit.errors import CheckpointError, ConfigError
from ldmkit.models.autoencoder import AutoencoderKL
from ldmkit.models.ldm import LatentDiffusion, ModelConfig, ScheduleConfig

# The config translations are read through this module too (loading single files, ControlNets).
__all__ = [
    "load_diffusers",
    "load_diffusers_vae",
    "save_diffusers",
    "schedule_from_diffusers",
    "unet_config_from_diffusers",
    "unet_config_to_diffusers",
    "vae_config_from_diffusers",
    "vae_config_from_diffusers_weights",
    "vae_config_to_diffusers",
]

EXTRA = "ldmkit_extra.safetensors"


def load_diffusers_vae(folder: Path, dtype: torch.dtype | None = None) -> AutoencoderKL:
    """dtype: built empty in it and filled with the file's tensors, converted as they are read."""
    config = vae_config_from_diffusers(read_json(folder / "config.json"), str(folder))
    if dtype is None:
        vae = AutoencoderKL(config)
    else:
        with torch.device("meta"):
            vae = AutoencoderKL(config).to(dtype)
    state = component_weights(folder, ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"), dtype)
    strict_load(vae, keymaps.vae_from_diffusers(state, config), "autoencoder", str(folder))
    return vae.eval()


# --- reading a pipeline folder -------------------------------------------------------------------


def load_diffusers(path: str | Path, overrides: dict | None = None, dtype_rule=None) -> LatentDiffusion:
    """dtype_rule: the UNet's and autoencoder's dtype for the config (single_file.load_single_file)."""
    from ldmkit.checkpoints.detect import _apply_overrides

    folder = Path(path)
    where = str(folder)
    index = read_json(folder / "model_index.json") if (folder / "model_index.json").exists() else {}
    family = pipeline_family(str(index.get("_class_name", "")))
    if family is not None and family.backbone == "video_unet":
        raise CheckpointError(f"{where}: a video model ({family.title}); make videos with `ldmkit generate-video`")
    if family is not None and family.backbone == "mmdit":
        if overrides:
            raise CheckpointError(f"{where}: {', '.join(overrides)}: not for a {family.title} folder")
        return load_sd3_folder(folder, family.name, dtype_rule)
    if not (folder / "unet" / "config.json").exists():
        raise CheckpointError(f"{where}: a diffusers folder without unet/config.json; only full pipelines load here")
    saved = None
    if (folder / "ldmkit.json").exists():
        try:
            saved = ModelConfig.from_dict(read_json(folder / "ldmkit.json"), f"{folder / 'ldmkit.json'}")
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
    extra = {}
    if (folder / EXTRA).exists():
        extra, _ = read_tensors(folder / EXTRA)
    unet_json = read_json(folder / "unet" / "config.json")
    try:  # configs are files from anywhere: a value of the wrong type is a refused file, not a crash
        unet = unet_config_from_diffusers(unet_json, f"{folder / 'unet'}")
        vae = vae_config_from_diffusers(read_json(folder / "vae" / "config.json"), f"{folder / 'vae'}")
        text, text_2 = (saved.text, saved.text_2) if saved is not None else text_configs(folder, extra)
        sched_file = folder / "scheduler" / "scheduler_config.json"
        schedule = schedule_from_diffusers(read_json(sched_file)) if sched_file.exists() else ScheduleConfig()
    except KeyError as e:
        raise CheckpointError(f"{where}: a config lacks {str(e)[:100]}, which a diffusers config has") from None
    except (TypeError, ValueError, AttributeError, IndexError) as e:
        raise CheckpointError(f"{where}: a config value of the wrong kind ({str(e)[:200]})") from None
    guessed = {}
    if saved is not None:
        family, guessed = saved.family, dict(saved.guessed)
        guessed.pop("schedule.prediction_type", None)  # the scheduler config says it
    else:
        family = family_of(text, text_2, unet.in_channels, schedule.prediction_type)
    image_size = saved.image_size if saved else unet_json.get("sample_size", 64) * vae.downsample_factor
    config = ModelConfig(
        family=family,
        unet=unet,
        vae=vae,
        text=text,
        text_2=text_2,
        schedule=schedule,
        guessed=guessed,
        image_size=image_size,
        zero_empty_negative=saved.zero_empty_negative if saved else bool(index.get("force_zeros_for_empty_prompt")),
    )
    _apply_overrides(config, dict(overrides or {}), where)
    dtype = dtype_rule(config) if dtype_rule else torch.float32
    model = LatentDiffusion(config, empty=True, dtype=dtype)
    convert = None if dtype == torch.float32 else dtype  # fp32 tensors stay mapped from the file
    strict_load(
        model.unet,
        keymaps.rename(
            component_weights(
                folder / "unet", ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"), convert
            ),
            keymaps.unet_to_diffusers(unet),
            reverse=True,
        ),
        "UNet",
        f"{folder / 'unet'}",
    )
    model.first_stage_model = load_diffusers_vae(folder / "vae", convert)
    if config.conditioner:
        load_sdxl_towers(model, folder, extra)
    else:
        load_text_tower(model, folder, text, extra)
    if "alphas_cumprod" in extra:
        model.alphas_cumprod = extra["alphas_cumprod"].float()
    return model.eval()


# --- writing one ---------------------------------------------------------------------------------


def save_diffusers(model: LatentDiffusion, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write a diffusers pipeline folder. Written beside the destination, then renamed into place:
    an interrupted conversion never leaves a half-written model."""
    atomic_folder(path, lambda tmp: _write_diffusers(model, tmp, dtype))


def _write_diffusers(model: LatentDiffusion, out: Path, dtype) -> None:
    c = model.config
    if c.sd3:
        raise CheckpointError("writing an SD3 model as a diffusers folder: not supported yet")
    for sub in ("unet", "vae", "scheduler"):
        (out / sub).mkdir()
    _write_unet_and_vae(model, out, dtype)
    if c.conditioner:
        extra, towers = write_sdxl_towers(model, out, dtype)
        pipeline = "StableDiffusionXLPipeline"
        if c.text_2 is None:  # the refiner is an image-to-image model
            pipeline = "StableDiffusionXLImg2ImgPipeline"
        if c.unet.in_channels == 9:
            pipeline = "StableDiffusionXLInpaintPipeline"
    else:
        (out / "text_encoder").mkdir()
        (out / "tokenizer").mkdir()
        extra, text_class = write_text_encoder(model, out / "text_encoder", dtype)
        towers = {"text_encoder": ["transformers", text_class]}
        towers["tokenizer"] = ["transformers", write_tokenizer(model, out / "tokenizer")]
        towers.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
        pipeline = "StableDiffusionInpaintPipeline" if c.unet.in_channels == 9 else "StableDiffusionPipeline"
    scheduler = _scheduler_config(c.schedule)
    write_json(out / "scheduler" / "scheduler_config.json", scheduler)
    if model.alphas_cumprod is not None:
        extra["alphas_cumprod"] = model.alphas_cumprod
    if extra:
        write_safetensors(out / EXTRA, extra, {"format": "pt"})
    index = {"_class_name": pipeline, "_diffusers_version": DIFFUSERS_VERSION}
    index.update(unet=["diffusers", "UNet2DConditionModel"], vae=["diffusers", "AutoencoderKL"], **towers)
    index.update(scheduler=["diffusers", scheduler["_class_name"]], image_encoder=[None, None])
    write_json(out / "model_index.json", index)
    write_json(out / "ldmkit.json", c.to_dict())


def _write_unet_and_vae(model: LatentDiffusion, out: Path, dtype) -> None:
    c = model.config
    write_json(out / "unet" / "config.json", unet_config_to_diffusers(c.unet, c.image_size // c.vae.downsample_factor))
    write_safetensors(
        out / "unet" / "diffusion_pytorch_model.safetensors",
        cast_floats(keymaps.rename(model.unet.state_dict(), keymaps.unet_to_diffusers(c.unet)), dtype),
        {"format": "pt"},
    )
    write_json(out / "vae" / "config.json", vae_config_to_diffusers(c.vae, c.image_size))
    write_safetensors(
        out / "vae" / "diffusion_pytorch_model.safetensors",
        cast_floats(keymaps.vae_to_diffusers_state(model.vae.state_dict(), c.vae), dtype),
        {"format": "pt"},
    )


# The scheduler config SD's folders ship (PNDM), without the training schedule's fields.
SD_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": DIFFUSERS_VERSION,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
}


def _scheduler_config(schedule: ScheduleConfig) -> dict:
    """The model's own scheduler config, or for a model that came without one the PNDM config SD's
    folders ship (which also completes one that names no scheduler class); the training schedule's
    fields always ours."""
    scheduler = schedule.diffusers
    if "_class_name" not in scheduler:
        scheduler = {**SD_SCHEDULER, **scheduler}
    return {
        **scheduler,
        "num_train_timesteps": schedule.num_train_timesteps,
        "beta_start": schedule.beta_start,
        "beta_end": schedule.beta_end,
        "beta_schedule": schedule.beta_schedule,
        "prediction_type": schedule.prediction_type,
    }
