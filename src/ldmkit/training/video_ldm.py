"""Text-to-video from a text-to-image model (Blattmann et al. 2023, "Align your Latents"): temporal layers are
inserted into its UNet (models/video_unet.py) and trained on clips of the shapes world (data/shapes_clips.py)
with the image model's own objective; its spatial layers stay frozen (train_spatial: false, the paper's
choice) or train with them.

The temporal layers start as no-ops — their output projections are zero, so each frame is denoised exactly
as the image model would denoise it — and learn what a clip adds: the same shape in every frame, moving as the
caption says. `ldmkit train-video --config configs/shapes-video.yaml` (resumable: --resume) ends with
`video.safetensors`, a text-to-video model `generate-video` reads."""

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ldmkit.checkpoints.components import strict_load
from ldmkit.config import model_name
from ldmkit.data.images import Order, sample_generator
from ldmkit.data.shapes_clips import sample_clip
from ldmkit.diffusion.schedule import NoiseSchedule
from ldmkit.errors import ConfigError
from ldmkit.models.video_ldm import VideoDiffusion, VideoModelConfig
from ldmkit.models.video_unet import VideoUNet, VideoUNetConfig
from ldmkit.nn.temporal import FramePositions, TemporalResBlock, VideoTransformerBlock
from ldmkit.training.ema import EMA
from ldmkit.training.latent_task import check_cond_dropout
from ldmkit.training.loop import RunConfig, image_grid

TEMPORAL = ("time_stack", "time_mixer", "time_pos_embed")  # what the temporal layers' keys contain


@dataclass
class ClipDataConfig:
    split: str = "train"
    n: int = 50000  # clips in the training set (clip i of the split, i < n)
    size: int = 64
    frames: int = 8


@dataclass
class VideoSampleConfig:
    prompts: list[str] = field(default_factory=lambda: ["a red circle moving right"])
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 20
    cfg: float = 3.0
    sampler: str = "euler_a"


@dataclass
class VideoLDMTrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    base: str = "shapes"  # the text-to-image model: a bundled model's name or a file
    data: ClipDataConfig = field(default_factory=ClipDataConfig)
    train_spatial: bool = False
    merge_factor: float = 0.0  # the temporal path's mix at the start: sigmoid(0) = an even blend
    cond_dropout: float = 0.1
    ema_decay: float = 0.999
    fps: int = 8  # the rate clips are written at (the model is not told it)
    sample: VideoSampleConfig = field(default_factory=VideoSampleConfig)
    val_batches: int = 2

    def __post_init__(self):
        self.base = model_name(self.base)
        check_cond_dropout(self.cond_dropout)
        if self.data.frames < 2:
            raise ConfigError(f"data.frames: {self.data.frames}; a clip has at least 2")


def zero_temporal_outputs(unet: torch.nn.Module) -> None:
    """Every temporal block's output projections (and the frame positions' embedding) to zero: the temporal
    path then returns its input."""
    with torch.no_grad():
        for m in unet.modules():
            if isinstance(m, TemporalResBlock):
                outs = [m.out_layers[3]]
            elif isinstance(m, FramePositions):  # the frame index's embedding, added before the temporal blocks
                outs = [m[2]]
            elif isinstance(m, VideoTransformerBlock):
                outs = [m.ff_in.net[2], m.attn1.to_out[0], m.ff.net[2]] + (
                    [m.attn2.to_out[0]] if hasattr(m, "attn2") else []
                )
            else:
                continue
            for layer in outs:
                layer.weight.zero_()
                layer.bias.zero_()


def video_model_from_image_model(base, config: VideoLDMTrainConfig) -> VideoDiffusion:
    """A text-to-video model holding the image model's UNet weights, autoencoder and text tower; new temporal
    layers that start as no-ops."""
    c = base.config
    unet = VideoUNetConfig(
        **asdict(c.unet),
        merge_strategy="learned_with_images",
        merge_factor=config.merge_factor,
        num_frames=config.data.frames,
    )
    video = VideoModelConfig(
        family="ldmkit-video",
        unet=unet,
        vae=c.vae,
        schedule=c.schedule,
        width=c.image_size,
        height=c.image_size,
        text=c.text,
        temporal_decoder=False,
    )
    model = VideoDiffusion.from_parts(video, VideoUNet(unet), base.first_stage_model, base.cond_stage_model)
    spatial = {k: v for k, v in model.unet.state_dict().items() if not any(t in k for t in TEMPORAL)}
    image = base.unet.state_dict()
    strict_load(
        model.unet, {**{k: v for k, v in model.unet.state_dict().items() if k not in spatial}, **image}, "UNet", "base"
    )
    zero_temporal_outputs(model.unet)
    return model


