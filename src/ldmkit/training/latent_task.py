"""What every latent-space training task shares (the LDM's UNet, ControlNets, LoRAs, embeddings, LCM
distillation): a frozen autoencoder and text encoder held beside the trained module, its EMA and
optimiser, the latent cache, condition dropout, the per-sample noise and timesteps, the denoising loss,
the training step, the validation loss and sample grids.

Latents come from each image's posterior, a fresh one drawn every step (from the latent cache when
there is one). Condition dropout replaces a caption's states by the empty prompt's -- exactly what
inference uses for the unconditional branch. An SDXL-style model (two text towers, a pooled vector and
micro-conditioning in the UNet's addition embedding) is given `y` as diffusers' SDXL training scripts
give it: the caption's pooled vector (the empty prompt's when the caption is dropped) and the numbers of
an uncropped image of the training size (original size = target size = the image's, crop (0, 0)).
Every random draw of sample g (latent noise, timestep, diffusion noise, dropout) comes from its own
generator, so runs resume exactly and do not depend on how batches are split."""

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from ldmkit.checkpoints.files import atomic_write
from ldmkit.data import latent_cache
from ldmkit.data.images import DataConfig, Order, load_batch, open_dataset, sample_generator
from ldmkit.diffusion.schedule import NoiseSchedule
from ldmkit.errors import ConfigError
from ldmkit.models.ldm import LatentDiffusion
from ldmkit.nn.embedding import size_embedding
from ldmkit.training import distributed as dist
from ldmkit.training.ema import EMA
from ldmkit.training.loop import RunConfig, image_grid
from ldmkit.training.predictions import PREDICTIONS
from ldmkit.training.timesteps import TimestepBias


# configs ------------------------------------------------------------------------------------------
@dataclass
class SampleConfig:
    """The sample grid of a text-to-image task: one column per prompt, one row per seed."""

    prompts: tuple[str, ...] = (
        "a red circle",
        "a blue square above a yellow triangle",
        "two green stars",
        "a small purple circle on the left",
    )
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 20
    cfg: float = 5.0
    sampler: str | None = None  # None: the model's own default (a flow model's euler, else DPM++ 2M Karras)
    size: int | None = None  # the images' side; None: the model's own default size


@dataclass
class LatentTrainConfig:
    """The fields every latent task's config has, and the checks they share (here, once). A task's
    config subclasses it, adds its own fields, declares a shared field again where its default differs,
    and extends `check`."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ema_decay: float = 0.999
    latent_cache: bool = True

    # The field naming the frozen model the task builds on, and what it is for (the error message):
    # required, and its path expanded. None: the task has a rule of its own.
    frozen_model: ClassVar[tuple[str, str] | None] = None

    def __post_init__(self):
        if self.frozen_model is not None:
            name, what = self.frozen_model
            if not getattr(self, name):
                raise ConfigError(f"{name}: {what} is required")
            setattr(self, name, str(Path(getattr(self, name)).expanduser()))
        self.check()

    def check(self) -> None:
        """A task's own checks; an override runs its own first, then super().check()."""


@dataclass
class DenoisingTrainConfig(LatentTrainConfig):
    """The tasks trained on the denoising loss (all but consistency distillation, whose loss has no
    dropout, no SNR weighting and no validation set)."""

    cond_dropout: float = 0.0
    min_snr_gamma: float | None = None
    val_batches: int = 2
    # A rectified flow's noise levels: σ = sigmoid(n), n ~ N(logit_mean, logit_std²), SD3's logit-normal
    # sampling (Esser et al. 2024, sec. 3.1), which spends the training on the middle of the path.
    logit_mean: float = 0.0
    logit_std: float = 1.0
    timestep_bias: TimestepBias | None = None  # None: every timestep (or grid index) equally often

    def check(self) -> None:
        check_cond_dropout(self.cond_dropout)
        if self.timestep_bias is not None:
            self.timestep_bias.check()  # the rest when the task knows the model's timesteps


