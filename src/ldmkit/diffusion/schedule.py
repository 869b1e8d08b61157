"""Noise schedules (Ho et al. 2020; Nichol & Dhariwal 2021; Lin et al. 2023) and the sigma lists
samplers walk down: Karras, exponential, the timestep spacings, and the lists each family of
diffusers' schedulers computes from its settings.

The training schedule is a list of alphas_cumprod (ᾱ_t, t = 0..T-1). Samplers work in sigma space
(Karras et al. 2022): sigma_t = sqrt((1 - ᾱ_t) / ᾱ_t), and a latent x in sigma space is the
variance-preserving latent divided by sqrt(ᾱ_t). Computations follow diffusers' numerics (fp32
schedule, log-linear sigma interpolation) so that sampling is seed-for-seed equal to it."""

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from ldmkit.errors import ConfigError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
DIFFUSERS_SPACINGS = ("leading", "trailing", "linspace")  # the values diffusers' timestep_spacing takes
# ComfyUI's sgm_uniform scheduler, the popular web UI's "SGM Uniform" schedule type: not a diffusers value, a
# sigma list of its own (sgm_uniform below). Named after Stability's sgm code (generative-models), whose
# LegacyDDPMDiscretization takes the same grid of timesteps, floored to integers there.
SGM_UNIFORM = "sgm_uniform"
SPACINGS = (*DIFFUSERS_SPACINGS, SGM_UNIFORM)


def make_betas(kind: str, n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    if kind == "scaled_linear":  # SD: linear in sqrt(beta)
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    if kind == "squaredcos_cap_v2":  # cosine (Nichol & Dhariwal 2021), beta capped at 0.999

        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor(
            [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], dtype=torch.float32
        )
    raise ConfigError(f"beta_schedule {kind!r}; allowed: {list(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1, on betas as diffusers does it (its numerics: the betas of the
    rescaled ᾱ, whose cumulative product the scheduler then takes again)."""
    ab = zero_terminal_snr_alphas_cumprod(torch.cumprod(1.0 - betas, dim=0))
    alphas = torch.cat([ab[0:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def zero_terminal_snr_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(ᾱ) so the last step is pure noise (ᾱ_T = 0)
    and the first keeps its value."""
    sqrt_ab = alphas_cumprod.sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))  # diffusers' order of operations, for equal floats
    return sqrt_ab**2


