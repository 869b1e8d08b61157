"""The sampler table: each of our sampler names, the sigma list it walks, the exact diffusers
scheduler that computes the same thing (proven by tests/test_samplers.py), and the popular web UI's
name for the same algorithm. The web UI column is the same algorithm, not bit-identical images: its
sigma lists differ slightly (k-diffusion's discretisation, its own schedule types)."""

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ldmkit.diffusion import samplers
from ldmkit.diffusion.schedule import (
    SPACINGS,
    NoiseSchedule,
    SamplingSchedule,
    karras_sigmas,
    lcm_timesteps,
    spaced_timesteps,
)
from ldmkit.errors import ConfigError

# How each family of diffusers schedulers turns a step count into sigmas:
#   "vp-leading":  DDIM/PNDM/DDPM with SD's config: integer timesteps T//n apart from 0, + steps_offset 1;
#                  the last step goes to ᾱ_0 (set_alpha_to_one=False) -- sigma ≈ 0.029, not 0 -- or,
#                  for DDPM, to ᾱ = 1 (sigma 0).
#   "ve-linspace": Euler family: n float timesteps linspace(999, 0), sigmas interpolated, then 0. Its
#                  initial noise is sigma_max (sqrt(sigma_max² + 1) with "leading" spacing: a trap).
#   "solver":      DPM-Solver / UniPC: n of n + 1 rounded linspace timesteps, then sigma 0.
#   "karras":      Karras sigmas between the training min and max; the UNet runs at their timesteps
#                  rounded to integers (diffusers' DPM-Solver does this), the sigmas stay exact.
#   "lcm":         the consistency model's skipping-step grid.
SCHEDULE_KINDS = ("vp-leading", "vp-leading-to-zero", "ve-linspace", "solver", "karras", "lcm")


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    fn: Callable
    schedule: str
    diffusers_class: str
    diffusers_config: dict
    webui_name: str
    webui_schedule: str
    ancestral: bool = False
    options: dict = field(default_factory=dict)
    # Starts from ᾱ = 0 exactly (sigma = inf) under zero terminal SNR, as diffusers' DDIM/DDPM do.
    exact_terminal: bool = False

    def build_schedule(self, noise: NoiseSchedule, steps: int, spacing: str | None = None) -> SamplingSchedule:
        """The sigma list for `steps` steps. `spacing` overrides the sampler's timestep spacing
        (leading / trailing / linspace, as in a diffusers scheduler config)."""
        if steps <= 0:
            raise ConfigError(f"steps: {steps}; allowed: 1 or more")
        T = noise.num_train_timesteps
        if steps > T:
            raise ConfigError(f"steps: {steps}; allowed: at most {T}")
        train = noise.sigmas.numpy()
        kind = self.schedule
        allowed = {
            "vp-leading": ("leading", "trailing"),
            "vp-leading-to-zero": ("leading", "trailing"),
            "ve-linspace": SPACINGS,
            "solver": SPACINGS,
        }.get(kind, ())
        if spacing is not None and spacing not in allowed:
            # diffusers' DDIM/PNDM/DDPM step to t - T//n whatever the spacing, which with "linspace"
            # is not the next timestep they evaluate: no sigma list describes that.
            raise ConfigError(f"timestep spacing {spacing!r} with {self.name}; allowed: {list(allowed) or 'none'}")
        if kind in ("vp-leading", "vp-leading-to-zero"):
            t = spaced_timesteps(spacing or "leading", steps, T, steps_offset=1)
            sigmas = train[t.astype(np.int64)]
            if self.exact_terminal and noise.terminal_is_pure_noise and t[0] == T - 1:
                sigmas[0] = np.inf
            last = train[0] if kind == "vp-leading" else 0.0
        elif kind == "ve-linspace":
            t = spaced_timesteps(spacing or "linspace", steps, T, steps_offset=1)
            sigmas = noise.sigma_at(t)
            last = 0.0
        elif kind == "solver":
            t = spaced_timesteps(spacing or "linspace", steps, T, steps_offset=1, style="solver")
            sigmas = train[t]
            last = 0.0
        elif kind == "karras":
            sigmas = karras_sigmas(float(train[0]), float(train[-1]), steps)
            t = noise.sigma_to_t(sigmas).round()
            last = 0.0
        elif kind == "lcm":
            t = lcm_timesteps(steps, T)
            sigmas = train[t]
            last = 0.0
        else:
            raise ConfigError(f"unknown schedule kind {kind!r}")
        sigmas = torch.tensor(np.append(np.asarray(sigmas, dtype=np.float32), np.float32(last)))
        # Variance-preserving schedulers start from unit-variance noise: sqrt(sigma² + 1) in sigma
        # space. diffusers' Euler family starts at sigma_max instead -- except with "leading" spacing.
        s0 = float(sigmas[0])
        ve_start = kind == "ve-linspace" and (spacing or "linspace") != "leading"
        init = s0 if ve_start else (s0**2 + 1) ** 0.5  # inf: the sampler starts from the VP latent
        return SamplingSchedule(
            sigmas=sigmas, timesteps=torch.tensor(np.asarray(t, dtype=np.float64)), init_noise_sigma=init
        )


_SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False}
_LEADING = {"timestep_spacing": "leading", "steps_offset": 1}

