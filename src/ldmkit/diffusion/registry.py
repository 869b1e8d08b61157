"""The sampler table: each of our sampler names, the sigma list it walks, the exact diffusers
scheduler that computes the same thing (proven by tests/test_samplers.py), and the popular web UI's
name for the same algorithm. The web UI column is the same algorithm, not bit-identical images: its
sigma lists differ slightly (k-diffusion's discretisation, its own schedule types).

Which settings a sampler runs with: a model folder carries diffusers' scheduler/scheduler_config.json,
and diffusers' documented way to switch samplers is `<class>.from_config(pipe.scheduler.config)`, so
the folder's spacing, steps_offset, set_alpha_to_one, final sigma, Karras sigmas, clip_sample, ...
carry over to whichever sampler is picked. We do the same: `<diffusers_class>.from_config(folder
config, **identity)`, where `identity` is what makes the sampler what it is (DPM-Solver++ of order 2,
Karras sigmas for dpmpp_2m_karras, ...). A setting our samplers do not implement is refused by name,
never ignored. A single file carries no scheduler config: it gets `diffusers_config`, the settings
the popular web UI's sampler of the same name uses (SD's steps_offset 1, linspace for the Euler and
solver families, leading for DDIM/PLMS/DDPM)."""

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from ldmkit.diffusion import samplers
from ldmkit.diffusion.schedule import (
    SPACINGS,
    NoiseSchedule,
    SamplingSchedule,
    exponential_sigmas,
    karras_sigmas,
    lcm_timesteps,
    spaced_timesteps,
)
from ldmkit.errors import ConfigError

# How each family of diffusers schedulers turns a step count into sigmas (the README's names):
#   "vp-leading":  DDIM/PNDM with SD's config: integer timesteps T//n apart from 0, + steps_offset 1;
#                  the last step goes to ᾱ_0 (set_alpha_to_one=False) -- sigma ≈ 0.029, not 0.
#   "vp-leading-to-zero": DDPM, the same ending at ᾱ = 1 (sigma 0).
#   "ve-linspace": Euler family: n float timesteps linspace(999, 0), sigmas interpolated, then 0. Its
#                  initial noise is sigma_max (sqrt(sigma_max² + 1) with "leading" spacing: a trap).
#   "solver":      DPM-Solver / UniPC: n of n + 1 rounded linspace timesteps, then sigma 0.
#   "karras":      Karras sigmas between the training min and max; the UNet runs at their timesteps
#                  rounded to integers (diffusers' DPM-Solver does this), the sigmas stay exact.
#   "lcm":         the consistency model's skipping-step grid.
# A model folder's scheduler config can change any of these (see DIFFUSERS_CLASSES).
SCHEDULE_KINDS = ("vp-leading", "vp-leading-to-zero", "ve-linspace", "solver", "karras", "lcm")


# --- diffusers' scheduler classes, as far as sigma lists and steps go ----------------------------


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


def _sigma_spacing(cfg: dict) -> Callable | None:
    """Karras or exponential sigmas instead of the timesteps' own, when the config asks."""
    kinds = {"use_karras_sigmas": karras_sigmas, "use_exponential_sigmas": exponential_sigmas}
    return next((fn for key, fn in kinds.items() if cfg.get(key)), None)


def _or(value, default):
    return default if value is None else value


def _ve(cfg: dict, noise: NoiseSchedule, n: int):
    """Euler, Euler ancestral, Heun: float timesteps, sigmas interpolated between training steps;
    Karras / exponential sigmas span those sigmas' own ends (so the spacing moves them) unless
    sigma_min / sigma_max are given, the UNet then runs at their fractional timesteps."""
    t = spaced_timesteps(cfg["timestep_spacing"], n, noise.num_train_timesteps, cfg["steps_offset"])
    sigmas = noise.sigma_at(t)
    convert = _sigma_spacing(cfg)
    if convert is not None:
        lo, hi = _or(cfg.get("sigma_min"), float(sigmas[-1])), _or(cfg.get("sigma_max"), float(sigmas[0]))
        sigmas = convert(lo, hi, n)
        t = noise.sigma_to_t(sigmas)
    last = float(noise.sigmas[0]) if cfg.get("final_sigmas_type") == "sigma_min" else 0.0
    return t, sigmas, last


