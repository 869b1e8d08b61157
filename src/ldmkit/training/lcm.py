"""`ldmkit distill-lcm`: latent consistency distillation (Luo et al. 2023, Algorithm 1).

The student starts as the teacher (plus a guidance-scale embedding whose projection starts at zero,
so that step 0 is exactly the teacher) and learns the consistency function f(z_t, t, w) =
c_skip(t) z_t + c_out(t) x0(z_t, t, w), which maps any point of the guided teacher's probability-flow
ODE to its end. One training step:

- pick a step of the teacher's 50-step DDIM grid (t_{n+k} = 19, 39, ..., 999; k = 20 skipped steps),
  noise the latent to it, and a guidance scale w;
- the teacher with guidance w (uncond + w (cond - uncond), the ordinary CFG that inference uses)
  takes one DDIM step from t_{n+k} to t_n;
- the student at t_{n+k} must agree with the EMA target network at t_n (pseudo-Huber or L2).

w is embedded as guidance_scale_embedding(w), i.e. (w - 1) * 1000: the LCM paper's omega is w - 1,
since (1 + omega) eps(c) - omega eps(0) is guidance with scale w. The pipeline embeds the --cfg it is
given the same way (tests/test_lcm.py proves both sides use the same w)."""

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ldmkit.errors import ConfigError
from ldmkit.models.ldm import LatentDiffusion
from ldmkit.models.unet import UNetModel
from ldmkit.nn.embedding import guidance_scale_embedding
from ldmkit.training.ema import EMA
from ldmkit.training.latent_task import LatentTask, LatentTrainConfig, load_frozen
from ldmkit.training.predictions import PREDICTIONS

SIGMA_DATA = 0.5


@dataclass
class LCMSampleConfig:
    prompts: tuple[str, ...] = ("a red circle", "a blue square above a yellow triangle", "two green stars")
    steps: tuple[int, ...] = (1, 2, 4, 8)
    cfg: float = 5.0
    seed: int = 0


@dataclass
class DistillConfig(LatentTrainConfig):
    teacher: str = ""  # the model to distil (ours, an SD file, a diffusers folder); frozen
    w_min: float = 2.0  # guidance scales drawn uniformly from [w_min, w_max]
    w_max: float = 8.0
    num_ddim_timesteps: int = 50  # the teacher's discretisation; k = 1000 / this steps are skipped
    time_cond_proj_dim: int = 256
    timestep_scaling: float = 10.0
    loss: str = "huber"  # huber (pseudo-Huber, c = huber_c) | l2
    huber_c: float = 0.001
    ema_decay: float = 0.95  # the target network
    sample: LCMSampleConfig = field(default_factory=LCMSampleConfig)

    frozen_model = ("teacher", "the model to distil")

    def check(self) -> None:
        if self.loss not in ("huber", "l2"):
            raise ConfigError(f"loss: {self.loss!r}; allowed: huber, l2")
        if not 1.0 <= self.w_min <= self.w_max:
            raise ConfigError(f"w_min {self.w_min}, w_max {self.w_max}; allowed: 1 <= w_min <= w_max")
        if self.num_ddim_timesteps <= 1 or 1000 % self.num_ddim_timesteps:
            raise ConfigError(f"num_ddim_timesteps: {self.num_ddim_timesteps}; allowed: a divisor of 1000 above 1")


