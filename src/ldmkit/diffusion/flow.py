"""Rectified flow (Liu et al. 2022), the objective of Stable Diffusion 3 (Esser et al. 2024):

    x_σ = (1 − σ)·x0 + σ·ε,  σ ∈ [0, 1],  the model predicting the velocity v = ε − x0.

Samplers walk x_σ itself: the denoiser returns x0 = x − σ·v (diffusion/denoiser.py), so Euler's step
x + (x − x0)/σ·(σ' − σ) is the flow's x + v·(σ' − σ) — diffusers' FlowMatchEulerDiscreteScheduler — and
Heun's is its FlowMatchHeunDiscreteScheduler. The model sees x_σ unscaled at timestep σ·T.

Sigmas are spread evenly in time and then shifted toward the noise, σ' = sσ / (1 + (s − 1)σ) (SD3's
s = 3), or by an amount that grows with the image's token count (the resolution-dependent shift:
σ' = e^μ / (e^μ + 1/σ − 1), μ linear in the sequence length between two anchors)."""

import math
from dataclasses import dataclass

import numpy as np
import torch

from ldmkit.diffusion.schedule import SamplingSchedule
from ldmkit.errors import ConfigError

# Our flow samplers and the diffusers class each equals (tests/test_flow.py); DPM-Solver++ as diffusers
# runs it on a flow (use_flow_sigmas, flow_prediction, flow_shift = the model's shift).
FLOW_SAMPLERS = {
    "euler": "FlowMatchEulerDiscreteScheduler",
    "heun": "FlowMatchHeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}
# Samplers whose updates are written for x0 + σ·ε (exponential integrators in log σ): they walk the
# flow in that form (walk_in_ve_form).
VE_FORM = {"dpmpp_2m"}

# FlowMatchEulerDiscreteScheduler's settings and defaults; a folder's config is read over them.
DEFAULTS = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}
# Settings whose non-default values we do not implement: refused by name, never ignored.
NOT_IMPLEMENTED = {
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "stochastic_sampling": False,
}


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """The static shift: σ' = sσ / (1 + (s − 1)σ); s > 1 spends more steps at high noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(mu: float, sigmas: np.ndarray, kind: str = "exponential") -> np.ndarray:
    """The resolution-dependent shift of sigmas by μ (diffusers' time_shift with exponent 1)."""
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    return mu / (mu + (1 / sigmas - 1))


def resolution_mu(image_seq_len: int, cfg: dict) -> float:
    """μ for an image of `image_seq_len` tokens: linear between (base_image_seq_len, base_shift) and
    (max_image_seq_len, max_shift), as SD3's and FLUX's pipelines compute it."""
    slope = (cfg["max_shift"] - cfg["base_shift"]) / (cfg["max_image_seq_len"] - cfg["base_image_seq_len"])
    return image_seq_len * slope + cfg["base_shift"] - slope * cfg["base_image_seq_len"]


@dataclass
class FlowSchedule:
    """The training schedule of a flow model: T timesteps, the sigma of timestep t being (t + 1)/T,
    statically shifted unless the shift depends on the resolution. `sigma_to_t` maps a sigma to the
    model's timestep, σ·T."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    dynamic: bool = False
    flow = True

    @classmethod
    def from_config(cls, folder: dict | None, default_shift: float = 1.0) -> "FlowSchedule":
        cfg = {**DEFAULTS, "shift": default_shift, **settings(folder)}
        return cls(int(cfg["num_train_timesteps"]), float(cfg["shift"]), bool(cfg["use_dynamic_shifting"]))

    @property
    def sigmas(self) -> torch.Tensor:
        T = self.num_train_timesteps
        s = np.linspace(1, T, T, dtype=np.float32)[::-1] / T
        return torch.from_numpy(np.ascontiguousarray(s if self.dynamic else shift_sigmas(s, self.shift)))

    def sigma_to_t(self, sigma):
        return np.asarray(sigma) * self.num_train_timesteps


def settings(folder: dict | None) -> dict:
    """The scheduler settings a folder's config gives (FlowMatch* keys only), refusing the ones we do
    not implement by name."""
    folder = folder or {}
    for key, default in NOT_IMPLEMENTED.items():
        if folder.get(key, default) not in (default, None, False):
            raise ConfigError(f"scheduler config {key}: {folder[key]!r}; allowed: {default!r} (not implemented)")
    if folder.get("time_shift_type", "exponential") not in ("exponential", "linear"):
        raise ConfigError(
            f"scheduler config time_shift_type: {folder['time_shift_type']!r}; allowed: exponential, linear"
        )
    return {k: folder[k] for k in DEFAULTS if folder.get(k) is not None}


def flow_schedule(
    sampler: str,
    noise: FlowSchedule,
    steps: int,
    folder: dict | None = None,
    image_seq_len: int | None = None,
    spacing: str | None = None,
) -> SamplingSchedule:
    """The sigmas `sampler` walks in `steps` steps: evenly spaced timesteps from the training sigma_max
    to sigma_min, shifted (statically, or by the image's `image_seq_len` tokens), then 0."""
    if sampler not in FLOW_SAMPLERS:
        raise ConfigError(f"sampler {sampler!r} with a flow-matching model; allowed: {', '.join(FLOW_SAMPLERS)}")
    if spacing is not None:
        raise ConfigError("timestep spacing with a flow-matching model; its timesteps are evenly spaced, then shifted")
    if steps <= 0:
        raise ConfigError(f"steps: {steps}; allowed: 1 or more")
    cfg = {**DEFAULTS, "shift": noise.shift, **settings(folder)}
    T = noise.num_train_timesteps
    if sampler in VE_FORM:
        return _solver_schedule(noise, steps)
    train = noise.sigmas.numpy()
    sigmas = np.linspace(float(train[0]) * T, float(train[-1]) * T, steps) / T
    if noise.dynamic:
        if sampler == "heun":
            raise ConfigError("sampler 'heun' with a resolution-dependent shift; allowed: euler (as diffusers)")
        if image_seq_len is None:
            raise ConfigError("a resolution-dependent shift needs the image's size")
        sigmas = time_shift(resolution_mu(image_seq_len, cfg), sigmas, cfg["time_shift_type"])
    else:
        sigmas = shift_sigmas(sigmas, noise.shift)
    sigmas = torch.from_numpy(np.append(sigmas.astype(np.float32), np.float32(0.0)))
    return SamplingSchedule(
        sigmas=sigmas,
        timesteps=(sigmas[:-1] * T).double(),  # σ·T in fp32, as diffusers computes it
        init_noise_sigma=1.0,
        sigma_space_output=True,
        flow=True,
    )


def flow_start(steps: int, strength: float) -> int:
    """The first step run from an image at `strength` (SD3's img2img rule, not SD's: steps − steps·strength
    truncated, so 28 steps at 0.6 run 17, where SD's rule runs 16)."""
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"strength: {strength}; allowed: 0 to 1")
    return int(max(steps - min(steps * strength, steps), 0))


def _solver_schedule(noise: FlowSchedule, steps: int) -> SamplingSchedule:
    """DPM-Solver's flow sigmas: 1 − linspace(1, 1/T, n + 1) shifted, highest first, the last dropped,
    then 0; the model runs at σ·T truncated to an integer, as diffusers casts its timesteps."""
    if noise.dynamic:
        raise ConfigError("sampler 'dpmpp_2m' with a resolution-dependent shift; allowed: euler (as diffusers)")
    T = noise.num_train_timesteps
    sigmas = np.flip(shift_sigmas(1.0 - np.linspace(1, 1 / T, steps + 1), noise.shift))[:-1].copy()
    timesteps = (sigmas * T).astype(np.int64)
    sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))
    return SamplingSchedule(sigmas, torch.from_numpy(timesteps).double(), 1.0, sigma_space_output=True, flow=True)


def walk_in_ve_form(fn, denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra: dict, callback, noise, **options):
    """Run sampler `fn`, written for x = x0 + s·ε, on a flow: x_σ/(1 − σ) at s = σ/(1 − σ) is that form
    (the same path, each level divided by 1 − σ), so its exponential updates are diffusers' DPM-Solver on
    flow sigmas. The denoiser is called at the walk's own σ (its timesteps are looked up by them)."""
    flow = [float(v) for v in sigmas]
    ve = [v / (1 - v) if v < 1 else math.inf for v in flow]
    back = dict(zip(ve, flow))

    def model(x_ve, s_ve, **kwargs):
        s_ve = float(s_ve)
        return denoiser(x_ve / (1 + s_ve), back[s_ve], **kwargs)

    out = fn(model, x / (1 - flow[0]), torch.tensor(ve, dtype=torch.float64), extra, callback, noise, **options)
    return out * (1 - flow[-1])
