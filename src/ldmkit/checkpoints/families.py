"""Model families as data: one row per family — what it is, how a file or folder betrays it, and what
its weights cannot say (attention heads, prediction type, native size). Every reader (single files,
diffusers folders, ControlNets) and `inspect` consult this table; adding a family is a row (plus its
modules), not another branch in each reader."""

from dataclasses import dataclass, field

from ldmkit.errors import CheckpointError


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
    # Denoiser heads, which no tensor shape reveals: a U-Net's count or channels per head, an MMDiT's
    # channels per head (`head_dim`).
    unet_heads: dict = field(default_factory=dict)
    image_size: int = 512  # native output side (default generation size)
    # Cross-attention width of the adapters made for it (ControlNets, IP-Adapters), which tells an adapter
    # file's base family.
    adapter_context: int | None = None
    # SDXL ControlNets: each micro-conditioning number's width in their addition embedding (`label_emb`),
    # which a ControlNet's weights alone cannot say (no text tower beside it gives the pooled width).
    controlnet_micro_width: int | None = None
    # Key fragments that betray a single file (prefixes, or a substring after "*"): how files of the
    # families told apart by their layout, not by their text towers, are recognised (SD3, FLUX).
    markers: tuple[str, ...] = ()
    # SDXL's conditioner: a second tower ("openclip": OpenCLIP-bigG) and a pooled vector for the UNet.
    text_2_kind: str | None = None
    pooled: bool = False
    # The latent scale its UNet was trained with (the autoencoder's `scale_factor`), which no weight holds.
    vae_scale_factor: float = 0.18215
    # SDXL: how many micro-conditioning numbers the addition embedding takes (base 6, refiner 5); with
    # the pooled width it tells each number's embedding width from the UNet's `label_emb` shape.
    micro_conditions: int | None = None
    # An empty negative prompt is zeros (diffusers' force_zeros_for_empty_prompt, SDXL base).
    zero_empty_negative: bool = False
    # Trained for the last steps only (SDXL's refiner): it repaints images, it does not draw from noise.
    image_to_image_only: bool = False
    # The denoiser: "unet" (models/unet.py), "mmdit" (SD3's transformer, models/mmdit.py) or "video_unet" (a
    # UNet with temporal layers, models/video_unet.py: generate-video's models).
    backbone: str = "unet"
    # diffusers pipeline classes (model_index.json's _class_name) whose folders are this family's.
    diffusers_pipelines: tuple[str, ...] = ()
    # What a generation leaves out (steps, cfg, sampler), where the family's reference pipeline differs
    # from the web UI's defaults; {}: those (pipelines/params.CALL_DEFAULTS).
    call_defaults: dict = field(default_factory=dict)
    # The autoencoder's latent shift (SD3's 16-channel VAE), which no weight holds.
    vae_shift_factor: float = 0.0
    # The diffusers scheduler config its single files mean, which they do not carry (a folder's
    # scheduler/ says it); {}: the schedule's defaults.
    scheduler: dict = field(default_factory=dict)
    # The tiny autoencoder (TAESD) distilled for its latents, by the name its published files carry
    # (taesd_decoder.pth, taesdxl_decoder.safetensors; models/tiny_autoencoder.py); "": none is published.
    tiny_autoencoder: str = ""