def check_cond_dropout(p: float) -> None:
    """`cond_dropout` is a probability of replacing a caption by the empty prompt; at 1 no step would
    ever see a caption, so the model would learn no conditioning at all."""
    if not 0 <= p < 1:
        raise ConfigError(f"cond_dropout: {p}; allowed: 0 <= p < 1")


# the task -----------------------------------------------------------------------------------------
TEXT_CACHE_MB = 1024


class TextStates(NamedTuple):
    """A batch of captions as the UNet reads them."""

    context: torch.Tensor  # [B, T, D] hidden states, for cross-attention
    pooled: torch.Tensor | None  # [B, P] SDXL's pooled vector; None for a model without one


def load_frozen(path: str) -> LatentDiffusion:
    """A model to build on, every weight frozen: what is trained is added to it or copied from it."""
    from ldmkit.checkpoints.single_file import load_model

    return load_model(path).requires_grad_(False)


def check_sdxl(task, pooled_dim: int) -> None:
    """Training gives an SDXL-style UNet the base model's micro-conditioning (sizes and crop); the
    refiner's takes an aesthetic score instead, which no training data here says."""
    from ldmkit.pipelines.micro_conditioning import BASE, count

    if task.refuses_sdxl:
        raise ConfigError(
            f"{task.refuses_sdxl}: SDXL-style models (two text towers, micro-conditioning) are not supported; "
            "train, train-lora and train-embedding are"
        )
    if count(task.unet.config, pooled_dim) != BASE:
        raise ConfigError("the SDXL refiner (micro-conditioning by aesthetic score) cannot be trained; use the base")


def _fused_ok(module: torch.nn.Module) -> bool:
    """The fused AdamW kernel takes float parameters on CPU or CUDA (not meta, not integer)."""
    params = list(module.parameters())
    return bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params
    )