class NoiseSchedule:
    """The training schedule: ᾱ_t and the sigma of every training timestep."""

    flow = False  # a rectified flow's schedule is diffusion/flow.FlowSchedule

    @classmethod
    def from_config(cls, schedule, alphas_cumprod: torch.Tensor | None = None, zero_terminal_snr: bool = False):
        """From a ScheduleConfig, or from the ᾱ stored in the checkpoint (the model's own schedule).
        Zero terminal SNR (Lin et al. 2023) makes ᾱ_T = 0: sigma_T is infinite. Sigma-space samplers
        use ᾱ_T = 2^-24 (sigma ≈ 4096), as diffusers' do; DDIM and DDPM start from ᾱ_T = 0 exactly
        (`terminal_is_pure_noise`). It needs a model that does not predict eps.

        A model folder's scheduler config (`schedule.diffusers`) is read as diffusers reads it:
        `trained_betas` replace the beta schedule, and `rescale_betas_zero_snr: true` means zero
        terminal SNR -- applied to a stored schedule too, which it leaves alone if already zero-SNR."""
        if schedule.prediction_type == "flow":  # a rectified flow has no ᾱ: its own schedule
            from ldmkit.diffusion.flow import FlowSchedule

            return FlowSchedule.from_config(schedule.diffusers)
        folder = schedule.diffusers or {}
        zero_terminal_snr = zero_terminal_snr or bool(folder.get("rescale_betas_zero_snr", False))
        if alphas_cumprod is None:
            if folder.get("trained_betas") is not None:
                betas = torch.tensor(folder["trained_betas"], dtype=torch.float32)
            else:
                betas = make_betas(
                    schedule.beta_schedule, schedule.num_train_timesteps, schedule.beta_start, schedule.beta_end
                )
            if zero_terminal_snr:
                betas = rescale_zero_terminal_snr(betas)
            alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        elif zero_terminal_snr and alphas_cumprod[-1] != 0:
            alphas_cumprod = zero_terminal_snr_alphas_cumprod(alphas_cumprod.float())
        if zero_terminal_snr and schedule.prediction_type == "epsilon":
            raise ConfigError(
                "zero terminal SNR needs a v- or x0-prediction model: at pure noise an "
                "eps-prediction model cannot tell the image"
            )
        return cls(alphas_cumprod)

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.alphas_cumprod = alphas_cumprod.float()
        self.terminal_is_pure_noise = bool(self.alphas_cumprod[-1] == 0)
        finite = self.alphas_cumprod.clone()
        if self.terminal_is_pure_noise:
            finite[-1] = 2**-24
        self.sigmas = ((1 - finite) / finite) ** 0.5
        self.log_sigmas = np.log(self.sigmas.numpy())

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def sigma_to_t(self, sigma: np.ndarray) -> np.ndarray:
        """Fractional timestep of each sigma, interpolating linearly in log sigma (diffusers'
        `_sigma_to_t`, k-diffusion's `sigma_to_t`)."""
        log_sigma = np.log(np.maximum(sigma, 1e-10))
        dists = log_sigma - self.log_sigmas[:, None]
        low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(self.log_sigmas) - 2)
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
        return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigma))

    def sigma_at(self, t: np.ndarray) -> np.ndarray:
        """Sigma at (fractional) timesteps, interpolated linearly in sigma as diffusers does."""
        return np.interp(t, np.arange(len(self.sigmas)), self.sigmas.numpy())

    def sigma_at_log(self, t: np.ndarray) -> np.ndarray:
        """Sigma at (fractional) timesteps, interpolated linearly in log sigma: k-diffusion's
        DiscreteSchedule.t_to_sigma, ComfyUI's ModelSamplingDiscrete.sigma (the inverse of sigma_to_t)."""
        return np.exp(np.interp(t, np.arange(len(self.log_sigmas)), self.log_sigmas))


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: n sigmas evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """n sigmas evenly spaced in log sigma (k-diffusion's get_sigmas_exponential)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def spaced_timesteps(spacing: str, n: int, T: int, steps_offset: int = 0, style: str = "float") -> np.ndarray:
    """The n timesteps (descending) of a sampling run, as diffusers spaces them (Lin et al. 2023,
    table 2). diffusers' schedulers differ in one detail: the Euler family ("float") uses n points
    of linspace as floats, DDIM/PNDM/DDPM ("int") the same points rounded to integers, the multistep
    solvers (DPM-Solver, UniPC; "solver") n of n + 1 points, rounded."""
    if spacing not in DIFFUSERS_SPACINGS:  # sgm_uniform is a sigma list of its own: sgm_uniform()
        raise ConfigError(f"timestep spacing {spacing!r}; allowed: {list(DIFFUSERS_SPACINGS)}")
    if style == "solver":  # DPM-Solver and UniPC
        if spacing == "linspace":
            return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        if spacing == "leading":
            return (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1].astype(np.int64) + steps_offset
        return np.arange(T, 0, -T / n).round().astype(np.int64) - 1
    dtype = np.float32 if style == "float" else np.int64
    if spacing == "linspace":
        if style == "float":
            return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
        return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(dtype) + steps_offset
    return (np.arange(T, 0, -T / n)).round().astype(dtype) - 1


def sgm_uniform(noise: NoiseSchedule, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas) of the "SGM Uniform" schedule: n + 1 timesteps evenly spaced from the last
    training timestep (sigma_max's) down to 0 (sigma_min's), the last one dropped, and each one's sigma
    interpolated in log sigma; the sampler then steps to sigma 0. The timesteps are fractional (999,
    749.25, 499.5, 249.75 for 4 steps of 1000) where diffusers' "trailing" rounds the same grid's
    T - k*T/n to integers (999, 749, 499, 249). The UNet runs at them as they are, as k-diffusion does
    unquantised (the web UI's default); ComfyUI rounds each to the nearest training step instead."""
    T = noise.num_train_timesteps
    t = np.linspace(T - 1, 0, n + 1)[:-1]
    return t, noise.sigma_at_log(t)


