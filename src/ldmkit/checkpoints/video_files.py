"""Video models from files: a diffusers folder whose pipeline class a video family's row names, or a single
file whose keys carry a video family's marker (the temporal blocks). An image model given here is refused in
one line, as a video model given to the image loaders is."""

from pathlib import Path

from ldmkit.checkpoints.diffusers_text import read_json
from ldmkit.checkpoints.families import Family, marked_family, pipeline_family
from ldmkit.checkpoints.files import DIFFUSERS, read_tensors, sniff
from ldmkit.errors import CheckpointError
from ldmkit.models.video_ldm import VideoDiffusion

VIDEO = "video_unet"


def _folder_family(folder: Path) -> Family | None:
    index = folder / "model_index.json"
    return pipeline_family(str(read_json(index).get("_class_name", ""))) if index.exists() else None


def video_family(path: str | Path) -> Family | None:
    """The video family of a model file or folder, None for anything else (read from names alone)."""
    p = Path(path)
    if sniff(p) == DIFFUSERS:
        f = _folder_family(p)
    else:
        f = marked_family(read_tensors(p)[0])
    return f if f is not None and f.backbone == VIDEO else None


def refuse_video_model(path: str | Path, keys=None) -> None:
    """For the image loaders: a video model is not theirs."""
    p = Path(path)
    f = _folder_family(p) if keys is None else marked_family(keys)
    if f is not None and f.backbone == VIDEO:
        raise CheckpointError(f"{p}: a video model ({f.title}); make videos with `ldmkit generate-video`")


def load_video_model(path: str | Path) -> VideoDiffusion:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such model file or folder")
    f = video_family(p)
    if f is None:
        raise CheckpointError(
            f"{p}: not a video model; generate-video needs one (Stable Video Diffusion: a diffusers folder or its "
            "single file); make images with `ldmkit generate`"
        )
    if p.is_dir():
        from ldmkit.checkpoints.svd_folder import load_svd_folder

        return load_svd_folder(p, f.name)
    from ldmkit.checkpoints.svd_file import load_svd_file

    return load_svd_file(p, f.name)


def describe_video(model: VideoDiffusion) -> dict:
    """What `ldmkit inspect` says of a video model."""
    from ldmkit.checkpoints.families import FAMILIES

    c = model.config

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    temporal_names = ("time_stack", "time_mixer", "time_pos_embed")  # the temporal layers' (nn/temporal.py)
    temporal = sum(p.numel() for n, p in model.unet.named_parameters() if any(t in n for t in temporal_names))
    parameters = {"unet": count(model.unet), "temporal_layers": temporal, "vae": count(model.vae)}
    if model.text_encoder is not None:
        parameters["text_encoder"] = count(model.text_encoder)
    if model.image_encoder is not None:
        parameters["image_encoder"] = count(model.image_encoder.model)
    return {
        "family": c.family,
        "title": FAMILIES[c.family].title if c.family in FAMILIES else c.family,
        "supported": True,
        "kind": "text-to-video" if c.text is not None else "image-to-video",
        "frames": c.unet.num_frames,
        "size": [c.width, c.height],
        "unet_channels": list(c.unet.channels),
        "temporal_decoder": c.temporal_decoder,
        "parameters": parameters,
        "note": "make videos with `ldmkit generate-video`",
    }
