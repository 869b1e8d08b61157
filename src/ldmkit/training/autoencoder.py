"""Stage 1: the KL autoencoder (Rombach et al. 2022, sec. 3.1 and appendix G), trained with the
paper code's objective: L1 (or L2) reconstruction summed over pixels, a small KL term (1e-6), and a
PatchGAN discriminator (Isola et al. 2017) with a hinge loss, switched on at `disc_start` and weighted
adaptively by the ratio of the reconstruction and adversarial gradient norms at the decoder's last
layer. No perceptual (LPIPS) term: it needs ImageNet backbone weights this project cannot fetch."""

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.config import to_dict
from ldmkit.data.images import DataConfig, Order, load_batch, open_dataset, sample_generator, validation_images
from ldmkit.errors import ConfigError
from ldmkit.evaluation.metrics import psnr, ssim
from ldmkit.images import tensor_to_pil
from ldmkit.models.autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussian
from ldmkit.training import distributed as dist
from ldmkit.training.loop import RunConfig, image_grid

log = logging.getLogger(__name__)
# Logged from disc_start on; 0 before it (loss.csv keeps one header for the whole run).
ADVERSARIAL_VALUES = ("g_loss", "d_loss", "logits_real", "logits_fake")


@dataclass
class LossConfig:
    reconstruction: str = "l1"  # l1 | l2
    kl_weight: float = 1e-6
    disc_start: int = 1000
    disc_weight: float = 0.5
    disc_lr: float = 1e-4
    disc_channels: int = 64
    disc_layers: int = 3

    def __post_init__(self):
        if self.reconstruction not in ("l1", "l2"):
            raise ConfigError(f"loss.reconstruction: {self.reconstruction!r}; allowed: l1, l2")


@dataclass
class AutoencoderTrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: AutoencoderConfig = field(default_factory=lambda: AutoencoderConfig(channels=(32, 64, 64), num_res_blocks=1))
    loss: LossConfig = field(default_factory=LossConfig)
    val: DataConfig | None = None  # held-out images for PSNR/SSIM (default: the shapes "val" split)
    val_images: int = 64