def lcm_timesteps(n: int, T: int = 1000, original_steps: int = 50) -> np.ndarray:
    """Latent consistency models' skipping-step schedule (Luo et al. 2023): n of the distillation
    grid's `original_steps` timesteps (19, 39, ..., 999 for 50), evenly spaced by index."""
    if n > original_steps:
        raise ConfigError(f"lcm takes at most {original_steps} steps (its distillation grid); got {n}")
    grid = (np.arange(1, original_steps + 1) * (T // original_steps) - 1)[::-1]
    return grid[np.floor(np.linspace(0, len(grid), num=n, endpoint=False)).astype(np.int64)]


@dataclass
class SamplingSchedule:
    """What a sampler walks: sigmas (n + 1, descending, the last 0 or not), the UNet timestep of
    each sigma the model is evaluated at, the scale of the initial noise, and the sampler's keyword
    options that the scheduler config decides (DDIM's clip_sample, LCM's timestep_scaling, ...).
    `sigma_space_output`: the result is the sigma-space latent at the last sigma, as diffusers' Euler
    family returns it, not the variance-preserving one (they differ when the last sigma is not 0).
    `flow`: the sigmas are a rectified flow's (diffusion/flow.py): x = (1 − σ)·x0 + σ·ε, not x0 + σ·ε."""

    sigmas: torch.Tensor
    timesteps: torch.Tensor
    init_noise_sigma: float
    options: dict = field(default_factory=dict)
    sigma_space_output: bool = False
    flow: bool = False

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        """x0 noised to `sigma`, in the space the sampler walks."""
        return (1 - sigma) * x0 + sigma * noise if self.flow else x0 + noise * sigma


# --- diffusers' scheduler families, as far as sigma lists and steps go ---------------------------
# Each takes the settings a scheduler class reads (diffusion/diffusers_schedulers.py), the training
# schedule and a step count, and returns (UNet timesteps, their sigmas, the sigma the last step goes to).


def _vp(cfg: dict, noise: NoiseSchedule, n: int):
    """DDIM, PNDM: integer timesteps. Each step goes to t - T//n (their prev_timestep): the next
    timestep of the list, except with "trailing" when n does not divide T (a divergence we do not
    copy: we step to the timestep evaluated next). The last step goes there too -- to ᾱ_0 when that
    lands on t = 0, as "trailing" can -- and below 0 to the final ᾱ: 1 with set_alpha_to_one, else ᾱ_0."""
    T, train = noise.num_train_timesteps, noise.sigmas.numpy()
    t = spaced_timesteps(cfg["timestep_spacing"], n, T, cfg["steps_offset"], style="int")
    prev = int(t[-1]) - T // n
    last = train[prev] if prev >= 0 else (0.0 if cfg["set_alpha_to_one"] else train[0])
    return t, train[t], float(last)


def _ddpm(cfg: dict, noise: NoiseSchedule, n: int):
    """DDPM: integer timesteps, each step to the next one of the list, the last to ᾱ = 1."""
    t = spaced_timesteps(cfg["timestep_spacing"], n, noise.num_train_timesteps, cfg["steps_offset"], style="int")
    return t, noise.sigmas.numpy()[t], 0.0


def sigma_conversion(cfg: dict) -> Callable | None:
    """Karras or exponential sigmas instead of the timesteps' own, when the settings ask."""
    kinds = {"use_karras_sigmas": karras_sigmas, "use_exponential_sigmas": exponential_sigmas}
    return next((fn for key, fn in kinds.items() if cfg.get(key)), None)


def _or(value, default):
    return default if value is None else value


def _ve(cfg: dict, noise: NoiseSchedule, n: int):
    """Euler, Euler ancestral, Heun: float timesteps, sigmas interpolated between training steps;
    Karras / exponential sigmas span those sigmas' own ends (so the spacing moves them) unless
    sigma_min / sigma_max are given, the UNet then runs at their fractional timesteps."""
    if cfg["timestep_spacing"] == SGM_UNIFORM:
        t, sigmas = sgm_uniform(noise, n)
    else:
        t = spaced_timesteps(cfg["timestep_spacing"], n, noise.num_train_timesteps, cfg["steps_offset"])
        sigmas = noise.sigma_at(t)
    convert = sigma_conversion(cfg)  # never with sgm_uniform: the registry refuses the two together
    if convert is not None:
        lo, hi = _or(cfg.get("sigma_min"), float(sigmas[-1])), _or(cfg.get("sigma_max"), float(sigmas[0]))
        sigmas = convert(lo, hi, n)
        t = noise.sigma_to_t(sigmas)
    if cfg.get("timestep_type") == "continuous" and cfg.get("prediction_type") == "v_prediction":
        t = edm_timesteps(sigmas)
    last = float(noise.sigmas[0]) if cfg.get("final_sigmas_type") == "sigma_min" else 0.0
    return t, sigmas, last


def edm_timesteps(sigmas) -> np.ndarray:
    """EDM's noise conditioning c_noise = ¼·ln σ (Karras et al. 2022, table 1), what SVD's UNet takes as its
    timestep; computed on float32 sigmas, as diffusers' continuous timesteps are."""
    return (0.25 * torch.as_tensor(np.asarray(sigmas, dtype=np.float32)).log()).numpy()


def _solver(cfg: dict, noise: NoiseSchedule, n: int, unipc: bool):
    """DPM-Solver, UniPC: n of n + 1 integer timesteps. Karras / exponential sigmas span the whole
    training range whatever the spacing; the UNet runs at integer timesteps: Karras' rounded (not
    DPM-Solver's under the cosine schedule), exponential's truncated, as diffusers casts them.
    UniPC's "sigma_min" final sigma is then the list's own last sigma (a step of length 0),
    DPM-Solver's the training sigma_min."""
    train = noise.sigmas.numpy()
    convert = sigma_conversion(cfg)
    if convert is None and cfg["timestep_spacing"] == SGM_UNIFORM:  # fractional timesteps, log-interpolated
        (t, sigmas), end = sgm_uniform(noise, n), float(train[0])
    elif convert is None:
        t = spaced_timesteps(cfg["timestep_spacing"], n, len(train), cfg["steps_offset"], style="solver")
        sigmas, end = train[t], float(train[0])
    else:
        lo, hi = _or(cfg.get("sigma_min"), float(train[0])), _or(cfg.get("sigma_max"), float(train[-1]))
        sigmas = convert(lo, hi, n)
        t = noise.sigma_to_t(sigmas)
        if convert is karras_sigmas and (unipc or cfg["beta_schedule"] != "squaredcos_cap_v2"):
            t = t.round()
        t = t.astype(np.int64)
        end = float(sigmas[-1]) if unipc else float(train[0])
    return t, sigmas, end if cfg["final_sigmas_type"] == "sigma_min" else 0.0


def _lcm(cfg: dict, noise: NoiseSchedule, n: int):
    t = lcm_timesteps(n, noise.num_train_timesteps, cfg["original_inference_steps"])
    return t, noise.sigmas.numpy()[t], 0.0


FAMILIES: dict[str, Callable] = {
    "vp": _vp,
    "ddpm": _ddpm,
    "ve": _ve,
    "dpm": partial(_solver, unipc=False),
    "unipc": partial(_solver, unipc=True),
    "lcm": _lcm,
}


def diffusers_schedule(
    family: str, cfg: dict, noise: NoiseSchedule, steps: int, exact_terminal: bool = False
) -> SamplingSchedule:
    """The sigma list a diffusers scheduler of `family` (FAMILIES) walks for `steps` steps under the
    settings `cfg`, with the UNet's timesteps and the initial noise scale; no sampler options.
    `exact_terminal`: the class keeps ᾱ_T = 0 under zero terminal SNR (a first sigma of inf)
    instead of clamping it to 2^-24."""
    t, sigmas, last = FAMILIES[family](cfg, noise, steps)
    sigmas = torch.tensor(np.append(np.asarray(sigmas, dtype=np.float32), np.float32(last)))
    if exact_terminal and noise.terminal_is_pure_noise and t[0] == noise.num_train_timesteps - 1:
        sigmas[0] = math.inf
    # Variance-preserving schedulers start from unit-variance noise: sqrt(sigma² + 1) in sigma
    # space. diffusers' Euler family starts at sigma_max instead -- except with "leading" spacing.
    s0 = float(sigmas[0])
    ve_start = family == "ve" and cfg["timestep_spacing"] != "leading"
    init = s0 if ve_start else (s0**2 + 1) ** 0.5  # inf: the sampler starts from the VP latent
    return SamplingSchedule(
        sigmas=sigmas,
        timesteps=torch.tensor(np.asarray(t, dtype=np.float64)),
        init_noise_sigma=init,
        sigma_space_output=family == "ve",
    )
