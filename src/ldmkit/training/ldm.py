"""Stage 2: the latent diffusion model (Rombach et al. 2022, sec. 3.3): a UNet learns to denoise
latents of the frozen autoencoder, conditioned on a frozen text encoder through cross-attention -- or a
transformer (`mmdit`: SD3's joint blocks, text and image tokens in one attention). The objective is the
schedule's prediction type: noise (epsilon), v, or a rectified flow's velocity ("flow", with SD3's
logit-normal noise levels).

A new UNet is built on a trained autoencoder (and our MiniLM text tower, or any text encoder config),
or an existing model is fine-tuned. A new UNet's latents are scaled to unit variance from the data (the
paper's scale-by-std); a fine-tuned model keeps the scale it learned with. What the step does is the
shared latent task's (training/latent_task.py)."""

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ldmkit.data.images import DataConfig, load_batch
from ldmkit.errors import ConfigError
from ldmkit.models.ldm import LatentDiffusion, ModelConfig, ScheduleConfig
from ldmkit.models.mmdit import MMDiTConfig
from ldmkit.models.text import TextEncoderConfig
from ldmkit.models.unet import UNetConfig
from ldmkit.training.latent_task import DenoisingTrainConfig, LatentTask, SampleConfig, TextStates

log = logging.getLogger(__name__)


@dataclass
class LDMTrainConfig(DenoisingTrainConfig):
    autoencoder: str | None = None  # our autoencoder.safetensors (or any VAE file); not with init_from
    init_from: str | None = None  # fine-tune an existing model (SD 1.x/2.x file, diffusers folder, ours)
    unet: UNetConfig | None = None
    mmdit: MMDiTConfig | None = None  # instead of a UNet: the transformer (in/out channels, sizes set here)
    text: str | TextEncoderConfig = "minilm"
    # The schedule to train to (default: SD's, epsilon). Fine-tuning keeps the model's own unless one is
    # given: a model can be taught another prediction type or zero terminal SNR, as Lin et al. 2024
    # fine-tuned SD 2.1 (diffusers' training scripts' --prediction_type does the same).
    schedule: ScheduleConfig | None = None
    cond_dropout: float = 0.1
    # The text tower's last N layers trained with the UNet (0: the tower frozen), their learning rate the
    # run's times text_lr_scale -- as DreamBooth trains the text encoder beside the UNet, here only the top
    # of a BERT tower (our MiniLM), whose changed layers the model's file carries beside the package's.
    text_layers: int = 0
    text_lr_scale: float = 1.0
    scale_batches: int = 4  # batches used to measure the latent std (scale-by-std) of a new UNet
    sample: SampleConfig = field(default_factory=SampleConfig)
    val: DataConfig | None = None  # held-out images for the validation loss (default: the shapes "val" split)

    def check(self) -> None:
        self.autoencoder, self.init_from = (
            None if p is None else str(Path(p).expanduser()) for p in (self.autoencoder, self.init_from)
        )
        if (self.autoencoder is None) == (self.init_from is None):
            raise ConfigError("give exactly one of autoencoder (train a new UNet on it) or init_from (fine-tune)")
        if not (self.text_layers >= 0 and self.text_lr_scale > 0):
            raise ConfigError(
                f"text_layers: {self.text_layers}, text_lr_scale: {self.text_lr_scale}; allowed: N >= 0, scale > 0"
            )
        if self.init_from is None and (self.unet is None) == (self.mmdit is None):
            raise ConfigError("give exactly one backbone, unet or mmdit, when not fine-tuning (init_from)")
        super().check()