class VideoLDMTask:
    name = "video"

    def __init__(self, config: VideoLDMTrainConfig):
        from ldmkit.bundled import resolve
        from ldmkit.checkpoints.single_file import load_model

        self.config = c = config
        base = load_model(resolve(c.base)[0])
        if base.config.conditioner or base.config.sd3 or base.config.unet.in_channels != base.config.vae.embed_dim:
            raise ConfigError(f"base {c.base}: a text-to-image UNet model with one text tower (SD 1.x/2.x-like)")
        self.model = video_model_from_image_model(base, c)
        self.prediction = base.config.schedule.prediction_type
        self.schedule = NoiseSchedule.from_config(base.config.schedule, base.alphas_cumprod)
        self.unet = self.model.unet
        self.model.vae.requires_grad_(False).eval()
        self.model.text_encoder.requires_grad_(False).eval()
        for name, p in self.unet.named_parameters():
            p.requires_grad_(c.train_spatial or any(t in name for t in TEMPORAL))
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.unet.train()
        self.ema = EMA(self.unet, c.ema_decay)
        self.opt = torch.optim.AdamW(self.params, lr=c.run.lr, weight_decay=c.run.weight_decay)
        self.order = Order(c.data.n, c.run.seed)
        self.text_memo: dict[str, torch.Tensor] = {}

    # data -------------------------------------------------------------------------------------------
    def clips(self, split: str, items: list[int]):
        """(frames [B, F, 3, H, W] in [-1, 1], captions) of clips `items` of `split`."""
        d = self.config.data
        drawn = [sample_clip(split, i, 0, d.size, d.frames) for i in items]
        frames = [[np.asarray(im, dtype=np.float32) for im in clip.render()] for clip in drawn]
        x = torch.from_numpy(np.stack(frames)).permute(0, 1, 4, 2, 3) / 127.5 - 1
        return x, [clip.caption for clip in drawn]

    @torch.no_grad()
    def text_states(self, captions: list[str]) -> torch.Tensor:
        from ldmkit.models.prompts import encode_prompts

        missing = [t for t in dict.fromkeys(captions) if t not in self.text_memo]
        if missing:
            states = encode_prompts(self.model.text_encoder, missing, None, mode="truncate").context
            self.text_memo.update(zip(missing, states.clone()))
        return torch.stack([self.text_memo[t] for t in captions])

    def loss(self, frames: torch.Tensor, captions: list[str], gs: list[int]) -> torch.Tensor:
        """The image model's objective on every frame of each clip at one noise level per clip: the noise (or v)
        of the noised latents, each clip's caption dropped to "" with probability cond_dropout."""
        b, f = frames.shape[:2]
        vae, c = self.model.vae, self.config
        with torch.no_grad():
            post = vae.encode(frames.flatten(0, 1))
        gens = [sample_generator(c.run.seed, g) for g in gs]
        shape = (f, *post.mean.shape[1:])
        z_noise = torch.cat([torch.randn((1, *shape), generator=g) for g in gens])
        t = torch.cat([torch.randint(0, self.schedule.num_train_timesteps, (1,), generator=g) for g in gens])
        eps = torch.cat([torch.randn((1, *shape), generator=g) for g in gens])
        drop = torch.cat([torch.rand((1,), generator=g) for g in gens]) < c.cond_dropout
        # contiguous: the posterior's mean and std are views of one tensor, and a backward pass through the
        # UNet from latents with their strides crashed torch 2.13 on CPU (a segfault, not reduced further)
        z0 = vae.scale(post.mean.reshape(b, *shape) + post.std.reshape(b, *shape) * z_noise).contiguous()
        ab = self.schedule.alphas_cumprod[t].reshape(b, 1, 1, 1, 1)
        zt = ab.sqrt() * z0 + (1 - ab).sqrt() * eps
        target = eps if self.prediction == "epsilon" else ab.sqrt() * eps - (1 - ab).sqrt() * z0
        context = self.text_states(["" if d else cap for d, cap in zip(drop.tolist(), captions)])
        return torch.nn.functional.mse_loss(self.unet(zt, t, context), target)

    def train_step(self, step: int, indices: range, lr: float) -> dict:
        for g in self.opt.param_groups:
            g["lr"] = lr
        gs = list(indices)
        frames, captions = self.clips(self.config.data.split, [self.order.item(g) for g in gs])
        self.opt.zero_grad(set_to_none=True)
        micro = max(1, len(gs) // self.config.run.grad_accum)
        total = 0.0
        for s in range(0, len(gs), micro):
            part = slice(s, s + micro)
            loss = self.loss(frames[part], captions[part], gs[part]) * (len(gs[part]) / len(gs))
            loss.backward()
            total += loss.item()
        self.opt.step()
        self.ema.update(step)
        return {"loss": total, "lr": lr}

    # evaluation, samples, the product -----------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        """Loss of the EMA weights on fixed validation clips with fixed noise (lower is better)."""
        bs = self.config.run.batch_size
        losses = []
        with self.ema.applied():
            for start in range(0, self.config.val_batches * bs, bs):
                items = list(range(start, start + bs))
                frames, captions = self.clips("val", items)
                losses.append(self.loss(frames, captions, [10**9 + i for i in items]).item())
        value = sum(losses) / len(losses)
        return {"val_loss": round(value, 6), "score": -value}

    def pipeline(self):
        from ldmkit.pipelines.video import VideoPipeline

        return VideoPipeline(self.model, "shapes-video")

    @torch.no_grad()
    def sample(self, step: int, folder: Path) -> None:
        """samples-STEP.png: one row of frames per prompt and seed."""
        from ldmkit.checkpoints.files import atomic_write

        s = self.config.sample
        with self.ema.applied():
            pipe = self.pipeline()
            rows = [
                pipe(prompt=p, seed=seed, steps=s.steps, cfg=s.cfg, sampler=s.sampler).videos[0]
                for p in s.prompts
                for seed in s.seeds
            ]
        grid = image_grid([frame for row in rows for frame in row], rows=len(rows))
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / f"samples-{step:08d}.png", lambda tmp: grid.save(tmp, format="PNG"))

    def finish(self, folder: Path) -> None:
        """video.safetensors: the model with the EMA weights (fp16: half the size, what inference needs)."""
        from ldmkit.checkpoints.svd_file import save_svd_file

        with self.ema.applied():
            self.model.config = replace(self.model.config, unet=self.unet.config)
            save_svd_file(self.model, folder / "video.safetensors", torch.float16)

    def state_dict(self) -> dict:
        return {"video": self.unet.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.unet.load_state_dict(d["video"])
        self.ema.load_state_dict(d["ema"])
        self.opt.load_state_dict(d["opt"])
