"""`ldmkit train-ip-adapter`: an image-prompt adapter (models/ip_adapter.py) for a frozen model, as the
paper trains one (Ye et al. 2023, sec. 3.3): the base UNet, text encoder and image tower stay frozen; the
projection and every cross-attention's to_k_ip / to_v_ip learn, on the ordinary denoising loss, to use the
training image itself as the image prompt beside its caption.

Each layer's to_k_ip / to_v_ip start as its to_k / to_v (the paper's initialisation). Dropout as the
paper's by default, from each sample's one uniform number u (its own generator: runs resume exactly): 5 %
of samples lose both prompts, 5 % the caption alone, 5 % the image alone (`drop_*`) -- a dropped caption
is the empty prompt's states, a dropped image the negative image prompt inference uses (zeros in the
embedding for base adapters, the tower's reading of an all-zero image for plus). The tower runs on each
batch (it is small). The result, RUN/NAME.safetensors, is in the published
layout, which --ip-adapter reads."""

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldmkit.checkpoints.files import write_safetensors
from ldmkit.errors import ConfigError
from ldmkit.models.ip_adapter import KINDS, ImagePrompt, IPAdapter, IPAdapterConfig, attach, bound, cross_attentions
from ldmkit.training.image_tower import normalise
from ldmkit.training.latent_task import DenoisingTrainConfig, LatentTask, SampleConfig, load_frozen


@dataclass
class IPAdapterTrainConfig(DenoisingTrainConfig):
    base: str = ""  # the frozen model
    image_encoder: str = ""  # the frozen CLIP vision tower (a folder or a single file)
    kind: str = "plus"  # base: the projected embedding -> `tokens`; plus: a resampler over the hidden states
    tokens: int = 16
    width: int = 256  # plus: the resampler's width, depth and heads (64 channels each)
    depth: int = 4
    heads: int = 4
    name: str = "ip-adapter"
    # Shares of the samples that lose both prompts, the caption alone, the image alone (the paper's 5 % each).
    # Where captions already say all an image shows (the shapes world), the image-only share is what teaches
    # the adapter anything: raise drop_text.
    drop_both: float = 0.05
    drop_text: float = 0.05
    drop_image: float = 0.05
    sample: SampleConfig = field(default_factory=lambda: SampleConfig(prompts=("",), cfg=3.0))
    sample_images: int = 4  # held-out renders used as image prompts in the sample grid

    frozen_model = ("base", "the model to adapt")

    def check(self) -> None:
        if self.kind not in ("base", "plus"):
            raise ConfigError(f"kind {self.kind!r}; allowed: base, plus (of {', '.join(KINDS)})")
        if not self.image_encoder:
            raise ConfigError(
                "image_encoder: the frozen image tower is required (ldmkit train-image-encoder makes one)"
            )
        shares = (self.drop_both, self.drop_text, self.drop_image)
        if min(shares) < 0 or sum(shares) >= 1:
            raise ConfigError(f"drop_both, drop_text, drop_image: {shares}; allowed: 0 or more, summing below 1")
        if self.cond_dropout not in (0.0, self.drop_both + self.drop_text):
            raise ConfigError("cond_dropout: set by drop_both + drop_text here; leave it out")
        self.cond_dropout = self.drop_both + self.drop_text  # the caption is dropped for u below it
        super().check()

    def image_dropped(self, u: torch.Tensor) -> torch.Tensor:
        """From each sample's uniform number: u < both drops both prompts, then text alone, then image alone."""
        text_end = self.drop_both + self.drop_text
        return (u < self.drop_both) | ((u >= text_end) & (u < text_end + self.drop_image))


