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


PRESETS = {"sd15": sd15, "sd21": sd21, "sd21-base": lambda: sd21(v=False), "tiny": tiny}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; allowed: {sorted(PRESETS)}")
    return PRESETS[name]()
