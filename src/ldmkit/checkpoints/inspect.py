"""`ldmkit inspect`: what a checkpoint holds, as a dict ready for JSON."""

from pathlib import Path

from ldmkit.checkpoints.components import stored_dtypes
from ldmkit.checkpoints.detect import UNET, VAE_FILE_PREFIXES, detect, unsupported_note
from ldmkit.checkpoints.files import DIFFUSERS, safetensors_dtypes, sniff
from ldmkit.checkpoints.single_file import build, load_model, load_vae_file, read_model_tensors, replace_vae
from ldmkit.models.ldm import LatentDiffusion


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(model: LatentDiffusion) -> dict:
    c = model.config
    if c.sd3:
        from ldmkit.checkpoints.sd3_files import TOWERS, describe_config

        return describe_config(c, {n: getattr(c.text, n) for n in TOWERS}) | {"parameters": model.parameter_counts()}
    info = {
        "family": c.family,
        "supported": True,
        "parameters": model.parameter_counts(),
        "latent_channels": c.unet.in_channels if c.unet.in_channels != 9 else 4,
        "unet_in_channels": c.unet.in_channels,
        "vae_downsample_factor": c.vae.downsample_factor,
        "vae_scale_factor": c.vae.scale_factor,
        "prediction_type": c.schedule.prediction_type,
        "image_size": c.image_size,
        "context_dim": c.unet.context_dim,
        "text_encoder": {
            "kind": c.text.kind,
            "layers": c.text.num_layers,
            "clip_skip": c.text.clip_skip,
            "package": c.text.package,
        },
        "stored_alphas_cumprod": model.alphas_cumprod is not None,
        "guessed": c.guessed,
    }
    if c.text_2 is not None:  # SDXL's second tower (OpenCLIP-bigG)
        info["text_encoder_2"] = {"kind": c.text_2.kind, "layers": c.text_2.num_layers, "clip_skip": c.text_2.clip_skip}
    return info


def inspect_path(
    path: str | Path,
    vae: str | Path | None = None,
    overrides: dict | None = None,
    text_encoders: str | Path | None = None,
) -> dict:
    """text_encoders: a folder with the text towers an SD3 file lacks (the file is then loaded whole)."""
    from ldmkit.checkpoints import ip_adapter_files, sd3_files, taesd_files
    from ldmkit.checkpoints.controlnet_files import describe_controlnet, is_controlnet_path, load_controlnet
    from ldmkit.checkpoints.video_files import describe_video, load_video_model, video_family

    fmt = sniff(path)
    info: dict = {"path": str(path), "format": fmt}
    if video_family(path) is not None:
        info.update(describe_video(load_video_model(path)))
        return info
    if is_controlnet_path(path):
        net = load_controlnet(path)
        info.update(describe_controlnet(net))
        files = Path(path).glob("*.safetensors") if Path(path).is_dir() else [Path(path)]
        info["dtype"] = sorted(set().union(*(safetensors_dtypes(f) for f in files if sniff(f) == "safetensors")))
        return info
    if fmt == DIFFUSERS and taesd_files.is_tiny_autoencoder_folder(path):
        info.update(taesd_files.read_tiny_autoencoder(path).describe())
        info["dtype"] = sorted(set().union(*(safetensors_dtypes(f) for f in Path(path).glob("*.safetensors"))))
        return info
    if fmt != DIFFUSERS and ip_adapter_files.is_ip_adapter_file(path):
        info.update(ip_adapter_files.describe(ip_adapter_files.read_ip_adapter(path).config))
        return info
    if fmt == DIFFUSERS:
        model = load_model(path, vae=vae, overrides=overrides, text_encoders=text_encoders)
        info.update(describe(model))
        stored = set()
        for f in Path(path).glob("*/*.safetensors"):
            stored |= safetensors_dtypes(f)
        info["dtype"] = sorted(stored)
        return info
    state, metadata = read_model_tensors(path)
    info["dtype"] = stored_dtypes(state)
    if taesd_files.is_tiny_autoencoder_state(state):  # TAESD: a file of one part's layers, or both parts'
        info.update(taesd_files.tiny_autoencoder_from_state(state, metadata, path).describe())
        return info
    if sd3_files.file_family(state, metadata) is not None:  # described from names and shapes: towers may be elsewhere
        info.update(sd3_files.describe_file(state, metadata, str(path)))
        if vae is not None or text_encoders is not None or overrides:
            present = info["text_encoders"]
            info.update(describe(load_model(path, vae=vae, overrides=overrides, text_encoders=text_encoders)))
            for name, tower in info["text_encoders"].items():
                tower["in_file"] = present[name]["present"]
        return info
    sd3_files.refuse_text_encoders(text_encoders, path)
    unsupported = unsupported_note(set(state))
    if unsupported and "ldmkit" not in metadata:
        info.update({"family": unsupported[0], "supported": False, "note": unsupported[1]})
        return info
    if not any(k.startswith(UNET) for k in state) and any(k.startswith(VAE_FILE_PREFIXES) for k in state):
        vae_model = load_vae_file(path)
        info.update(
            {
                "family": "vae",
                "supported": True,
                "parameters": {"vae": _params(vae_model)},
                "latent_channels": vae_model.config.embed_dim,
                "vae_downsample_factor": vae_model.config.downsample_factor,
                "note": "an autoencoder alone: use it with --vae",
            }
        )
        return info
    model = build(detect(state, metadata, str(path), overrides), state, str(path))
    if vae is not None:
        replace_vae(model, vae)
    info.update(describe(model))
    return info
