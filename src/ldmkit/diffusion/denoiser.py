"""The UNet as a denoiser in sigma space, D(x, sigma) -> x0 (the k-diffusion formulation), with
classifier-free guidance (Ho & Salimans 2022).

x is the latent in sigma space (variance-preserving latent / sqrt(ᾱ)). The UNet sees
x / sqrt(sigma² + 1) at the timestep of sigma. Guidance, and guidance rescale (Lin et al. 2023,
sec. 3.4), are applied to the UNet's native output (eps or v), as diffusers does, then converted to
x0: rescale is not linear, so the order matters."""

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ldmkit.diffusion.schedule import NoiseSchedule, SamplingSchedule
from ldmkit.errors import ConfigError
from ldmkit.models.controlnet import ControlNet, guess_mode_scales
from ldmkit.models.ip_adapter import ImagePrompt, bound
from ldmkit.models.unet import FeatureCache, UNetModel


@dataclass
class Control:
    """One ControlNet applied during sampling (Zhang et al. 2023)."""

    net: "ControlNet"
    hint: torch.Tensor  # [B, C, H, W] in [0, 1], at the output's pixel size
    strength: float = 1.0
    start: float = 0.0  # fraction of the sampling steps during which control applies
    end: float = 1.0
    # Guess mode: the prompt-conditioned branch alone gets control, its residuals scaled from shallow
    # to deep as the original work does (models/controlnet.guess_mode_scales).
    guess_mode: bool = False

    def active(self, step: int, steps: int) -> bool:
        """diffusers' rule: off before `start` and once a step would end after `end`."""
        return not (step / steps < self.start or (step + 1) / steps > self.end)


@dataclass
class Blend:
    """Inpainting with an ordinary (4-channel) model: where `keep` is 0 the latents stay the original's.
    Without `noise` the prediction x0 is replaced by `z_init` at every step (the popular web UI's way);
    with it, the sampler's own latents at each sigma after the first are replaced by `z_init + noise *
    sigma`, the original noised to that level (diffusers' inpainting pipelines, which blend after
    every scheduler step)."""

    keep: torch.Tensor  # [B|1, 1, h, w]
    z_init: torch.Tensor  # [B, C, h, w]
    noise: torch.Tensor | None = None  # [B, C, h, w]: the run's initial noise


@dataclass
class Conditioning:
    """Everything besides x and sigma that the denoiser needs, batched per image."""

    context: torch.Tensor  # [B, T, D] prompt states
    uncond: torch.Tensor | None = None  # [B, T, D] negative-prompt states; None: no guidance pass
    cfg_scale: float = 7.5
    guidance_rescale: float = 0.0
    concat: torch.Tensor | None = None  # [B, C, h, w] extra input channels (inpainting: mask + masked latent)
    timestep_cond: torch.Tensor | None = None  # [B, D] guidance-scale embedding (LCM)
    y: torch.Tensor | None = None  # class labels / vectors
    uncond_y: torch.Tensor | None = None  # the negative prompts' vectors, where they differ (SDXL); None: y
    blend: Blend | None = None  # inpainting by latent blending
    control: list[Control] = field(default_factory=list)
    image_prompts: list[ImagePrompt] = field(default_factory=list)  # IP-Adapters' image tokens


def to_x0(out: torch.Tensor, x: torch.Tensor, sigma: float, prediction_type: str) -> torch.Tensor:
    """The UNet's native output at noise level sigma -> predicted clean latent. At sigma = inf
    (ᾱ = 0) the limits are exact: v gives x0 = -v; eps cannot tell x0 at all."""
    if math.isinf(sigma):
        if prediction_type == "v_prediction":
            return -out
        if prediction_type == "sample":
            return out
        raise ConfigError("an eps-prediction model cannot denoise pure noise (zero terminal SNR)")
    if prediction_type == "epsilon":
        return x - sigma * out
    if prediction_type == "v_prediction":
        return x / (sigma**2 + 1) - out * (sigma / (sigma**2 + 1) ** 0.5)
    if prediction_type == "sample":
        return out
    if prediction_type == "flow":  # x = (1 − σ)·x0 + σ·ε and v = ε − x0
        return x - sigma * out
    raise ConfigError(f"prediction_type {prediction_type!r}; allowed: epsilon, v_prediction, sample, flow")


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale: match the guided output's std to the conditional one's, blended by phi."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def with_image_tokens(context: torch.Tensor, prompts: list[ImagePrompt], guided: bool) -> torch.Tensor:
    """The context with each adapter's image tokens after the text's (models/ip_adapter.py splits them off);
    with guidance the batch is [negative, prompt] halves."""
    if not prompts:
        return context
    extra = [torch.cat([ip.uncond, ip.tokens]) if guided else ip.tokens for ip in prompts]
    return torch.cat([context, *(e.to(context) for e in extra)], dim=1)