def _solver(cfg: dict, noise: NoiseSchedule, n: int, unipc: bool):
    """DPM-Solver, UniPC: n of n + 1 integer timesteps. Karras / exponential sigmas span the whole
    training range whatever the spacing; the UNet runs at integer timesteps: Karras' rounded (not
    DPM-Solver's under the cosine schedule), exponential's truncated, as diffusers casts them.
    UniPC's "sigma_min" final sigma is then the list's own last sigma (a step of length 0),
    DPM-Solver's the training sigma_min."""
    train = noise.sigmas.numpy()
    convert = _sigma_spacing(cfg)
    if convert is None:
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


@dataclass(frozen=True)
class SchedulerClass:
    """One diffusers scheduler class: its family of sigma lists (FAMILIES), the defaults of the config
    fields that decide its sigma list and steps (its __init__ in diffusers 0.42; a field it lacks is
    absent, as from_config drops it), the values our samplers implement where not every value is,
    and whether it keeps ᾱ_T = 0 under zero terminal SNR instead of clamping it to 2^-24."""

    family: str
    defaults: dict
    only: dict = field(default_factory=dict)
    exact_terminal: bool = False


_SPACED = {"steps_offset": 0}
_CLIP = {"clip_sample": True, "clip_sample_range": 1.0, "thresholding": False}
# Karras / exponential sigmas span [sigma_min, sigma_max] when the config gives them -- also in Heun
# and DPM-Solver, whose __init__ lacks them: from_config keeps a folder's unknown keys on the config,
# and their conversion looks these two up there.
_SIGMA_KINDS = {
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "sigma_min": None,
    "sigma_max": None,
}
_ZSNR = {"rescale_betas_zero_snr": False}
_FINAL = {"final_sigmas_type": "zero"}
_MULTISTEP = {"solver_order": 2, "thresholding": False, "lower_order_final": True, "use_flow_sigmas": False}
_NOT_IMPLEMENTED = {
    "thresholding": (False,),  # dynamic thresholding (Saharia et al. 2022)
    "use_beta_sigmas": (False,),  # beta sigmas (Lee et al. 2024) need scipy's beta quantiles
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
    "final_sigmas_type": ("zero", "sigma_min"),
}

DIFFUSERS_CLASSES: dict[str, SchedulerClass] = {
    "DDPMScheduler": SchedulerClass(
        "ddpm",
        {"timestep_spacing": "leading", **_SPACED, **_CLIP, "variance_type": "fixed_small", **_ZSNR},
        # fixed_small_log and None draw the same noise as fixed_small
        {**_NOT_IMPLEMENTED, "variance_type": (None, "fixed_small", "fixed_small_log")},
        exact_terminal=True,
    ),
    "DDIMScheduler": SchedulerClass(
        "vp",
        {"timestep_spacing": "leading", **_SPACED, "set_alpha_to_one": True, **_CLIP, **_ZSNR},
        {**_NOT_IMPLEMENTED, "timestep_spacing": ("leading", "trailing")},
        exact_terminal=True,
    ),
    "PNDMScheduler": SchedulerClass(
        "vp",
        {"timestep_spacing": "leading", **_SPACED, "set_alpha_to_one": False, "skip_prk_steps": False},
        {"timestep_spacing": ("leading", "trailing")},
    ),
    "EulerDiscreteScheduler": SchedulerClass(
        "ve",
        {
            "timestep_spacing": "linspace",
            **_SPACED,
            "interpolation_type": "linear",
            **_SIGMA_KINDS,
            "timestep_type": "discrete",
            **_ZSNR,
            **_FINAL,
        },
        # log_linear walks sigmas unrelated to its timesteps; continuous timesteps are EDM's
        {**_NOT_IMPLEMENTED, "interpolation_type": ("linear",), "timestep_type": ("discrete",)},
    ),
    "EulerAncestralDiscreteScheduler": SchedulerClass("ve", {"timestep_spacing": "linspace", **_SPACED, **_ZSNR}),
    "HeunDiscreteScheduler": SchedulerClass(
        "ve",
        {"timestep_spacing": "linspace", **_SPACED, **_SIGMA_KINDS, "clip_sample": False, "clip_sample_range": 1.0},
        _NOT_IMPLEMENTED,
    ),
    "DPMSolverMultistepScheduler": SchedulerClass(
        "dpm",
        {
            "timestep_spacing": "linspace",
            **_SPACED,
            "beta_schedule": "linear",  # Karras timesteps are not rounded under the cosine schedule
            **_MULTISTEP,
            "algorithm_type": "dpmsolver++",
            "solver_type": "midpoint",
            "euler_at_final": False,
            **_SIGMA_KINDS,
            "use_lu_lambdas": False,
            **_FINAL,
            "lambda_min_clipped": -math.inf,
            "variance_type": None,
            **_ZSNR,
            "use_dynamic_shifting": False,
        },
        {
            **_NOT_IMPLEMENTED,
            "use_lu_lambdas": (False,),
            "lambda_min_clipped": (-math.inf,),
            "variance_type": (None,),  # a learned variance: a UNet with twice the output channels
        },
    ),
    "UniPCMultistepScheduler": SchedulerClass(
        "unipc",
        {
            "timestep_spacing": "linspace",
            **_SPACED,
            **_MULTISTEP,
            "predict_x0": True,
            "solver_type": "bh2",
            "disable_corrector": [],
            **_SIGMA_KINDS,
            **_FINAL,
            **_ZSNR,
            "use_dynamic_shifting": False,
        },
        {**_NOT_IMPLEMENTED, "lower_order_final": (True,), "disable_corrector": ([],)},
    ),
    "LCMScheduler": SchedulerClass(
        "lcm",
        {
            "original_inference_steps": 50,
            "clip_sample": False,
            "clip_sample_range": 1.0,
            "thresholding": False,
            "timestep_scaling": 10.0,
            **_ZSNR,
        },
        _NOT_IMPLEMENTED,
        exact_terminal=True,
    ),
}