class IPAdapterTask(LatentTask):
    name = "ip_adapter"
    needs_images = True  # the image is its own prompt

    def __init__(self, config: IPAdapterTrainConfig):
        from ldmkit.checkpoints.image_encoder_files import load_image_encoder

        model = load_frozen(config.base)
        self.encoder = load_image_encoder(Path(config.image_encoder).expanduser())
        self.encoder.model.requires_grad_(False).eval()
        c = config
        if self.encoder.size != c.data.size:  # the training images go to the tower as they are
            raise ConfigError(f"the image tower reads {self.encoder.size}² images; data.size is {c.data.size}")
        hidden = c.kind == "plus"
        image_dim = self.encoder.width if hidden else self.encoder.embed_dim
        widths = tuple(attn.to_q.out_features for *_, attn in cross_attentions(model.unet))
        torch.manual_seed(c.run.seed)
        self.adapter = IPAdapter(
            IPAdapterConfig(
                kind=c.kind,
                image_dim=image_dim,
                context_dim=model.unet.config.context_dim,
                tokens=c.tokens,
                width=c.width,
                depth=c.depth,
                heads=c.heads,
                layer_widths=widths,
            )
        )
        with torch.no_grad():  # the paper's start: each layer's image projections are its text projections
            for (*_, attn), kv in zip(cross_attentions(model.unet), self.adapter.ip_adapter.values()):
                kv.to_k_ip.weight.copy_(attn.to_k.weight)
                kv.to_v_ip.weight.copy_(attn.to_v.weight)
        super().__init__(config, model, self.adapter)
        self.adapter.requires_grad_(True)
        self.model.unet.eval()
        attach(self.model.unet, [(self.adapter, 1.0)])
        with torch.no_grad():
            size = self.encoder.size
            self.negative = self.encoder.negative(torch.zeros(1, 3, size, size), hidden)[0]
        self.u = None

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen tower's features of the training images (a small tower: cheaper to run than to keep)."""
        return self.encoder.features(normalise(images), self.adapter.config.reads_hidden_states)

    def draw(self, items, images, gs, high, weights=None):
        z0, k, eps, u = super().draw(items, images, gs, high, weights)
        self.u = u  # the dropout's uniform numbers: predict reads the image's share
        return z0, k, eps, u

    def loss(self, images, items, captions, gs, extra=None, reduce: bool = True):
        return super().loss(images, items, captions, gs, self.image_features(images), reduce)

    def predict(self, zt, t, context, extra, y=None):
        u = self.u
        drop = self.config.image_dropped(u)[:, None] if u is not None else None
        feats = extra if drop is None else torch.where(drop.view(-1, *[1] * (extra.ndim - 1)), self.negative, extra)
        tokens = self.adapter.image_proj(feats)
        prompt = ImagePrompt(self.adapter, tokens)
        with bound(self.unet, [prompt], 0, 1):
            return self.unet(zt, t, torch.cat([context, tokens.to(context.dtype)], dim=1), y=y)

    def sample(self, step: int, folder: Path) -> None:
        """A grid: held-out renders as image prompts (top row), the model's images from them below, one
        row per seed, with the sample prompts (empty by default)."""
        from ldmkit.data.images import open_dataset
        from ldmkit.images import tensor_to_pil
        from ldmkit.pipelines import Pipeline
        from ldmkit.pipelines.image_prompt import ImagePromptInput

        c = self.config
        val = open_dataset(type(c.data)(kind=c.data.kind, split="val", n=c.sample_images, size=c.data.size))
        renders = [tensor_to_pil(val.load(i)[0][None])[0] for i in range(min(len(val), c.sample_images))]
        pipe = Pipeline(self.model, name=f"step-{step}")
        s = c.sample
        rows = [renders]
        try:
            with self.ema.applied(), torch.no_grad():
                self.adapter.eval()
                for seed in s.seeds:
                    row = []
                    for image in renders:
                        ip = [ImagePromptInput(self.adapter, self.encoder, [image], 1.0)]
                        row.append(pipe(s.prompts[0], seed=seed, steps=s.steps, cfg=s.cfg, image_prompts=ip).images[0])
                    rows.append(row)
        finally:
            attach(self.model.unet, [(self.adapter, 1.0)])  # the pipeline took it out after each call
        self.save_grid(rows, step, folder)

    def finish(self, folder: Path) -> None:
        with self.ema.applied():
            state = {k: v.detach().contiguous() for k, v in self.adapter.state_dict().items()}
        write_safetensors(folder / f"{self.config.name}.safetensors", state)