class Denoiser:
    """D(x, sigma) for one sampling run. `walk` is the schedule the run's sampler walks: the UNet is
    evaluated at its exact timesteps (schedulers that step on integer timesteps, or round them, as
    diffusers' DPM-Solver does with Karras sigmas; other sigmas map through the noise schedule), and
    its sigmas say which step a call belongs to (ControlNet start/end). `cache`: DeepCache's kept
    features for this run, or None."""

    def __init__(
        self,
        unet: UNetModel,
        schedule: NoiseSchedule,
        prediction_type: str,
        walk: SamplingSchedule | None = None,
        cache: FeatureCache | None = None,
    ):
        self.unet = unet
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.walk = walk
        self.cache = cache
        sigmas = [] if walk is None else [float(s) for s in walk.sigmas]
        self._timesteps = {} if walk is None else dict(zip(sigmas[:-1], (float(t) for t in walk.timesteps)))
        self._sigmas = sigmas
        self.calls = 0  # UNet evaluations (a guidance pair counts once)

    def step_of(self, sigma: float) -> tuple[int, int]:
        """(index of the step whose interval of the walk holds sigma, number of steps). Samplers that
        evaluate between the walk's sigmas (Heun, DPM2, SDE) get the step of the interval."""
        steps = max(1, len(self._sigmas) - 1)
        return min(steps - 1, sum(1 for s in self._sigmas[:-1] if s > sigma * (1 + 1e-6))), steps

    def control_residuals(self, x_in, t, context, cond: Conditioning, sigma: float, guided: bool, y=None):
        """Summed residuals of the ControlNets active at this step; with guidance the batch is
        [uncond, cond] halves, and guess mode gives the unconditional half none."""
        step, steps = self.step_of(sigma)
        total = None
        for ctl in cond.control:
            if not ctl.active(step, steps):
                continue
            if ctl.guess_mode and guided:
                n = x_in.shape[0] // 2
                half = ctl.net(x_in[n:], ctl.hint, t[n:], context[n:], y=None if y is None else y[n:])
                res = [torch.cat([torch.zeros_like(r), r]) for r in half]
            else:
                hint = torch.cat([ctl.hint, ctl.hint]) if guided else ctl.hint
                res = ctl.net(x_in, hint, t, context, y=y, timestep_cond=None if guided else cond.timestep_cond)
            scales = guess_mode_scales(len(res)) if ctl.guess_mode else [1.0] * len(res)
            res = [r * (ctl.strength * s) for r, s in zip(res, scales)]
            total = res if total is None else [a + b for a, b in zip(total, res)]
        return total

    def timestep(self, sigma: float) -> float:
        t = self._timesteps.get(float(sigma))
        return t if t is not None else float(self.schedule.sigma_to_t(np.array(float(sigma))))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Conditioning) -> torch.Tensor:
        sigma = float(sigma)
        self.calls += 1
        b = cond.blend
        if b is not None and b.noise is not None and self._sigmas and not math.isinf(sigma) and sigma < self._sigmas[0]:
            # Blending the sampler's own tensor before its step reads it is diffusers' blend after the
            # previous step, for every sampler in samplers.py: each passes its state (or, within a
            # step, its intermediate point, which diffusers' second-order schedulers blend too) as x.
            # At the first sigma x already is the noised original, or pure noise diffusers leaves be.
            x.copy_(b.keep * x + (1 - b.keep) * self.walk.noised(b.z_init, b.noise, sigma))
        # At inf x is the VP latent; a flow model sees its x_σ as it is (diffusion/flow.py).
        x_in = x if math.isinf(sigma) or self.prediction_type == "flow" else x / (sigma**2 + 1) ** 0.5
        if cond.concat is not None:
            x_in = torch.cat([x_in, cond.concat.to(x_in)], dim=1)
        # The UNet computes in its own dtype (bf16 on the fast path); the sampler's state stays fp32.
        dtype = next(self.unet.parameters()).dtype
        x_in = x_in.to(dtype)
        t = torch.full((x.shape[0],), self.timestep(sigma), dtype=torch.float32, device=x.device)
        guided = cond.uncond is not None and cond.cfg_scale != 1.0
        with bound(self.unet, cond.image_prompts, *self.step_of(sigma)):
            out = self._predict(x_in, t, cond, sigma, guided, dtype)
        x0 = to_x0(out.float(), x, sigma, self.prediction_type)
        if b is not None and b.noise is None:
            x0 = b.keep * x0 + (1 - b.keep) * b.z_init
        return x0

    def _predict(self, x_in, t, cond: Conditioning, sigma: float, guided: bool, dtype) -> torch.Tensor:
        """The UNet's output, guided; the ControlNets see the text context, the UNet the image tokens too."""
        if guided:
            n = x_in.shape[0]
            x2, t2, ctx2 = torch.cat([x_in, x_in]), torch.cat([t, t]), torch.cat([cond.uncond, cond.context]).to(dtype)
            y2 = None if cond.y is None else torch.cat([cond.y if cond.uncond_y is None else cond.uncond_y, cond.y])
            control = self.control_residuals(x2, t2, ctx2, cond, sigma, True, y2) if cond.control else None
            ctx2 = with_image_tokens(ctx2, cond.image_prompts, True)
            both = self.unet(x2, t2, ctx2, y=y2, control=control, cache=self.cache).float()
            out_uncond, out_cond = both[:n], both[n:]
            out = out_uncond + cond.cfg_scale * (out_cond - out_uncond)
            if cond.guidance_rescale > 0:
                out = rescale_guidance(out, out_cond, cond.guidance_rescale)
            return out
        context = cond.context.to(dtype)
        control = self.control_residuals(x_in, t, context, cond, sigma, False, cond.y) if cond.control else None
        context = with_image_tokens(context, cond.image_prompts, False)
        return self.unet(
            x_in, t, context, y=cond.y, timestep_cond=cond.timestep_cond, control=control, cache=self.cache
        ).float()
