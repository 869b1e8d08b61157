"""diffusers' scheduler classes, as far as sigma lists and steps go: which family of sigma lists each
computes (schedule.FAMILIES), the config fields that decide its list and steps with their defaults,
the values of them our samplers implement, and the sampler options those settings decide.

The defaults are each class's __init__ in diffusers 0.42 (tests/test_samplers.py checks them there);
a field a class lacks is absent, as from_config drops it."""

import math
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SchedulerClass:
    """One diffusers scheduler class: its family of sigma lists, the defaults of the config fields
    that decide its sigma list and steps, the values our samplers implement where not every value
    is, and whether it keeps ᾱ_T = 0 under zero terminal SNR instead of clamping it to 2^-24."""

    family: str
    defaults: dict
    only: dict = field(default_factory=dict)
    exact_terminal: bool = False

    def settings(self, config: dict, overrides: dict) -> dict:
        """What `<class>.from_config(config, **overrides)` reads: the fields the class has, from
        `overrides`, else `config`, else the class's defaults."""
        settings = {key: config.get(key, default) for key, default in self.defaults.items()}
        settings.update({key: value for key, value in overrides.items() if key in self.defaults})
        return settings


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
            "prediction_type": "epsilon",  # with "continuous", v-prediction means EDM's timesteps (SVD)
            **_ZSNR,
            **_FINAL,
        },
        # log_linear walks sigmas unrelated to its timesteps
        {**_NOT_IMPLEMENTED, "interpolation_type": ("linear",)},
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


# Sampler keyword options a scheduler config decides: option -> (the field a class must have, value).
OPTIONS: dict[str, tuple[str, Callable]] = {
    "clip_sample_range": ("clip_sample", _clip),
    "timestep_scaling": ("timestep_scaling", lambda cfg, n: cfg["timestep_scaling"]),
    "lower_order_final": ("euler_at_final", _dpm_lower_order_final),  # DPM-Solver's rule, not UniPC's
}


def sampler_options(settings: dict, steps: int) -> dict:
    """The sampler keyword options (OPTIONS) a class's settings decide for a run of `steps` steps."""
    return {name: value(settings, steps) for name, (needs, value) in OPTIONS.items() if needs in settings}