def _clip(cfg: dict, n: int) -> float | None:
    return cfg["clip_sample_range"] if cfg["clip_sample"] else None


def _dpm_lower_order_final(cfg: dict, n: int) -> bool:
    # DPMSolverMultistepScheduler.step: the last step is first order with euler_at_final, with a final
    # sigma of 0, or with lower_order_final below 15 steps.
    return cfg["euler_at_final"] or cfg["final_sigmas_type"] == "zero" or (cfg["lower_order_final"] and n < 15)


_WHY = {
    "timestep_spacing": "it steps to t - T//n, which with linspace is not the next timestep it evaluates",
    "rescale_betas_zero_snr": "its scheduler has no zero terminal SNR",
}

# Sampler keyword options a scheduler config decides: option -> (the field a class must have, value).
OPTIONS: dict[str, tuple[str, Callable]] = {
    "clip_sample_range": ("clip_sample", _clip),
    "timestep_scaling": ("timestep_scaling", lambda cfg, n: cfg["timestep_scaling"]),
    "lower_order_final": ("euler_at_final", _dpm_lower_order_final),  # DPM-Solver's rule, not UniPC's
}

# What a single file -- no scheduler config -- adds to the web UI settings: SD's own steps_offset,
# which a "leading" spacing override then uses.
SINGLE_FILE = {"steps_offset": 1}


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
    # The from_config overrides that make this sampler what it is, whatever the folder says.
    identity: dict = field(default_factory=dict)

    def scheduler_settings(self, scheduler_config: dict | None = None, spacing: str | None = None) -> dict:
        """The diffusers settings this sampler runs with. With a model folder's scheduler config:
        what `<diffusers_class>.from_config(scheduler_config, **identity)` reads -- the fields the
        class has, from the folder where it gives them, else the class's defaults. Without one
        (single files): `diffusers_config`, the popular web UI's choice. `spacing` wins over both."""
        cls = DIFFUSERS_CLASSES[self.diffusers_class]
        source = scheduler_config if scheduler_config else {**SINGLE_FILE, **self.diffusers_config}
        cfg = {key: source.get(key, default) for key, default in cls.defaults.items()}
        cfg.update({key: value for key, value in self.identity.items() if key in cls.defaults})
        if spacing is not None:
            cfg["timestep_spacing"] = spacing
        return cfg

    def build_schedule(
        self,
        noise: NoiseSchedule,
        steps: int,
        spacing: str | None = None,
        scheduler_config: dict | None = None,
    ) -> SamplingSchedule:
        """The sigma list for `steps` steps, with the UNet's timesteps, the initial noise scale and the
        sampler options the settings imply. `scheduler_config`: a model folder's diffusers scheduler
        config (ScheduleConfig.diffusers), read as diffusers' `<diffusers_class>.from_config(config,
        **identity)` does: the sigma list is the one that scheduler walks. None or empty (a single
        file): this sampler's `diffusers_config`, the popular web UI's settings for it -- a choice,
        since a file says nothing of its sampler. `spacing` (leading / trailing / linspace, the
        user's --timestep-spacing) overrides either's. Raises ConfigError naming the setting when
        the settings ask for something this sampler cannot do."""
        if steps <= 0:
            raise ConfigError(f"steps: {steps}; allowed: 1 or more")
        T = noise.num_train_timesteps
        if steps > T:
            raise ConfigError(f"steps: {steps}; allowed: at most {T}")
        cls = DIFFUSERS_CLASSES[self.diffusers_class]
        cfg = self.scheduler_settings(scheduler_config, spacing)
        self._refuse_what_we_cannot_do(cls, cfg, scheduler_config or {}, spacing)
        t, sigmas, last = FAMILIES[cls.family](cfg, noise, steps)
        sigmas = torch.tensor(np.append(np.asarray(sigmas, dtype=np.float32), np.float32(last)))
        if cls.exact_terminal and noise.terminal_is_pure_noise and t[0] == T - 1:
            sigmas[0] = math.inf
        # Variance-preserving schedulers start from unit-variance noise: sqrt(sigma² + 1) in sigma
        # space. diffusers' Euler family starts at sigma_max instead -- except with "leading" spacing.
        s0 = float(sigmas[0])
        ve_start = cls.family == "ve" and cfg["timestep_spacing"] != "leading"
        init = s0 if ve_start else (s0**2 + 1) ** 0.5  # inf: the sampler starts from the VP latent
        options = {name: value(cfg, len(t)) for name, (needs, value) in OPTIONS.items() if needs in cfg}
        return SamplingSchedule(
            sigmas=sigmas,
            timesteps=torch.tensor(np.asarray(t, dtype=np.float64)),
            init_noise_sigma=init,
            options=options,
            sigma_space_output=cls.family == "ve",
        )

    def _refuse_what_we_cannot_do(self, cls: SchedulerClass, cfg: dict, folder: dict, spacing: str | None) -> None:
        where = f"with {self.name} ({self.diffusers_class})"
        if spacing is not None:
            # Karras / exponential sigmas of the multistep solvers, and LCM's grid, ignore any spacing.
            spaced = "timestep_spacing" in cfg and not (cls.family in ("dpm", "unipc") and _sigma_spacing(cfg))
            allowed = cls.only.get("timestep_spacing", SPACINGS) if spaced else ()
            if spacing not in allowed:
                if not spaced:
                    why = " (its sigmas do not depend on a spacing)"
                else:
                    why = f" ({_WHY['timestep_spacing']})" if spacing in SPACINGS else ""
                raise ConfigError(f"timestep spacing {spacing!r} {where}; allowed: {', '.join(allowed) or 'none'}{why}")
        for key, allowed in cls.only.items():
            if key in cfg and cfg[key] not in allowed:
                raise ConfigError(
                    f"scheduler config {key}: {cfg[key]!r} {where}; allowed: {', '.join(map(repr, allowed))}"
                    f" ({_WHY.get(key, 'the others are not implemented')})"
                )
        if folder.get("rescale_betas_zero_snr") and "rescale_betas_zero_snr" not in cls.defaults:
            # The model was trained to zero terminal SNR, which this scheduler cannot express.
            takes = [s.name for s in SAMPLERS.values() if "rescale_betas_zero_snr" in _defaults(s)]
            raise ConfigError(
                f"scheduler config rescale_betas_zero_snr: True {where}; allowed: one of {', '.join(takes)}"
                f" ({_WHY['rescale_betas_zero_snr']})"
            )


def _defaults(spec: SamplerSpec) -> dict:
    return DIFFUSERS_CLASSES[spec.diffusers_class].defaults


_SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False}
_LEADING = {"timestep_spacing": "leading", "steps_offset": 1}
# DPM-Solver++(2M): sample_dpmpp_2m's update is the midpoint form of the second-order step.
_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint"}
# Karras sigmas, and no other kind of sigma list (diffusers refuses two at once; LU lambdas yield to Karras).
_KARRAS = {
    "use_karras_sigmas": True,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
}

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
        ),
        SamplerSpec(
            "ddim",
            samplers.sample_ddim,
            "vp-leading",
            "DDIMScheduler",
            {**_SD, **_LEADING, "set_alpha_to_one": False},
            "DDIM",
            "Automatic",
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
            identity={"skip_prk_steps": True},  # PLMS is PNDM without its Runge-Kutta warm-up
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
            identity=_DPMPP_2M,
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
            identity={**_DPMPP_2M, **_KARRAS},
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
            identity={"solver_type": "bh2", "solver_order": 2, "predict_x0": True},
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
