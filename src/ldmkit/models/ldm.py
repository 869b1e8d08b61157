"""The latent diffusion model as one object: denoiser, autoencoder, text encoder and the training
noise schedule they belong to. Attribute names make `state_dict()` the original single-file layout
(`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`; SDXL's `conditioner.*`, SD3's
`text_encoders.*`). The denoiser is a U-Net (models/unet.py) or SD3's transformer (models/mmdit.py); both
take (x, t, context, y) and keep the U-Net's attribute name, `unet`."""

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ldmkit.config import from_dict, to_dict
from ldmkit.errors import ConfigError
from ldmkit.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldmkit.models.conditioner import Conditioner
from ldmkit.models.mmdit import MMDiT, MMDiTConfig
from ldmkit.models.sd3_text import SD3TextConfig, SD3TextEncoders
from ldmkit.models.text import TextEncoder, TextEncoderConfig
from ldmkit.models.unet import UNetConfig, UNetModel

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")  # flow: rectified flow's velocity


@dataclass
class ScheduleConfig:
    """The noise schedule the denoiser was trained with (diffusers' scheduler vocabulary)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    # A diffusers scheduler_config.json found with the model, kept verbatim for the samplers.
    diffusers: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"prediction_type: {self.prediction_type!r}; allowed: {list(PREDICTION_TYPES)}")


@dataclass
class ModelConfig:
    family: str
    unet: UNetConfig | MMDiTConfig  # the denoiser: a U-Net, or SD3's transformer
    vae: AutoencoderConfig
    text: TextEncoderConfig | SD3TextConfig  # SD3: its three towers together
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # The resolution the model was trained at (SD 1: 512, SD 2-v: 768): the default output size.
    image_size: int = 512
    # A linear map from (scaled) latents to RGB, one row per latent channel plus a bias row, fitted
    # after training so that step previews need no decoder pass (SD's is built in).
    latent_rgb: tuple[tuple[float, ...], ...] | None = None
    # Values that the weights could not tell and that came from family rules (shown by `inspect`).
    guessed: dict = field(default_factory=dict)
    # The words of its training captions when they are a closed world (data/vocabulary.py); () if open.
    vocabulary: tuple[str, ...] = ()
    # SDXL: a second text tower read beside the first (models/conditioner.py); the model is then laid
    # out as the original's `conditioner.embedders.N`, as it is too when `text` alone pools (refiner).
    text_2: TextEncoderConfig | None = None
    # An empty negative prompt is zeros, not the encoded "" (diffusers' force_zeros_for_empty_prompt,
    # the web UI's rule for SDXL).
    zero_empty_negative: bool = False

    @property
    def sd3(self) -> bool:
        """Whether the text towers are SD3's (models/sd3_text.py)."""
        return isinstance(self.text, SD3TextConfig)

    @property
    def conditioner(self) -> bool:
        """Whether the text towers are SDXL's conditioner (pooled vector and micro-conditioning)."""
        return not self.sd3 and (self.text_2 is not None or self.text.pooled)

    @property
    def text_configs(self) -> list[TextEncoderConfig]:
        """The CLIP-style towers (those a clip skip applies to)."""
        if self.sd3:
            return [self.text.clip_l, self.text.clip_g]
        return [self.text] if self.text_2 is None else [self.text, self.text_2]

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "ModelConfig":
        for key in ("unet", "vae", "text"):
            if isinstance(d, dict) and key not in d:
                raise ConfigError(f"{where}: missing '{key}' section")
        return from_dict(cls, d, where)


def build_backbone(config: UNetConfig | MMDiTConfig) -> UNetModel | MMDiT:
    return MMDiT(config) if isinstance(config, MMDiTConfig) else UNetModel(config)


class _DiffusionWrapper(nn.Module):
    """Only here so the UNet's keys read `model.diffusion_model.*`, as in every SD file."""

    def __init__(self, unet: UNetModel | MMDiT):
        super().__init__()
        self.diffusion_model = unet


class LatentDiffusion(nn.Module):
    def __init__(self, config: ModelConfig, empty: bool = False, dtype: torch.dtype = torch.float32):
        """empty: the UNet and the autoencoder are built on the meta device -- no memory, no random
        init -- for a loader to fill with the file's tensors (checkpoints.components.strict_load), so
        loading holds the weights once, not twice. dtype: the UNet's and the autoencoder's (the text
        tower stays fp32)."""
        super().__init__()
        self.config = config
        with torch.device("meta") if empty else contextlib.nullcontext():
            self.model = _DiffusionWrapper(build_backbone(config.unet).to(dtype))
            self.first_stage_model = AutoencoderKL(config.vae).to(dtype)
        if config.sd3:  # T5-XXL's 4.7 G parameters are not drawn at random before a loader fills them
            self.text_encoders = SD3TextEncoders(config.text, empty_t5=empty)
        elif config.conditioner:
            self.conditioner = Conditioner(config.text_configs)
        else:
            self.cond_stage_model = TextEncoder(config.text)
        # The training schedule stored in the file (SD files carry `alphas_cumprod`), if any.
        self.alphas_cumprod: torch.Tensor | None = None

    @classmethod
    def from_parts(
        cls,
        config: ModelConfig,
        unet: UNetModel,
        vae: AutoencoderKL,
        text_encoder: TextEncoder,
        alphas_cumprod: torch.Tensor | None = None,
    ) -> "LatentDiffusion":
        """A model made of existing networks (shared, not copied), without building new ones."""
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model.config = config
        model.model = _DiffusionWrapper(unet)
        model.first_stage_model = vae
        if config.sd3:
            model.text_encoders = text_encoder
        elif config.conditioner:
            model.conditioner = text_encoder
        else:
            model.cond_stage_model = text_encoder
        model.alphas_cumprod = alphas_cumprod
        return model

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoder(self) -> TextEncoder | Conditioner | SD3TextEncoders:
        if self.config.sd3:
            return self.text_encoders
        return self.conditioner if self.config.conditioner else self.cond_stage_model

    def use_measured_memory_format(self) -> "LatentDiffusion":
        """Per-network memory layout chosen by measurement (benchmarks/memory_format.py --precision
        fp32|bf16, SD 1.5 sizes, 2-core Xeon): channels-last decodes 1.16x (fp32) and 2.4x (bf16) faster
        in the VAE; it runs an fp32 UNet 0.85-0.98x as fast but a bf16 one 1.17-1.19x faster, so the
        UNet's layout follows its dtype: call again after a dtype change. Outputs are equal either way
        (within float rounding)."""
        bf16 = next(self.unet.parameters()).dtype == torch.bfloat16
        self.unet.to(memory_format=torch.channels_last if bf16 else torch.contiguous_format)
        self.vae.to(memory_format=torch.channels_last)
        return self

    def parameter_counts(self) -> dict[str, int]:
        return {
            name: sum(p.numel() for p in module.parameters())
            for name, module in (("unet", self.unet), ("vae", self.vae), ("text_encoder", self.text_encoder))
        }
