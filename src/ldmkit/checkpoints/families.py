"""Model families as data: one row per family — what it is, how a file or folder betrays it, and what
its weights cannot say (attention heads, prediction type, native size). Every reader (single files,
diffusers folders, ControlNets) and `inspect` consult this table; adding a family is a row (plus its
modules), not another branch in each reader."""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    supported: bool = True
    # Text tower: "clip" (OpenAI CLIP ViT-L), "openclip" (OpenCLIP ViT-H, read at its penultimate
    # layer), "bert" (ldmkit's own models); its single-file layout tells the family apart.
    text_kind: str | None = None
    inpainting: bool = False  # a 9-channel UNet: latent, mask and masked-image latent
    # The prediction type the family's weights are trained for; None: the scheduler config or a rule says.
    prediction: str | None = None
    # UNet heads, which no tensor shape reveals: a count, or channels per head.
    unet_heads: dict = field(default_factory=dict)
    image_size: int = 512  # native output side (default generation size)
    # Cross-attention width of its ControlNets, which tells a ControlNet file's base family.
    controlnet_context: int | None = None
    # Unsupported families: key fragments that betray a single file (prefixes, or a substring).
    markers: tuple[str, ...] = ()


_SD1 = dict(text_kind="clip", unet_heads={"num_heads": 8, "num_head_channels": -1}, controlnet_context=768)
_SD2 = dict(text_kind="openclip", unet_heads={"num_head_channels": 64}, controlnet_context=1024)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("sd1", "Stable Diffusion 1.x", prediction="epsilon", **_SD1),
        Family("sd1-inpainting", "Stable Diffusion 1.x inpainting", inpainting=True, prediction="epsilon", **_SD1),
        Family("sd2-eps", "Stable Diffusion 2.x (eps, 512)", prediction="epsilon", **_SD2),
        Family("sd2-v", "Stable Diffusion 2.x (v, 768)", prediction="v_prediction", image_size=768, **_SD2),
        Family("sd2-inpainting", "Stable Diffusion 2.x inpainting", inpainting=True, prediction="epsilon", **_SD2),
        Family("ldmkit", "ldmkit's own (BERT-family text encoder)", text_kind="bert"),
        Family("sdxl", "SDXL", supported=False, markers=("conditioner.embedders.",)),
        Family("sd3", "SD3", supported=False, markers=("*joint_blocks.",)),
        Family("flux", "Flux", supported=False, markers=("double_blocks.", "model.diffusion_model.double_blocks.")),
    ]
}


def _marks(marker: str, key: str) -> bool:
    return marker[1:] in key if marker.startswith("*") else key.startswith(marker)


def unsupported_family(keys) -> Family | None:
    """The family of a single file ldmkit recognises but cannot run yet, from its keys."""
    keys = list(keys)
    for f in FAMILIES.values():
        if not f.supported and any(_marks(m, k) for m in f.markers for k in keys):
            return f
    return None


def sd_family(text_kind: str, in_channels: int, prediction: str | None = None) -> Family:
    """The supported family of a model with this text tower, UNet input and (if known) prediction
    type: the first row that fits (rows with a fixed prediction type must match it)."""
    for f in FAMILIES.values():
        if f.supported and f.text_kind == text_kind and f.inpainting == (in_channels == 9):
            if prediction is None or f.prediction in (None, prediction):
                return f
    # A v-prediction inpainting model, or a prediction no row fixes: the base row of that text tower.
    return next(f for f in FAMILIES.values() if f.supported and f.text_kind == text_kind)


def controlnet_family(context_dim: int) -> Family | None:
    """The base family of a ControlNet, from its cross-attention width."""
    return next((f for f in FAMILIES.values() if f.controlnet_context == context_dim and not f.inpainting), None)
