"""Architectures by name: the real SD 1.5 / SD 2.1 shapes (for random-weight parity tests and
benchmarks) and tiny ones for fast tests. Weights are random: these are not trained models."""

from ldmkit.errors import ConfigError
from ldmkit.models.autoencoder import AutoencoderConfig
from ldmkit.models.ldm import ModelConfig, ScheduleConfig
from ldmkit.models.text import TextEncoderConfig
from ldmkit.models.unet import UNetConfig


def sd15() -> ModelConfig:
    return ModelConfig(family="sd1", unet=UNetConfig(), vae=AutoencoderConfig(), text=TextEncoderConfig())


def sd21(v: bool = True) -> ModelConfig:
    return ModelConfig(
        family="sd2-v" if v else "sd2-eps",
        unet=UNetConfig(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
        vae=AutoencoderConfig(),
        text=TextEncoderConfig(
            kind="openclip",
            hidden_size=1024,
            intermediate_size=4096,
            num_layers=24,
            num_heads=16,
            hidden_act="gelu",
            pad_token="!",
            skip_last_layers=1,
        ),
        schedule=ScheduleConfig(prediction_type="v_prediction" if v else "epsilon"),
        image_size=768 if v else 512,
    )


def tiny(kind: str = "clip") -> ModelConfig:
    """A model small enough to build and run in milliseconds (SD 1 layout, 64 px images)."""
    text = TextEncoderConfig(
        kind=kind,
        hidden_size=32,
        intermediate_size=37,
        num_layers=2,
        num_heads=4,
        hidden_act="gelu" if kind == "openclip" else "quick_gelu",
        pad_token="!" if kind == "openclip" else "<|endoftext|>",
    )
    return ModelConfig(
        family="ldmkit",
        unet=UNetConfig(
            channels=(32, 64),
            attention_resolutions=(1, 2),
            num_heads=2,
            context_dim=32,
            norm_groups=8,
        ),
        vae=AutoencoderConfig(channels=(16, 32), num_res_blocks=1, norm_groups=8),
        text=text,
        image_size=64,
    )


def sdxl(scale: int = 1) -> ModelConfig:
    """SDXL base's shapes (scale 1): three levels of 320, 640 and 1280 channels, attention at the last two
    with 2 and 10 transformer blocks (10 in the middle too), 64 channels per head; CLIP ViT-L and
    OpenCLIP ViT-bigG read at their penultimate layers; the addition embedding of the pooled vector and
    six sizes. `scale` > 1 divides every width by it and keeps one layer per tower, for tiny tests."""
    clip = TextEncoderConfig(
        hidden_size=768 // scale,
        intermediate_size=3072 // scale,
        num_layers=12 if scale == 1 else 2,
        num_heads=12 if scale == 1 else 2,
        skip_last_layers=1,
        final_norm=False,
    )
    big_g = TextEncoderConfig(
        kind="openclip",
        hidden_size=1280 // scale,
        intermediate_size=5120 // scale,
        num_layers=32 if scale == 1 else 2,
        num_heads=20 if scale == 1 else 2,
        hidden_act="gelu",
        pad_token="!",
        skip_last_layers=1,
        final_norm=False,
        pooled=True,
        projection_dim=1280 // scale,
    )
    time_dim = 256 // scale
    unet = UNetConfig(
        channels=(320 // scale, 640 // scale, 1280 // scale),
        attention_resolutions=(2, 4),
        num_head_channels=64 // scale,
        transformer_depth=(0, 2, 10) if scale == 1 else (0, 1, 1),
        context_dim=clip.hidden_size + big_g.hidden_size,
        use_linear_in_transformer=True,
        num_classes="sequential",
        adm_in_channels=big_g.projection_dim + 6 * time_dim,
        addition_time_embed_dim=time_dim,
        norm_groups=32 if scale == 1 else 4,
    )
    vae = AutoencoderConfig(scale_factor=0.13025) if scale == 1 else tiny().vae
    return ModelConfig(
        family="sdxl", unet=unet, vae=vae, text=clip, text_2=big_g, image_size=1024, zero_empty_negative=True
    )


PRESETS = {
    "sd15": sd15,
    "sd21": sd21,
    "sd21-base": lambda: sd21(v=False),
    "sdxl": sdxl,
    "tiny": tiny,
    "tiny-xl": lambda: sdxl(scale=16),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; allowed: {sorted(PRESETS)}")
    return PRESETS[name]()
