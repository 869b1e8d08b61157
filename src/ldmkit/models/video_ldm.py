"""A video latent diffusion model: the video UNet (models/video_unet.py) in the latent space of an autoencoder —
the temporal one (models/video_autoencoder.py) or an image one decoding each frame — conditioned on an image
through a CLIP vision tower (Stable Video Diffusion: image-to-video) or on a prompt through a text tower
(text-to-video, ldmkit's own). Attribute names are the original single file's (`model.diffusion_model`,
`first_stage_model`, `cond_stage_model`), so weights load by name."""

from dataclasses import asdict, dataclass, field

from torch import nn

from ldmkit.errors import ConfigError
from ldmkit.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldmkit.models.ldm import ScheduleConfig
from ldmkit.models.text import TextEncoder, TextEncoderConfig
from ldmkit.models.video_autoencoder import TemporalAutoencoder
from ldmkit.models.video_unet import VideoUNet, VideoUNetConfig
from ldmkit.models.vision import ImageEncoder

# CLIP's normalisation (OpenAI's mean and std), what SVD's feature extractor applies
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VideoModelConfig:
    family: str
    unet: VideoUNetConfig
    vae: AutoencoderConfig
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(prediction_type="v_prediction"))
    # the default output size (SVD: 1024 × 576)
    width: int = 1024
    height: int = 576
    # the image tower's input normalisation (its feature extractor's)
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    # a text tower: text-to-video (the UNet takes the noisy latent alone); None: image-to-video (the noisy
    # latent and the conditioning frame's)
    text: TextEncoderConfig | None = None
    # the temporal decoder (SVD's), or an image autoencoder decoding each frame on its own
    temporal_decoder: bool = True

    def __post_init__(self):
        f = self.vae.downsample_factor
        if self.width % f or self.height % f:
            raise ConfigError(f"VideoModelConfig: default size {self.width}x{self.height} is not a multiple of {f}")
        wanted = self.vae.embed_dim * (1 if self.text is not None else 2)
        if self.unet.in_channels != wanted:
            what = "the noisy latent" if self.text is not None else "noisy latent + the image's"
            raise ConfigError(
                f"VideoModelConfig: its UNet takes {wanted} channels ({what}); this one {self.unet.in_channels}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


class VideoDiffusion(nn.Module):
    def __init__(self, config: VideoModelConfig, image_encoder: ImageEncoder | None = None):
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.diffusion_model = VideoUNet(config.unet)
        temporal = config.temporal_decoder
        self.first_stage_model = TemporalAutoencoder(config.vae) if temporal else AutoencoderKL(config.vae)
        if config.text is not None:
            self.cond_stage_model = TextEncoder(config.text)
        self.image_encoder = image_encoder  # not a submodule: its weights are the tower's own file

    @classmethod
    def from_parts(cls, config: VideoModelConfig, unet: VideoUNet, vae, text_encoder=None) -> "VideoDiffusion":
        """A model made of existing networks (shared, not copied), without building new ones."""
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model.config = config
        model.model = nn.Module()
        model.model.diffusion_model = unet
        model.first_stage_model = vae
        if text_encoder is not None:
            model.cond_stage_model = text_encoder
        model.image_encoder = None
        return model

    @property
    def unet(self) -> VideoUNet:
        return self.model.diffusion_model

    @property
    def vae(self) -> TemporalAutoencoder | AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoder(self) -> TextEncoder | None:
        return getattr(self, "cond_stage_model", None)