def build_model(c: LDMTrainConfig) -> LatentDiffusion:
    from ldmkit.checkpoints.detect import minilm_text_config
    from ldmkit.checkpoints.diffusers_folder import SD_SCHEDULER
    from ldmkit.checkpoints.single_file import load_model, load_package_text_encoder, load_vae_file

    schedule = c.schedule
    if schedule is not None and schedule.diffusers and schedule.prediction_type != "flow":
        # Settings given are read as a scheduler config (diffusers' meaning), whose absent keys are the
        # scheduler class's defaults -- DDIM's clip_sample: True would clamp these unit-variance latents to
        # ±1. Completed with SD's own, as a model trained from SD carries them.
        schedule = replace(schedule, diffusers={**SD_SCHEDULER, **schedule.diffusers})
    if c.init_from is not None:
        model = load_model(c.init_from)
        if schedule is not None:  # the new schedule's ᾱ replace any the file stored
            log.info("fine-tuning to the config's schedule (%s), not the model's own", schedule.prediction_type)
            model.config.schedule, model.alphas_cumprod = schedule, None
            model.config.guessed = {k: v for k, v in model.config.guessed.items() if not k.startswith("schedule.")}
        return model
    vae = load_vae_file(c.autoencoder)
    text = minilm_text_config(max_length=32) if c.text == "minilm" else c.text
    if isinstance(text, str):
        raise ConfigError(f"text: {text!r}; allowed: minilm, or a text encoder config")
    # the backbone reads and predicts latents of the autoencoder's width, whatever the config says
    latent, z = c.data.size // vae.config.downsample_factor, vae.config.embed_dim
    if c.mmdit is not None:  # our one text tower pools nothing: the text enters by joint attention alone
        backbone = replace(c.mmdit, in_channels=z, out_channels=z, context_dim=text.hidden_size, pooled_dim=0)
        backbone = replace(backbone, sample_size=latent, pos_embed_max_size=max(backbone.pos_embed_max_size, latent))
    else:
        backbone = replace(c.unet, in_channels=z, out_channels=z, context_dim=text.hidden_size)
    config = ModelConfig(
        family="ldmkit",
        unet=backbone,
        vae=vae.config,
        text=text,
        schedule=schedule or ScheduleConfig(),
        image_size=c.data.size,
    )
    torch.manual_seed(c.run.seed)
    model = LatentDiffusion(config)
    model.first_stage_model = vae
    if text.package:
        load_package_text_encoder(model.text_encoder)
    return model


class UNetAndText(torch.nn.Module):
    """The UNet and the text tower's top layers, trained as one module (one EMA, one checkpoint entry)."""

    def __init__(self, unet: torch.nn.Module, text: torch.nn.ModuleList):
        super().__init__()
        self.unet, self.text = unet, text

    def train(self, mode: bool = True):
        super().train(mode)
        self.text.eval()  # no dropout: the layers run as the frozen ones below them do, and as at inference
        return self