class LatentTask:
    """A task trains one module (`trainable`) beside a frozen model. Subclasses name it (`name`, its
    key in checkpoints) and may override `predict`, `extra_for` (per-sample inputs such as hints),
    `text_states`, `loss`, `evaluate`; they write `sample` and `finish`."""

    name: str
    needs_images = False  # with the latent cache, only captions are loaded
    # None: the task gives an SDXL-style UNet its `y`; else its command, named when refusing such a model
    refuses_sdxl: str | None = None

    def __init__(self, config: LatentTrainConfig, model: LatentDiffusion, trainable: torch.nn.Module):
        self.config = c = config
        self.model = model
        model.vae.requires_grad_(False).eval()
        model.text_encoder.requires_grad_(False).eval()
        self.unet = model.unet
        self.trainable = trainable.train()
        self.ema = EMA(trainable, c.ema_decay)
        # fused: one kernel over all parameters instead of ~10 ops per tensor (the emoji UNet's 624
        # tensors: 36 -> 10 ms per step, benchmarks/optimizer_step.py); the same update up to rounding
        self.opt = torch.optim.AdamW(
            self.param_groups(trainable), lr=c.run.lr, weight_decay=c.run.weight_decay, fused=_fused_ok(trainable)
        )
        self.schedule = NoiseSchedule.from_config(model.config.schedule, model.alphas_cumprod)
        self.data = open_dataset(c.data)
        self.order = Order(len(self.data), c.run.seed)
        self.text_memo: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        with torch.no_grad():
            empty = self.text_states([""])
        self.empty = empty.context[0]
        self.empty_pooled = None if empty.pooled is None else empty.pooled[0]
        if empty.pooled is not None:
            check_sdxl(self, empty.pooled.shape[-1])
        self.cache: dict[str, torch.Tensor] | None = None
        bias = getattr(c, "timestep_bias", None)  # training's draws; validation's stay uniform
        self.timestep_weights = None if bias is None else bias.weights(self.schedule.num_train_timesteps)

    def param_groups(self, trainable: torch.nn.Module) -> list[dict]:
        """The optimiser's parameter groups; a group's "lr_scale" multiplies the run's learning rate."""
        return [{"params": list(trainable.parameters())}]

    # text and latents -------------------------------------------------------------------------------
    def empty_context(self) -> torch.Tensor:
        """The empty prompt's states [T, D], which condition dropout puts in place of a caption's."""
        return self.empty

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """The captions' hidden states (`text_states` without the pooled vector)."""
        return self.text_states(captions).context

    @torch.no_grad()
    def text_states(self, captions: list[str]) -> TextStates:
        """The frozen text towers' states for the captions, each caption encoded once per run and kept
        (up to TEXT_CACHE_MB). Profiled on the emoji UNet (1 thread), encoding 32 captions was 9 % of a
        step; at 2 threads the run's rate did not measurably change (1.08 vs 1.09 s per step). Each
        tower tokenizes on its own, truncated at 77 tokens (diffusers' training scripts)."""
        from ldmkit.models.prompts import encode_prompts

        def encode(missing):
            states = encode_prompts(self.model.text_encoder, missing, None, mode="truncate")
            return states.context, states.pooled

        context, pooled = self.memoized(captions, encode)
        return TextStates(context, pooled)

    @torch.no_grad()
    def memoized(self, captions: list[str], encode: Callable) -> tuple:
        """Per caption, the tensors `encode(captions)` gives (a tuple of batched tensors or None), each
        caption encoded once per run and kept while they fit in TEXT_CACHE_MB; batched back."""
        memo = self.text_memo
        missing = [c for c in dict.fromkeys(captions) if c not in memo]
        fresh = {}
        if missing:
            tensors = encode(missing)
            fresh = {c: tuple(None if t is None else t[i] for t in tensors) for i, c in enumerate(missing)}
            size = sum(t[0].numel() * t.element_size() for t in tensors if t is not None)
            room = int(TEXT_CACHE_MB * 2**20 // size) - len(memo)
            memo.update(
                (c, tuple(None if t is None else t.clone() for t in row))
                for c, row in list(fresh.items())[: max(0, room)]
            )
        rows = [memo[c] if c in memo else fresh[c] for c in captions]
        return tuple(None if rows[0][j] is None else torch.stack([r[j] for r in rows]) for j in range(len(rows[0])))

    def prepare(self, progress: bool = False, stopping=lambda: None) -> None:
        """Before the first step (the loop calls it): the latent cache, read or encoded (latent_cache)."""
        c = self.config
        if c.latent_cache and self.cache is None:
            folder = Path(c.run.dir).expanduser()
            self.cache = latent_cache.load_or_encode(folder, self.data, self.model.vae, c.data.size, progress, stopping)

    @torch.no_grad()
    def posterior(self, items: list[int], images: torch.Tensor | None):
        """(mean, std) of each image's latent posterior, from the cache when there is one."""
        if self.cache is not None:
            return latent_cache.posterior(self.cache, items)
        post = self.model.vae.encode(images)
        return post.mean, post.std

    def draw(self, items: list[int], images, gs: list[int], high: int, weights: torch.Tensor | None = None):
        """The samples' clean latents z0, each drawn afresh from its posterior, and per sample, from its
        own generator: an integer in [0, high) (a timestep, or an index into a grid of them; with
        `weights`, each with its probability), the diffusion noise, and a uniform number (for condition
        dropout, or a guidance scale)."""
        mean, std = self.posterior(items, images)
        gens = [sample_generator(self.config.run.seed, g) for g in gs]
        z_noise = torch.cat([torch.randn((1, *mean.shape[1:]), generator=g) for g in gens])
        if weights is None:
            k = torch.cat([torch.randint(0, high, (1,), generator=g) for g in gens])
        else:
            k = torch.cat([torch.multinomial(weights, 1, generator=g) for g in gens])
        eps = torch.cat([torch.randn((1, *mean.shape[1:]), generator=g) for g in gens])
        u = torch.cat([torch.rand((1,), generator=g) for g in gens])
        return self.model.vae.scale(mean + std * z_noise), k, eps, u

    # state ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            self.name: self.trainable.state_dict(),
            "ema": self.ema.state_dict(),
            "opt": self.opt.state_dict(),
            "scale_factor": self.model.vae.config.scale_factor,
        }

    def load_state_dict(self, d: dict) -> None:
        self.trainable.load_state_dict(d[self.name])
        self.ema.load_state_dict(d["ema"])
        self.opt.load_state_dict(d["opt"])
        self.model.vae.config.scale_factor = float(d["scale_factor"])

    # one step ---------------------------------------------------------------------------------------
    def predict(self, zt, t, context, extra, y=None):
        """The network's output for noisy latents; `extra` is per-sample input other tasks need, `y` the
        addition embedding's input of an SDXL-style UNet (given only to those)."""
        return self.unet(zt, t, context, y=y)

    def added_vector(self, pooled: torch.Tensor | None, drop: torch.Tensor, z0: torch.Tensor):
        """SDXL's `y` for each sample: its pooled vector (the empty prompt's where the caption is dropped,
        as the reference encodes an emptied caption) and the embedded micro-conditioning of an uncropped
        image of the training size -- original size (h, w), crop (0, 0), target size (h, w). None for a
        model without an addition embedding."""
        if pooled is None:
            return None
        pooled = torch.where(drop[:, None], self.empty_pooled.expand_as(pooled), pooled)
        if not self.unet.config.addition_time_embed_dim:  # a transformer's y: the pooled vector alone
            return pooled
        f = self.model.vae.config.downsample_factor
        h, w = z0.shape[-2] * f, z0.shape[-1] * f
        numbers = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=pooled.device)
        micro = size_embedding(numbers.expand(len(pooled), -1), self.unet.config.addition_time_embed_dim)
        return torch.cat([pooled, micro.to(pooled.dtype)], dim=-1)

    def noise_levels(self, k: torch.Tensor):
        """(a, s, the model's timestep) of z_t = a·x0 + s·ε for drawn timestep indices k in [0, T): ᾱ's
        (a = sqrt(ᾱ_k), s = sqrt(1 − ᾱ_k), timestep k), or a flow's (a = 1 − σ, s = σ, timestep σ·T)
        with σ the logit-normal quantile (k + ½)/T -- the index spread evenly over the distribution."""
        if not self.schedule.flow:
            ab = self.schedule.alphas_cumprod[k][:, None, None, None]
            return ab.sqrt(), (1 - ab).sqrt(), k
        T, c = self.schedule.num_train_timesteps, self.config
        normal = math.sqrt(2) * torch.erfinv(2 * (k.double() + 0.5) / T - 1)
        sigma = torch.sigmoid(c.logit_mean + c.logit_std * normal).float()
        return 1 - sigma[:, None, None, None], sigma[:, None, None, None], sigma * T

    def extra_for(self, images: torch.Tensor | None):
        return None

    def loss(self, images, items: list[int], captions: list[str], gs: list[int], extra=None, reduce: bool = True):
        """The denoising loss against the model's own prediction type, optionally Min-SNR weighted."""
        c = self.config
        z0, t, eps, u = self.draw(items, images, gs, self.schedule.num_train_timesteps, self.timestep_weights)
        text, drop = self.text_states(captions), u < c.cond_dropout
        context = torch.where(drop[:, None, None], self.empty_context().expand_as(text.context), text.context)
        y = self.added_vector(text.pooled, drop, z0)
        a, s, t = self.noise_levels(t)
        zt = a * z0 + s * eps
        with c.run.autocast():
            # y only for a UNet that takes it: a task's own predict may know no y (a ControlNet's)
            out = self.predict(zt, t, context, extra) if y is None else self.predict(zt, t, context, extra, y=y)
        prediction = PREDICTIONS[self.model.config.schedule.prediction_type]
        target = prediction.target(z0, eps, a, s)
        per_sample = F.mse_loss(out.float(), target, reduction="none").mean(dim=(1, 2, 3))
        if c.min_snr_gamma:
            snr = (a / s).pow(2).flatten()
            per_sample = per_sample * snr.clamp(max=c.min_snr_gamma) / prediction.x0_error_scale(snr)
        return per_sample.mean() if reduce else per_sample

    def batch(self, indices: range):
        """(images or None, items, captions, global indices) of this process's readable samples: with
        the latents cached, only the captions are read (unless the task needs the images themselves)."""
        if self.cache is not None and not self.needs_images:
            gs = [g for g in indices if latent_cache.readable(self.cache, self.order.item(g))]
            items = [self.order.item(g) for g in gs]
            return None, items, [self.data.caption(i) for i in items], gs
        batch = load_batch(self.data, self.order, indices, self.config.data.flip, self.config.run.seed)
        images, captions, gs = batch if batch is not None else (None, [], [])
        return images, [self.order.item(g) for g in gs], captions, gs

    def train_step(self, step: int, indices: range, lr: float) -> dict:
        """One optimiser step over the global batch (this process's share in grad_accum micro-batches,
        gradients summed over processes), then the EMA update. Logged: the loss, the learning rate and
        how many of the global batch's samples were left out as unreadable (as the autoencoder logs)."""
        c = self.config
        self.prepare()
        for g in self.opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        images, items, captions, gs = self.batch(indices)
        extra = self.extra_for(images)
        self.trainable.train()
        self.opt.zero_grad(set_to_none=True)
        n_global = dist.global_count(len(gs))
        micro = max(1, len(gs) // c.run.grad_accum) if gs else 1
        total = 0.0
        for s in range(0, len(gs), micro):
            sl = slice(s, s + micro)
            loss = self.loss(
                None if images is None else images[sl],
                items[sl],
                captions[sl],
                gs[sl],
                None if extra is None else extra[sl],
            )
            share = len(gs[sl]) / n_global
            (loss * share).backward()
            total += loss.item() * share
        dist.sum_grads_(self.trainable.parameters())
        self.opt.step()
        total = dist.sum_values({"loss": total})["loss"]
        self.ema.update(step)
        return {"loss": total, "lr": lr, "skipped": float(len(indices) * dist.size() - n_global)}

    # evaluation and samples -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        """Loss of the EMA weights on fixed validation samples with fixed noise (lower is better)."""
        c = self.config
        if getattr(c, "val", None) is not None:
            val = open_dataset(c.val)
        elif c.data.kind == "shapes":
            val = open_dataset(replace(c.data, split="val", n=c.val_batches * c.run.batch_size))
        else:
            return {}
        # uniform timesteps and no cache: a loss comparable across runs whatever their timestep bias
        saved, self.cache, self.timestep_weights = (self.cache, self.timestep_weights), None, None
        try:
            losses = []
            with self.ema.applied():
                bs = c.run.batch_size
                for start in range(0, min(len(val), c.val_batches * bs), bs):
                    loaded = {i: val.load(i) for i in range(start, min(len(val), start + bs))}
                    idx = [i for i, item in loaded.items() if item is not None]  # None: skipped, counted
                    if not idx:
                        continue
                    images = torch.stack([loaded[i][0] for i in idx])
                    captions, gs = [loaded[i][1] for i in idx], [10**9 + i for i in idx]
                    losses.append(self.loss(images, idx, captions, gs, self.extra_for(images)).item())
        finally:
            self.cache, self.timestep_weights = saved
        if not losses:
            return {}
        value = sum(losses) / len(losses)
        return {"val_loss": round(value, 6), "score": -value}

    def prompt_grid(self, pipe, step: int, folder: Path) -> None:
        """samples-STEP.png: one column per sample prompt, one row per seed."""
        s = self.config.sample
        kw = dict(steps=s.steps, cfg=s.cfg, sampler=s.sampler)
        if s.size is not None:
            kw.update(width=s.size, height=s.size)
        with torch.no_grad():
            rows = [[pipe(p, seed=seed, **kw).images[0] for p in s.prompts] for seed in s.seeds]
        self.save_grid(rows, step, folder)

    @staticmethod
    def save_grid(rows: list, step: int, folder: Path) -> None:
        grid = image_grid(rows)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / f"samples-{step:08d}.png", lambda tmp: grid.save(tmp, format="PNG"))

    def sample(self, step: int, folder: Path) -> None:
        """A grid of samples of the model as trained so far, in `folder`."""
        raise NotImplementedError

    def finish(self, folder: Path) -> None:
        """The run's product (a model, a ControlNet, a LoRA...), in the run folder."""
        raise NotImplementedError
