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

from collections.abc import Callable
from dataclasses import dataclass, field

from ldmkit.diffusion import samplers
from ldmkit.diffusion.diffusers_schedulers import DIFFUSERS_CLASSES, SchedulerClass, sampler_options
from ldmkit.diffusion.schedule import (
    DIFFUSERS_SPACINGS,
    SGM_UNIFORM,
    SPACINGS,
    NoiseSchedule,
    SamplingSchedule,
    diffusers_schedule,
    sigma_conversion,
)
from ldmkit.errors import ConfigError

# How each family of diffusers schedulers turns a step count into sigmas (docs/samplers.md's names):
#   "vp-leading":  DDIM/PNDM with SD's config: integer timesteps T//n apart from 0, + steps_offset 1;
#                  the last step goes to ᾱ_0 (set_alpha_to_one=False) -- sigma ≈ 0.029, not 0.
#   "vp-leading-to-zero": DDPM, the same ending at ᾱ = 1 (sigma 0).
#   "ve-linspace": Euler family: n float timesteps linspace(999, 0), sigmas interpolated, then 0. Its
#                  initial noise is sigma_max (sqrt(sigma_max² + 1) with "leading" spacing: a trap).
#   "solver":      DPM-Solver / UniPC: n of n + 1 rounded linspace timesteps, then sigma 0.
#   "karras":      Karras sigmas between the training min and max; the UNet runs at their timesteps
#                  rounded to integers (diffusers' DPM-Solver does this), the sigmas stay exact.
#   "lcm":         the consistency model's skipping-step grid.
# A model folder's scheduler config can change any of these (see diffusers_schedulers.py), and so can a
# timestep spacing given with the run -- "sgm_uniform" (the web UI's SGM Uniform) only for the families
# in SGM_FAMILIES, whose samplers walk any sigma list at fractional timesteps.
SCHEDULE_KINDS = ("vp-leading", "vp-leading-to-zero", "ve-linspace", "solver", "karras", "lcm")
SGM_FAMILIES = ("ve", "dpm", "unipc")
# Timestep spacings the popular web UI offers as schedule types: spacing -> the label its infotexts
# write; its API also takes the name (sgm_uniform) and an alias (SGMUniform).
SPACING_SCHEDULE_TYPES = {SGM_UNIFORM: "SGM Uniform"}


_WHY = {
    "timestep_spacing": "it steps to t - T//n, which with linspace is not the next timestep it evaluates",
    SGM_UNIFORM: "a sigma list at fractional timesteps, for the samplers that walk sigmas",
    "rescale_betas_zero_snr": "its scheduler has no zero terminal SNR",
}

# What a single file -- no scheduler config -- adds to the web UI settings: SD's own steps_offset,
# which a "leading" spacing override then uses.
SINGLE_FILE = {"steps_offset": 1}


@dataclass(frozen=True)
class SamplerSpec:
    """One row of the table: our name, the sampler function (samplers.py), the kind of sigma list
    (SCHEDULE_KINDS), the diffusers scheduler class that computes the same (DIFFUSERS_CLASSES) with
    the settings a single file runs it with, and the web UI's sampler and schedule type."""

    name: str
    fn: Callable
    schedule: str
    diffusers_class: str
    diffusers_config: dict
    webui_name: str
    webui_schedule: str
    # The from_config overrides that make this sampler what it is, whatever the folder says.
    identity: dict = field(default_factory=dict)

    def scheduler_settings(self, scheduler_config: dict | None = None, spacing: str | None = None) -> dict:
        """The diffusers settings this sampler runs with. With a model folder's scheduler config:
        what `<diffusers_class>.from_config(scheduler_config, **identity)` reads -- the fields the
        class has, from the folder where it gives them, else the class's defaults. Without one
        (single files): `diffusers_config`, the popular web UI's choice. `spacing` wins over both."""
        source = scheduler_config if scheduler_config else {**SINGLE_FILE, **self.diffusers_config}
        cfg = DIFFUSERS_CLASSES[self.diffusers_class].settings(source, self.identity)
        if spacing is not None:
            cfg["timestep_spacing"] = spacing
        return cfg

    def schedule_type(self, scheduler_config: dict | None = None, spacing: str | None = None) -> str:
        """The web UI's schedule type of the sigmas this sampler walks with these settings: a folder's
        scheduler config can turn on Karras or exponential sigmas for samplers that are uniform otherwise."""
        settings = self.scheduler_settings(scheduler_config, spacing)
        if settings.get("use_karras_sigmas"):
            return "Karras"
        if settings.get("use_exponential_sigmas"):
            return "Exponential"
        return SPACING_SCHEDULE_TYPES.get(settings.get("timestep_spacing"), self.webui_schedule)  # SGM Uniform

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
        schedule = diffusers_schedule(cls.family, cfg, noise, steps, cls.exact_terminal)
        schedule.options = sampler_options(cfg, len(schedule.timesteps))
        return schedule

    def _refuse_what_we_cannot_do(self, cls: SchedulerClass, cfg: dict, folder: dict, spacing: str | None) -> None:
        where = f"with {self.name} ({self.diffusers_class})"
        if spacing is not None:
            # Karras / exponential sigmas of the multistep solvers, and LCM's grid, ignore any spacing.
            spaced = "timestep_spacing" in cls.defaults and not (
                cls.family in ("dpm", "unipc") and sigma_conversion(cfg)
            )
            allowed = cls.only.get("timestep_spacing", SPACINGS) if spaced else ()
            allowed = tuple(a for a in allowed if a != SGM_UNIFORM or cls.family in SGM_FAMILIES)
            if spacing not in allowed:
                if not spaced:
                    why = " (its sigmas do not depend on a spacing)"
                else:
                    why = f" ({_WHY.get(spacing, _WHY['timestep_spacing'])})" if spacing in SPACINGS else ""
                raise ConfigError(f"timestep spacing {spacing!r} {where}; allowed: {', '.join(allowed) or 'none'}{why}")
            converted = [key for key in ("use_karras_sigmas", "use_exponential_sigmas") if cfg.get(key)]
            if spacing == SGM_UNIFORM and converted:
                # the folder's Karras / exponential sigmas would replace sgm_uniform's, and the image's
                # "Schedule type" would then name neither truthfully
                raise ConfigError(
                    f"timestep spacing 'sgm_uniform' {where} and scheduler config {converted[0]}: True; allowed: "
                    f"{', '.join(DIFFUSERS_SPACINGS)} (sgm_uniform is a sigma list of its own)"
                )
        elif cfg.get("timestep_spacing", DIFFUSERS_SPACINGS[0]) not in DIFFUSERS_SPACINGS:
            # diffusers takes no other value from a folder; sgm_uniform is ldmkit's, given with the run
            raise ConfigError(
                f"scheduler config timestep_spacing: {cfg['timestep_spacing']!r} {where}; allowed: "
                f"{', '.join(map(repr, DIFFUSERS_SPACINGS))} (diffusers' values)"
            )
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