class PatchDiscriminator(nn.Module):
    """PatchGAN: a stack of stride-2 convolutions giving one real/fake logit per patch. GroupNorm, not
    BatchNorm, so that its output does not depend on how a batch is split across processes."""

    def __init__(self, channels: int = 64, layers: int = 3, in_channels: int = 3):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            seq += [
                nn.Conv2d(ch, out, 4, stride, 1, bias=False),
                nn.GroupNorm(min(32, out // 4), out),
                nn.LeakyReLU(0.2),
            ]
            ch = out
        seq.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.main = nn.Sequential(*seq)
        for m in self.modules():  # the paper code's init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class AutoencoderTask:
    def __init__(self, config: AutoencoderTrainConfig):
        self.config = c = config
        torch.manual_seed(c.run.seed)
        self.vae = AutoencoderKL(c.model).to(memory_format=c.run.memory_format())
        self.disc = PatchDiscriminator(c.loss.disc_channels, c.loss.disc_layers, c.model.out_channels)
        self.disc.to(memory_format=c.run.memory_format())
        self.opt_ae = torch.optim.Adam(self.vae.parameters(), lr=c.run.lr, betas=(0.5, 0.9))
        self.opt_disc = torch.optim.Adam(self.disc.parameters(), lr=c.loss.disc_lr, betas=(0.5, 0.9))
        self.data = open_dataset(c.data)
        self.order = Order(len(self.data), c.run.seed)
        self.val_images = validation_images(c.val, c.val_images, c.data.size)

    # state ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "vae": self.vae.state_dict(),
            "disc": self.disc.state_dict(),
            "opt_ae": self.opt_ae.state_dict(),
            "opt_disc": self.opt_disc.state_dict(),
        }

    def load_state_dict(self, d: dict) -> None:
        self.vae.load_state_dict(d["vae"])
        self.disc.load_state_dict(d["disc"])
        self.opt_ae.load_state_dict(d["opt_ae"])
        self.opt_disc.load_state_dict(d["opt_disc"])

    # one step ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, gens: list[torch.Generator], disc_on: bool):
        """Losses of a batch: (reconstruction + KL, adversarial or None before disc_start,
        discriminator (None before it as well), logged values)."""
        c = self.config.loss
        x = x.contiguous(memory_format=self.config.run.memory_format())
        with self.config.run.autocast():
            posterior = self.vae.encode(x)
            # sampling and the KL in fp32 whatever the compute precision: exp(logvar) in bf16 is coarse
            posterior = DiagonalGaussian(torch.cat([posterior.mean, posterior.logvar], 1).float())
            eps = torch.cat([torch.randn((1, *posterior.mean.shape[1:]), generator=g) for g in gens])
            rec = self.vae.decode(posterior.mean + posterior.std * eps).float()
            diff = (x - rec).abs() if c.reconstruction == "l1" else (x - rec) ** 2
            nll = diff.sum() / x.shape[0]
            kl = posterior.kl().sum() / x.shape[0]
        values = {"rec": diff.mean().item(), "kl": kl.item(), "nll": nll.item()}
        if not disc_on:  # an untrained discriminator's verdicts mean nothing: its passes, a sixth of a step, skipped
            return nll + c.kl_weight * kl, None, None, {**values, **dict.fromkeys(ADVERSARIAL_VALUES, 0.0)}
        with self.config.run.autocast():
            g_loss = -self.disc(rec).float().mean()
            logits_real, logits_fake = self.disc(x).float(), self.disc(rec.detach()).float()
            d_loss = 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
        values.update(
            g_loss=g_loss.item(),
            d_loss=d_loss.item(),
            logits_real=logits_real.mean().item(),
            logits_fake=logits_fake.mean().item(),
        )
        return nll + c.kl_weight * kl, g_loss, d_loss, values

    def train_step(self, step: int, indices: range, lr: float) -> dict:
        """One optimiser step of each network on this process's share of the global batch. The
        adaptive weight is ||grad rec|| / ||grad adv|| at the decoder's last layer, measured on the
        whole global batch (gradients summed over micro-batches and processes first), so that it does
        not depend on how the batch was split."""
        c = self.config
        for g in self.opt_ae.param_groups:
            g["lr"] = lr
        batch = load_batch(self.data, self.order, indices, c.data.flip, c.run.seed)
        x, _, kept = batch if batch is not None else (None, None, [])
        n_global = dist.global_count(len(kept))
        if n_global == 0:
            return {"loss": 0.0, "skipped": float(len(indices) * dist.size())}
        self.vae.train()
        self.disc.train()
        disc_on = step >= c.loss.disc_start
        params = [p for p in self.vae.parameters()]
        grads_rec = [torch.zeros_like(p) for p in params]
        # before disc_start there is no adversarial gradient to hold, sum or reduce
        grads_adv = [torch.zeros_like(p) for p in params] if disc_on else []
        disc_params = list(self.disc.parameters())
        grads_disc = [torch.zeros_like(p) for p in disc_params] if disc_on else []
        self.disc.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        micro = max(1, len(kept) // c.run.grad_accum) if kept else 1
        for start in range(0, len(kept), micro):
            sl = slice(start, start + micro)
            share = len(kept[sl]) / n_global
            rec_loss, g_loss, d_loss, values = self.forward(
                x[sl], [sample_generator(c.run.seed, g) for g in kept[sl]], disc_on
            )
            for loss, into in ((rec_loss, grads_rec), (g_loss, grads_adv)):
                if loss is None:
                    continue
                self.vae.zero_grad(set_to_none=True)
                (loss * share).backward(retain_graph=g_loss is not None and loss is rec_loss)
                for buf, p in zip(into, params):
                    if p.grad is not None:
                        buf += p.grad
            self.disc.zero_grad(set_to_none=True)  # the adversarial pass must not train the discriminator
            if disc_on:
                (d_loss * share).backward()
                for buf, p in zip(grads_disc, disc_params):
                    buf += p.grad
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + v * share
        dist.all_reduce_(grads_rec + grads_adv)
        last = next(i for i, p in enumerate(params) if p is self.vae.decoder.conv_out.weight)
        if disc_on:
            d_weight = (grads_rec[last].norm() / (grads_adv[last].norm() + 1e-4)).clamp(
                0.0, 1e4
            ).item() * c.loss.disc_weight
        else:
            d_weight = 0.0
        grads = [a + d_weight * b for a, b in zip(grads_rec, grads_adv)] if disc_on else grads_rec
        for p, g in zip(params, grads):
            p.grad = g
        self.opt_ae.step()
        if disc_on:
            dist.all_reduce_(grads_disc)
            for p, g in zip(disc_params, grads_disc):
                p.grad = g
            self.opt_disc.step()
        totals = dist.sum_values(totals)
        totals["loss"] = totals["nll"] + c.loss.kl_weight * totals["kl"] + d_weight * totals["g_loss"]
        totals.update(
            {"d_weight": d_weight, "disc_on": float(disc_on), "skipped": float(len(indices) * dist.size() - n_global)}
        )
        return totals

    # evaluation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        self.vae.eval()
        return self.vae.decode(self.vae.encode(x).mode()).clamp(-1, 1)

    def evaluate(self, step: int) -> dict:
        x = self.val_images
        rec = self.reconstruct(x)
        a, b = (x + 1) / 2, (rec + 1) / 2
        p, s = psnr(a, b).mean().item(), ssim(a, b).mean().item()
        log.info("step %d: val PSNR %.2f dB, SSIM %.4f", step, p, s)
        return {"psnr": round(p, 3), "ssim": round(s, 4), "score": p}

    def sample(self, step: int, folder: Path) -> None:
        from ldmkit.checkpoints.files import atomic_write

        x = self.val_images[:8]
        grid = image_grid([tensor_to_pil(x), tensor_to_pil(self.reconstruct(x))])
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / f"recon-{step:08d}.png", lambda tmp: grid.save(tmp, format="PNG"))

    def finish(self, folder: Path) -> None:
        save_autoencoder(self.vae, folder / "autoencoder.safetensors")
        log.info("trained without a perceptual (LPIPS) term: its ImageNet backbone weights are not available here")


def save_autoencoder(vae: AutoencoderKL, path: Path) -> None:
    """Our self-describing VAE file: `first_stage_model.*` weights, config in the header."""
    import json

    from ldmkit.checkpoints.files import write_safetensors

    state = {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}
    write_safetensors(path, state, {"format": "pt", "ldmkit_vae": json.dumps(to_dict(vae.config))})