def boundary_scalings(t: torch.Tensor, timestep_scaling: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip(t), c_out(t): f(x, 0) = x at the boundary; timesteps scaled by 10 as diffusers does."""
    scaled = t.float() * timestep_scaling
    return SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2), scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5


def x0_and_eps(out, z, ab, prediction_type: str):
    """(x0, eps) from a UNet output at a VP latent z with ᾱ = ab."""
    return PREDICTIONS[prediction_type].inverse(out, z, ab.sqrt(), (1 - ab).sqrt())


def student_from(teacher: UNetModel, proj_dim: int) -> UNetModel:
    """The teacher's UNet plus a guidance-scale embedding projected to zero at first."""
    student = UNetModel(replace(teacher.config, time_cond_proj_dim=proj_dim))
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or set(missing) - {"time_cond_proj.weight"}:
        raise ConfigError(f"student/teacher mismatch: missing {missing}, unexpected {unexpected}")
    torch.nn.init.zeros_(student.time_cond_proj.weight)
    return student


class DistillTask(LatentTask):
    name = "student"
    refuses_sdxl = "distill-lcm"  # the teacher and student are called without the UNet's y

    def __init__(self, config: DistillConfig):
        model = load_frozen(config.teacher)
        teacher = model.unet.eval()
        if teacher.config.time_cond_proj_dim:
            raise ConfigError(f"{config.teacher}: already has a guidance embedding (a distilled model)")
        self.student = student_from(teacher, config.time_cond_proj_dim)
        super().__init__(config, model, self.student)
        # the target network runs on the student's EMA weights: its own tensors are the averages
        self.target = copy.deepcopy(self.student).requires_grad_(False).eval()
        self.ema = EMA(self.student, config.ema_decay, into=self.target)
        T = self.schedule.num_train_timesteps
        k = T // config.num_ddim_timesteps
        self.k = k
        self.ddim_timesteps = torch.arange(1, config.num_ddim_timesteps + 1) * k - 1  # 19, 39, ..., 999

    def guided_teacher(self, z, t, context, uncond, w):
        """The teacher's (x0, eps) with classifier-free guidance of scale w, in its native output
        space as inference does: out = uncond + w (cond - uncond)."""
        both = self.unet(torch.cat([z, z]), torch.cat([t, t]), torch.cat([uncond, context]))
        out_u, out_c = both.chunk(2)
        out = out_u + w[:, None, None, None] * (out_c - out_u)
        ab = self.schedule.alphas_cumprod[t][:, None, None, None]
        return x0_and_eps(out.float(), z, ab, self.model.config.schedule.prediction_type)

    def consistency(self, net, z, t, context, w_emb):
        ab = self.schedule.alphas_cumprod[t][:, None, None, None]
        x0, _ = x0_and_eps(
            net(z, t, context, timestep_cond=w_emb).float(), z, ab, self.model.config.schedule.prediction_type
        )
        c_skip, c_out = boundary_scalings(t, self.config.timestep_scaling)
        return c_skip[:, None, None, None] * z + c_out[:, None, None, None] * x0

    def loss(self, images, items, captions, gs, extra=None, reduce: bool = True):
        c = self.config
        z0, index, eps, u = self.draw(items, images, gs, c.num_ddim_timesteps)
        w = u * (c.w_max - c.w_min) + c.w_min
        context = self.encode_text(captions)
        uncond = self.empty.expand_as(context)
        w_emb = guidance_scale_embedding(w, c.time_cond_proj_dim)
        t_start = self.ddim_timesteps[index]
        t_prev = (t_start - self.k).clamp(min=0)
        ab = self.schedule.alphas_cumprod
        ab_start = ab[t_start][:, None, None, None]
        z_start = ab_start.sqrt() * z0 + (1 - ab_start).sqrt() * eps
        pred = self.consistency(self.student, z_start, t_start, context, w_emb)
        with torch.no_grad():
            x0, e = self.guided_teacher(z_start, t_start, context, uncond, w)
            ab_prev = ab[t_prev][:, None, None, None]
            z_prev = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * e  # one DDIM step of the guided teacher
            target = self.consistency(self.target, z_prev, t_prev, context, w_emb)
        if c.loss == "l2":
            per = F.mse_loss(pred, target, reduction="none")
        else:
            per = torch.sqrt((pred - target) ** 2 + c.huber_c**2) - c.huber_c
        per_sample = per.mean(dim=(1, 2, 3))
        return per_sample.mean() if reduce else per_sample

    def evaluate(self, step: int) -> dict:
        return {}  # measured by the judge afterwards (ldmkit eval); the loss against a moving target says little

    def distilled_model(self) -> LatentDiffusion:
        m = self.model
        config = replace(m.config, unet=self.target.config)
        return LatentDiffusion.from_parts(config, self.target, m.vae, m.text_encoder, m.alphas_cumprod).eval()

    def sample(self, step: int, folder: Path) -> None:
        """One row per prompt, one column per step count (the LCM sampler, guidance in the embedding)."""
        from ldmkit.pipelines import Pipeline

        s = self.config.sample
        pipe = Pipeline(self.distilled_model(), name=f"step-{step}")
        rows = [[pipe(p, steps=n, cfg=s.cfg, sampler="lcm", seed=s.seed).images[0] for n in s.steps] for p in s.prompts]
        self.save_grid(rows, step, folder)

    def finish(self, folder: Path) -> None:
        from ldmkit.checkpoints.single_file import save_single_file

        save_single_file(self.distilled_model(), folder / "model.safetensors")
