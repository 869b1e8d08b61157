"""Distilling a tiny autoencoder (TAESD's architecture, models/tiny_autoencoder.py) from a model's KL
autoencoder, the teacher, which stays frozen.

The decoder learns what the teacher's decoder draws, not the training image: a preview or a fast final
decode should show what the full decode would, including the teacher's own errors. Its inputs are
diffusion latents of training images, sampled from the teacher's posterior with a generator per image
(data/images.py), so that the decoder also sees the spread generation produces around a clean latent.
The loss is L1 on pixels plus L1 on horizontal and vertical pixel differences (`edge_weight`): a small
decoder trained on pixels alone blurs, and edges are what the shapes judge and a viewer read first. The
published TAESDs were trained with adversarial and perceptual terms as well; the perceptual one needs
ImageNet backbone weights this project cannot fetch, and the edge term is the cheap stand-in.

The encoder, when asked for (`parts`), learns the teacher's posterior mean in diffusion space (MSE):
TAESD's encoder is deterministic."""

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ldmkit.config import model_name
from ldmkit.data.images import DataConfig, Order, load_batch, open_dataset, sample_generator, validation_images
from ldmkit.errors import ConfigError
from ldmkit.evaluation.metrics import psnr
from ldmkit.images import tensor_to_pil
from ldmkit.models.tiny_autoencoder import TinyAutoencoder, TinyAutoencoderConfig
from ldmkit.training import distributed as dist
from ldmkit.training.loop import RunConfig, image_grid

log = logging.getLogger(__name__)

PARTS = ("decoder", "encoder")


@dataclass
class TinyLossConfig:
    edge_weight: float = 1.0  # L1 on neighbouring-pixel differences, against the teacher's
    encoder_weight: float = 1.0  # the encoder's MSE to the teacher's posterior mean, when it is trained

    def __post_init__(self):
        if self.edge_weight < 0 or self.encoder_weight < 0:
            raise ConfigError("loss weights: allowed 0 or more")


@dataclass
class TinyDistillConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: str = "shapes"  # the model whose autoencoder is distilled: a bundled name, a file or a folder
    # widths and blocks per level; latent_channels and the number of levels must fit the teacher
    model: TinyAutoencoderConfig = field(default_factory=TinyAutoencoderConfig)
    parts: tuple[str, ...] = ("decoder",)
    loss: TinyLossConfig = field(default_factory=TinyLossConfig)
    val: DataConfig | None = None  # held-out images for PSNR (default: the shapes "val" split)
    val_images: int = 64

    def __post_init__(self):
        self.teacher = model_name(self.teacher)
        self.parts = tuple(self.parts)
        if not self.parts or any(p not in PARTS for p in self.parts) or len(set(self.parts)) != len(self.parts):
            raise ConfigError(f"parts: {list(self.parts)}; allowed: decoder, encoder (one or both)")


def fit_to_teacher(c: TinyAutoencoderConfig, teacher_vae) -> None:
    """The tiny autoencoder must read and write the teacher's latents: same channels, same factor."""
    t = teacher_vae.config
    if c.latent_channels != t.embed_dim:
        raise ConfigError(f"model.latent_channels {c.latent_channels}: the teacher's latents have {t.embed_dim}")
    if c.upsample_factor != t.downsample_factor or c.downsample_factor != t.downsample_factor:
        raise ConfigError(
            f"the tiny autoencoder scales by {c.upsample_factor} (decoder) / {c.downsample_factor} (encoder); "
            f"the teacher's factor is {t.downsample_factor}: give one level per factor of 2, plus one"
        )


def edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Differences between horizontal and vertical neighbours."""
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


class TinyDistillTask:
    def __init__(self, config: TinyDistillConfig):
        from ldmkit.pipelines import Pipeline

        self.config = c = config
        torch.manual_seed(c.run.seed)
        teacher = Pipeline.load(c.teacher, precision="fp32")
        self.teacher_name = teacher.name
        self.family = teacher.model.config.family
        self.vae = teacher.model.vae.eval().requires_grad_(False)
        fit_to_teacher(c.model, self.vae)
        self.tiny = TinyAutoencoder(c.model, encoder="encoder" in c.parts, decoder="decoder" in c.parts)
        self.opt = torch.optim.Adam(self.tiny.parameters(), lr=c.run.lr)
        self.data = open_dataset(c.data)
        self.order = Order(len(self.data), c.run.seed)
        self.val_images = validation_images(c.val, c.val_images, c.data.size)

    # state ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"tiny": self.tiny.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.tiny.load_state_dict(d["tiny"])
        self.opt.load_state_dict(d["opt"])

    # one step ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def targets(self, x: torch.Tensor, gens: list[torch.Generator]):
        """The teacher's view of a batch: (diffusion latents sampled from its posterior, its decode of
        them in [-1, 1], its posterior mean in diffusion space)."""
        posterior = self.vae.encode(x)
        eps = torch.cat([torch.randn((1, *posterior.mean.shape[1:]), generator=g) for g in gens])
        raw = posterior.mean + posterior.std * eps
        return self.vae.scale(raw), self.vae.decode(raw).clamp(-1, 1), self.vae.scale(posterior.mean)

    def loss(self, x: torch.Tensor, gens: list[torch.Generator]) -> tuple[torch.Tensor, dict]:
        c = self.config.loss
        z, target, mean = self.targets(x, gens)
        total, values = torch.zeros(()), {}
        if self.tiny.decoder is not None:
            out = self.tiny.decode(z)
            pixels = (out - target).abs().mean()
            edge = sum((a - b).abs().mean() for a, b in zip(edges(out), edges(target)))
            total = total + pixels + c.edge_weight * edge
            values.update(pixel_l1=pixels.item(), edge_l1=edge.item())
        if self.tiny.encoder is not None:
            enc = F.mse_loss(self.tiny.encode(x), mean)
            total = total + c.encoder_weight * enc
            values["encoder_mse"] = enc.item()
        return total, values

    def train_step(self, step: int, indices: range, lr: float) -> dict:
        c = self.config
        for g in self.opt.param_groups:
            g["lr"] = lr
        batch = load_batch(self.data, self.order, indices, c.data.flip, c.run.seed)
        x, _, kept = batch if batch is not None else (None, None, [])
        n_global = dist.global_count(len(kept))
        if n_global == 0:
            return {"loss": 0.0, "skipped": float(len(indices) * dist.size())}
        self.tiny.train()
        self.opt.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        micro = max(1, len(kept) // c.run.grad_accum)
        for start in range(0, len(kept), micro):
            sl = slice(start, start + micro)
            share = len(kept[sl]) / n_global
            with c.run.autocast():
                loss, values = self.loss(x[sl], [sample_generator(c.run.seed, g) for g in kept[sl]])
            (loss * share).backward()
            for k, v in {"loss": loss.item(), **values}.items():
                totals[k] = totals.get(k, 0.0) + v * share
        dist.sum_grads_(self.tiny.parameters())
        self.opt.step()
        totals = dist.sum_values(totals)
        totals.update({"lr": lr, "skipped": float(len(indices) * dist.size() - n_global)})
        return totals

    # evaluation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def decodes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's and the tiny decoder's images of the posterior means of `x`."""
        self.tiny.eval()
        posterior = self.vae.encode(x)
        full = self.vae.decode(posterior.mean).clamp(-1, 1)
        return full, self.tiny.decode(self.vae.scale(posterior.mean)).clamp(-1, 1)

    def evaluate(self, step: int) -> dict:
        """PSNR of the tiny decode against the teacher's decode (what it imitates) and against the true
        images; the score is the first."""
        if self.tiny.decoder is None:
            with torch.no_grad():
                self.tiny.eval()
                mean = self.vae.scale(self.vae.encode(self.val_images).mean)
                mse = F.mse_loss(self.tiny.encode(self.val_images), mean).item()
            return {"encoder_mse": round(mse, 6), "score": -mse}
        full, tiny = self.decodes(self.val_images)
        to01 = lambda t: (t + 1) / 2  # noqa: E731
        vs_full = psnr(to01(full), to01(tiny)).mean().item()
        vs_true = psnr(to01(self.val_images), to01(tiny)).mean().item()
        log.info(
            "step %d: tiny decode PSNR %.2f dB against the full decode, %.2f against the image", step, vs_full, vs_true
        )
        return {"psnr_vs_full": round(vs_full, 3), "psnr_vs_image": round(vs_true, 3), "score": vs_full}

    def sample(self, step: int, folder: Path) -> None:
        from ldmkit.checkpoints.files import atomic_write

        if self.tiny.decoder is None:
            return
        x = self.val_images[:8]
        full, tiny = self.decodes(x)
        grid = image_grid([tensor_to_pil(x), tensor_to_pil(full), tensor_to_pil(tiny)])
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / f"decodes-{step:08d}.png", lambda tmp: grid.save(tmp, format="PNG"))

    def finish(self, folder: Path) -> None:
        from ldmkit.checkpoints.taesd_files import write_tiny_autoencoder

        write_tiny_autoencoder(
            self.tiny, folder / "tiny-autoencoder.safetensors", family=self.family, teacher=self.teacher_name
        )