SAMPLERS: dict[str, SamplerSpec] = {
    s.name: s
    for s in [
        SamplerSpec(
            "ddpm",
            samplers.sample_euler_ancestral,
            "vp-leading-to-zero",
            "DDPMScheduler",
            {**_SD, **_LEADING, "variance_type": "fixed_small"},
            "DDPM",
            "Automatic",
            ancestral=True,
            exact_terminal=True,
        ),
        SamplerSpec(
            "ddim",
            samplers.sample_ddim,
            "vp-leading",
            "DDIMScheduler",
            {**_SD, **_LEADING, "set_alpha_to_one": False},
            "DDIM",
            "Automatic",
            exact_terminal=True,
        ),
        SamplerSpec(
            "plms",
            samplers.sample_plms,
            "vp-leading",
            "PNDMScheduler",
            {
                **{k: v for k, v in _SD.items() if k != "clip_sample"},
                **_LEADING,
                "skip_prk_steps": True,
                "set_alpha_to_one": False,
            },
            "PLMS",
            "Automatic",
        ),
        SamplerSpec(
            "euler",
            samplers.sample_euler,
            "ve-linspace",
            "EulerDiscreteScheduler",
            {**{k: v for k, v in _SD.items() if k != "clip_sample"}, "timestep_spacing": "linspace"},
            "Euler",
            "Uniform",
        ),
        SamplerSpec(
            "euler_a",
            samplers.sample_euler_ancestral,
            "ve-linspace",
            "EulerAncestralDiscreteScheduler",
            {**{k: v for k, v in _SD.items() if k != "clip_sample"}, "timestep_spacing": "linspace"},
            "Euler a",
            "Uniform",
            ancestral=True,
        ),
        SamplerSpec(
            "heun",
            samplers.sample_heun,
            "ve-linspace",
            "HeunDiscreteScheduler",
            {**{k: v for k, v in _SD.items() if k != "clip_sample"}, "timestep_spacing": "linspace"},
            "Heun",
            "Uniform",
        ),
        SamplerSpec(
            "dpmpp_2m",
            samplers.sample_dpmpp_2m,
            "solver",
            "DPMSolverMultistepScheduler",
            {
                **{k: v for k, v in _SD.items() if k != "clip_sample"},
                "timestep_spacing": "linspace",
                "algorithm_type": "dpmsolver++",
                "solver_order": 2,
                "final_sigmas_type": "zero",
            },
            "DPM++ 2M",
            "Uniform",
        ),
        SamplerSpec(
            "dpmpp_2m_karras",
            samplers.sample_dpmpp_2m,
            "karras",
            "DPMSolverMultistepScheduler",
            {
                **{k: v for k, v in _SD.items() if k != "clip_sample"},
                "algorithm_type": "dpmsolver++",
                "solver_order": 2,
                "use_karras_sigmas": True,
                "final_sigmas_type": "zero",
            },
            "DPM++ 2M",
            "Karras",
        ),
        SamplerSpec(
            "unipc",
            samplers.sample_unipc,
            "solver",
            "UniPCMultistepScheduler",
            {
                **{k: v for k, v in _SD.items() if k != "clip_sample"},
                "timestep_spacing": "linspace",
                "solver_type": "bh2",
                "solver_order": 2,
                "predict_x0": True,
                "final_sigmas_type": "zero",
            },
            "UniPC",
            "Automatic",
        ),
        SamplerSpec(
            "lcm",
            samplers.sample_lcm,
            "lcm",
            "LCMScheduler",
            {**_SD, "original_inference_steps": 50, "timestep_scaling": 10.0, "set_alpha_to_one": True},
            "LCM",
            "Automatic",
            ancestral=True,
        ),
    ]
}


def get_sampler(name: str) -> SamplerSpec:
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


# The web UI's "Automatic" schedule type means each sampler's own default; for DPM++ 2M that is Karras.
WEBUI_AUTOMATIC = {"DPM++ 2M": "Karras"}


def from_webui(name: str, schedule: str | None = None) -> str:
    """Our sampler for a web UI sampler display name ("DPM++ 2M Karras", or "DPM++ 2M" with
    schedule "karras"), case-insensitive as its API is."""
    schedule = (schedule or "automatic").strip().lower()
    if name.endswith(" Karras"):
        name, schedule = name[: -len(" Karras")], "karras"
    matches = [s for s in SAMPLERS.values() if s.webui_name.lower() == name.strip().lower()]
    if not matches:
        allowed = sorted({s.webui_name for s in SAMPLERS.values()})
        raise ConfigError(f"sampler {name!r} has no ldmkit equivalent; allowed: {', '.join(allowed)}")
    if schedule == "automatic":
        schedule = WEBUI_AUTOMATIC.get(matches[0].webui_name, "automatic").lower()
    exact = [s for s in matches if s.webui_schedule.lower() == schedule]
    if not exact and schedule not in ("automatic", "uniform"):
        allowed = sorted({s.webui_schedule for s in matches} | {"Automatic"})
        raise ConfigError(f"schedule type {schedule!r} with {matches[0].webui_name}; allowed: {', '.join(allowed)}")
    return (exact or matches)[0].name


def markdown_table() -> str:
    """The sampler table as README shows it (`python -m ldmkit.diffusion.registry`)."""
    rows = [
        "| ldmkit | sigma list | diffusers scheduler (settings) | web UI sampler | web UI schedule type |",
        "|---|---|---|---|---|",
    ]
    for s in SAMPLERS.values():
        settings = ", ".join(f"{k}={v}" for k, v in s.diffusers_config.items() if k not in _SD)
        rows.append(
            f"| `{s.name}` | {s.schedule} | `{s.diffusers_class}` ({settings}) | {s.webui_name} | {s.webui_schedule} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