_SD1 = dict(
    text_kind="clip",
    unet_heads={"num_heads": 8, "num_head_channels": -1},
    adapter_context=768,
    tiny_autoencoder="taesd",
)
_SD2 = dict(text_kind="openclip", unet_heads={"num_head_channels": 64}, adapter_context=1024, tiny_autoencoder="taesd")
_XL = dict(
    pooled=True,
    prediction="epsilon",
    unet_heads={"num_head_channels": 64},
    image_size=1024,
    vae_scale_factor=0.13025,
    tiny_autoencoder="taesdxl",
)
_REFINER = dict(image_to_image_only=True)
_XL_BASE = dict(text_kind="clip", text_2_kind="openclip", micro_conditions=6, zero_empty_negative=True, **_XL)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("sd1", "Stable Diffusion 1.x", prediction="epsilon", **_SD1),
        Family("sd1-inpainting", "Stable Diffusion 1.x inpainting", inpainting=True, prediction="epsilon", **_SD1),
        Family("sd2-eps", "Stable Diffusion 2.x (eps, 512)", prediction="epsilon", **_SD2),
        Family("sd2-v", "Stable Diffusion 2.x (v, 768)", prediction="v_prediction", image_size=768, **_SD2),
        Family("sd2-inpainting", "Stable Diffusion 2.x inpainting", inpainting=True, prediction="epsilon", **_SD2),
        Family("ldmkit", "ldmkit's own (BERT-family text encoder)", text_kind="bert"),
        Family("sdxl", "SDXL", adapter_context=2048, controlnet_micro_width=256, **_XL_BASE),
        Family("sdxl-inpainting", "SDXL inpainting", inpainting=True, **_XL_BASE),
        Family(
            "sdxl-refiner", "SDXL refiner", text_kind="openclip", micro_conditions=5, image_to_image_only=True, **_XL
        ),
        Family(
            "sd3",
            "SD3 / SD3.5",
            text_kind="sd3",
            prediction="flow",
            image_size=1024,
            vae_scale_factor=1.5305,
            vae_shift_factor=0.0609,
            backbone="mmdit",
            diffusers_pipelines=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"),
            call_defaults={"steps": 28, "cfg": 7.0, "sampler": "euler"},  # StableDiffusion3Pipeline's
            markers=("*joint_blocks.",),
            unet_heads={"head_dim": 64},  # every release: 64 channels per head (heads = depth)
            tiny_autoencoder="taesd3",
            # Stability's SD3 / SD3.5 folders' scheduler_config.json
            scheduler={"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},
        ),
        Family(
            "svd",
            "Stable Video Diffusion (image-to-video)",
            prediction="v_prediction",
            backbone="video_unet",
            image_size=1024,
            unet_heads={"num_head_channels": 64},
            diffusers_pipelines=("StableVideoDiffusionPipeline",),
            markers=("model.diffusion_model.input_blocks.1.0.time_stack.",),
            # StableVideoDiffusionPipeline's call defaults; frames: the UNet's own (14 or 25)
            call_defaults={
                "steps": 25,
                "sampler": "euler",
                "width": 1024,
                "height": 576,
                "min_cfg": 1.0,
                "max_cfg": 3.0,
                "fps": 7,
                "motion_bucket": 127,
                "noise_aug": 0.02,
            },
            # Stability's SVD folders' scheduler_config.json: EDM's sigmas (Karras, 0.002 to 700), continuous
            # timesteps c_noise = ¼ ln σ, v-prediction
            scheduler={
                "_class_name": "EulerDiscreteScheduler",
                "num_train_timesteps": 1000,
                "beta_start": 0.00085,
                "beta_end": 0.012,
                "beta_schedule": "scaled_linear",
                "prediction_type": "v_prediction",
                "interpolation_type": "linear",
                "use_karras_sigmas": True,
                "sigma_min": 0.002,
                "sigma_max": 700.0,
                "timestep_spacing": "leading",
                "timestep_type": "continuous",
                "steps_offset": 1,
            },
        ),
        Family(
            "ldmkit-video",
            "ldmkit's own text-to-video (BERT-family text encoder)",
            text_kind="bert",
            backbone="video_unet",
            image_size=64,
            call_defaults={"steps": 20, "sampler": "euler_a", "cfg": 3.0, "fps": 8},
        ),
        Family(
            "flux",
            "Flux",
            supported=False,
            markers=("double_blocks.", "model.diffusion_model.double_blocks."),
            vae_scale_factor=0.3611,  # FLUX's autoencoder (diffusers' AutoencoderKL config for FLUX.1)
            vae_shift_factor=0.1159,
            tiny_autoencoder="taef1",
        ),
    ]
}


def _marks(marker: str, key: str) -> bool:
    return marker[1:] in key if marker.startswith("*") else key.startswith(marker)


def marked_family(keys) -> Family | None:
    """The family whose markers a single file's keys carry, if a row's do."""
    keys = list(keys)
    return next((f for f in FAMILIES.values() if any(_marks(m, k) for m in f.markers for k in keys)), None)


def unsupported_family(keys) -> Family | None:
    """The family of a single file ldmkit recognises but cannot read yet, from its keys."""
    f = marked_family(keys)
    return f if f is not None and not f.supported else None


def sd_family(
    text_kind: str, in_channels: int, prediction: str | None = None, text_2=None, pooled: bool = False
) -> Family:
    """The supported family of a model with these text towers (`text_2`: the second tower's config,
    SDXL), UNet input and (if known) prediction type: the first row that fits (rows with a fixed
    prediction type must match it)."""
    towers = (text_kind, None if text_2 is None else text_2.kind, pooled)
    rows = [
        f
        for f in FAMILIES.values()
        if f.supported and f.backbone != "video_unet" and (f.text_kind, f.text_2_kind, f.pooled) == towers
    ]
    for f in rows:
        if f.inpainting == (in_channels == 9) and (prediction is None or f.prediction in (None, prediction)):
            return f
    # A v-prediction inpainting model, or a prediction no row fixes: the base row of those towers.
    if not rows:
        raise CheckpointError(f"no model family has the text towers {towers} (kind, second kind, pooled)")
    return rows[0]


def pipeline_family(class_name: str) -> Family | None:
    """The family whose diffusers folders name this pipeline class (model_index.json), if a row says."""
    return next((f for f in FAMILIES.values() if class_name in f.diffusers_pipelines), None)


def adapter_family(context_dim: int) -> Family | None:
    """The base family of an adapter (ControlNet, IP-Adapter), from its cross-attention width."""
    return next((f for f in FAMILIES.values() if f.adapter_context == context_dim and not f.inpainting), None)