def _family(spec: SamplerSpec) -> str:
    return DIFFUSERS_CLASSES[spec.diffusers_class].family


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
        ),
    ]
}


def get_sampler(name: str) -> SamplerSpec:
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


# The web UI's "Automatic" schedule type means each sampler's own default; for DPM++ 2M that is Karras.
WEBUI_AUTOMATIC = {"DPM++ 2M": "Karras"}


def webui_spacing(schedule: str | None) -> str | None:
    """The timestep spacing a web UI schedule type is here ("SGM Uniform", "sgm_uniform", "SGMUniform":
    sgm_uniform), or None for the schedule types that pick a sampler row (from_webui)."""
    text = (schedule or "").strip().lower()
    for spacing, label in SPACING_SCHEDULE_TYPES.items():
        if text in (spacing, label.lower(), label.lower().replace(" ", "")):
            return spacing
    return None


def from_webui(name: str, schedule: str | None = None) -> str:
    """Our sampler for a web UI sampler display name ("DPM++ 2M Karras", or "DPM++ 2M" with
    schedule "karras"), case-insensitive as its API is. A schedule type that is a timestep spacing
    here (webui_spacing: SGM Uniform) picks the sampler's uniform row, whose sigma list it replaces;
    the caller sets the spacing."""
    schedule = (schedule or "automatic").strip().lower()
    if name.endswith(" Karras"):
        name, schedule = name[: -len(" Karras")], "karras"
    matches = [s for s in SAMPLERS.values() if s.webui_name.lower() == name.strip().lower()]
    if not matches:
        allowed = sorted({s.webui_name for s in SAMPLERS.values()})
        raise ConfigError(f"sampler {name!r} has no ldmkit equivalent; allowed: {', '.join(allowed)}")
    # The web UI offers its schedule types with the k-diffusion samplers, our rows it calls "Uniform".
    uniform = [s for s in matches if s.webui_schedule == "Uniform" and _family(s) in SGM_FAMILIES]
    allowed = sorted({s.webui_schedule for s in matches} | {"Automatic"})
    allowed += list(SPACING_SCHEDULE_TYPES.values()) if uniform else []
    spacing = webui_spacing(schedule)
    if spacing is not None:
        if not uniform:
            label = SPACING_SCHEDULE_TYPES[spacing]
            raise ConfigError(f"schedule type {label!r} with {matches[0].webui_name}; allowed: {', '.join(allowed)}")
        return uniform[0].name
    if schedule == "automatic":
        schedule = WEBUI_AUTOMATIC.get(matches[0].webui_name, "automatic").lower()
    exact = [s for s in matches if s.webui_schedule.lower() == schedule]
    if not exact and schedule not in ("automatic", "uniform"):
        raise ConfigError(f"schedule type {schedule!r} with {matches[0].webui_name}; allowed: {', '.join(allowed)}")
    return (exact or matches)[0].name


def markdown_table() -> str:
    """The sampler table as docs/samplers.md shows it (`python -m ldmkit.diffusion.registry`)."""
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