class LDMTask(LatentTask):
    name = "unet"

    def __init__(self, config: LDMTrainConfig):
        model = build_model(config)
        self.text_top = top = config.text_layers
        trainable = model.unet
        if top:
            if model.config.conditioner or model.config.sd3:
                raise ConfigError("text_layers: trains a BERT tower's top layers (our MiniLM); this model's are CLIP")
            trainable, self.name = UNetAndText(model.unet, model.text_encoder.top_layers(top)), "unet+text"
        super().__init__(config, model, trainable)
        if top:
            trainable.text.requires_grad_(True)
        # A new UNet measures its latent scale from the data; a fine-tuned one keeps the scale it learned with.
        self.scale_measured = config.init_from is not None

    def param_groups(self, trainable: torch.nn.Module) -> list[dict]:
        if not self.text_top:
            return super().param_groups(trainable)
        return [
            {"params": list(trainable.unet.parameters())},
            {"params": list(trainable.text.parameters()), "lr_scale": self.config.text_lr_scale},
        ]

    def text_states(self, captions: list[str]) -> TextStates:
        """With the tower's top layers trained: the states below them kept per caption (as the frozen
        tower's are), the top layers run every step, with gradients."""
        if not self.text_top:
            return super().text_states(captions)
        te, top = self.model.text_encoder, self.text_top

        def below(missing):
            tokens = te.tokenizer(missing)
            return te.bert_below(tokens["input_ids"], tokens["attention_mask"], top), tokens["attention_mask"]

        hidden, mask = self.memoized(captions, below)
        return TextStates(te.bert_top(hidden, mask, top), None)

    def empty_context(self) -> torch.Tensor:
        return self.text_states([""]).context[0] if self.text_top else self.empty

    @torch.no_grad()
    def measure_scale(self) -> None:
        """The paper's scale-by-std: 1 / std of the latents of the first batches."""
        c = self.config
        zs = []
        for b in range(c.scale_batches):
            batch = load_batch(
                self.data, self.order, range(b * c.run.batch_size, (b + 1) * c.run.batch_size), False, c.run.seed
            )
            if batch is None:
                continue
            x, _, kept = batch
            zs.append(self.model.vae.encode(x).sample(torch.Generator().manual_seed(b)))
        if not zs:
            raise ConfigError(
                f"data: no readable image in the first {c.scale_batches} batches (scale_batches), "
                "so the latent scale cannot be measured"
            )
        std = torch.cat(zs).std().item()
        self.model.vae.config.scale_factor = 1.0 / std
        self.model.config.vae = self.model.vae.config
        log.info("latent std %.4f: scale factor %.5f", std, 1.0 / std)

    def train_step(self, step: int, indices: range, lr: float) -> dict:
        if not self.scale_measured:  # the loss scales latents by it
            self.measure_scale()
            self.scale_measured = True
        return super().train_step(step, indices, lr)

    def load_state_dict(self, d: dict) -> None:
        if self.name not in d:  # a checkpoint of the UNet alone, or of the UNet and text layers
            raise ConfigError(
                f"text_layers: {self.text_top}, but the checkpoint was written with "
                + ("none" if "unet" in d else "text layers trained")
                + ": resume with the config it was trained with"
            )
        super().load_state_dict(d)
        if self.text_top:  # the config's rate, not the one saved with the optimiser's groups
            self.opt.param_groups[1]["lr_scale"] = self.config.text_lr_scale
        self.scale_measured = True  # the checkpoint holds the scale the run measured

    # samples and the product ------------------------------------------------------------------------
    def ema_model(self) -> LatentDiffusion:
        """The model with the EMA weights, sharing the frozen autoencoder and (unless trained) text encoder."""
        import copy

        m = self.model
        unet, text = copy.deepcopy(self.unet), m.text_encoder
        if self.text_top:  # its own copy of the tower, the trained layers' averages in it
            text = copy.deepcopy(text)
            UNetAndText(unet, text.top_layers(self.text_top)).load_state_dict(self.ema.state_dict())
        else:
            unet.load_state_dict(self.ema.state_dict())
        return LatentDiffusion.from_parts(m.config, unet, m.vae, text, m.alphas_cumprod).eval()

    def sample(self, step: int, folder: Path) -> None:
        from ldmkit.pipelines import Pipeline

        self.prompt_grid(Pipeline(self.ema_model(), name=f"step-{step}"), step, folder)

    @torch.no_grad()
    def fit_latent_rgb(self, n: int = 64) -> tuple:
        """Least-squares map from scaled latents to the images' colours at latent resolution, stored in
        the model so that step previews need no decoder."""
        items = [self.data.load(i) for i in range(min(n, len(self.data)))]
        x = torch.stack([it[0] for it in items if it is not None])
        z = self.model.vae.scale(self.model.vae.encode(x).mode())
        rgb = F.adaptive_avg_pool2d(x, z.shape[-2:])
        inputs = torch.cat([z, torch.ones_like(z[:, :1])], 1).permute(0, 2, 3, 1).reshape(-1, z.shape[1] + 1)
        targets = rgb.permute(0, 2, 3, 1).reshape(-1, 3)
        table = torch.linalg.lstsq(inputs.double(), targets.double()).solution
        return tuple(tuple(round(float(v), 5) for v in row) for row in table)

    def finish(self, folder: Path) -> None:
        from ldmkit.checkpoints.single_file import save_single_file
        from ldmkit.data.vocabulary import caption_vocabulary, grown

        self.model.config.latent_rgb = self.fit_latent_rgb()
        # a closed world's words go with the model, so that prompts outside them are said to be; a fine-tune
        # still knows its base's words (an open base stays open)
        captions = (self.data.caption(i) for i in range(len(self.data)))
        base = self.model.config.vocabulary
        self.model.config.vocabulary = grown(base, captions) if self.config.init_from else caption_vocabulary(captions)
        save_single_file(self.ema_model(), folder / "model.safetensors")
