"""The "SGM Uniform" schedule (`--timestep-spacing sgm_uniform`): the sigma list ComfyUI's sgm_uniform
scheduler and the popular web UI's SGM Uniform schedule type compute -- timesteps linspace(T - 1, 0, n + 1)
without the last, each one's sigma interpolated in log sigma between training steps (k-diffusion's
DiscreteSchedule.t_to_sigma), then 0 -- checked against that definition computed here, on SD's schedule
and on schedules drawn at random; a whole Euler run equal to diffusers' EulerDiscreteScheduler handed the
same sigmas; the samplers it cannot apply to refusing it by name; and the web UI's name for it through
the infotext, the HTTP API's mapping and the command line."""

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_pipeline
from ldmkit.cli import main
from ldmkit.diffusion.registry import SAMPLERS, from_webui, get_sampler, webui_spacing
from ldmkit.diffusion.sampling import generators_for
from ldmkit.diffusion.schedule import NoiseSchedule
from ldmkit.errors import ConfigError
from ldmkit.models.ldm import ScheduleConfig
from ldmkit.pipelines import Pipeline
from ldmkit.pipelines.params import from_infotext

WALKS_SIGMAS = ("euler", "euler_a", "heun", "dpmpp_2m", "unipc")
STEPS = (1, 2, 3, 4, 7, 20, 50)


def definition(train_sigmas: np.ndarray, n: int) -> tuple[list[float], list[float]]:
    """(timesteps, sigmas + final 0) by the definition, in float64, one timestep at a time."""
    T = len(train_sigmas)
    log = np.log(train_sigmas.astype(np.float64))
    ts = [(T - 1) - k * (T - 1) / n for k in range(n)]  # n + 1 evenly spaced points, the last (0) dropped
    sigmas = []
    for t in ts:
        lo, hi, w = math.floor(t), math.ceil(t), t - math.floor(t)
        sigmas.append(math.exp((1 - w) * log[lo] + w * log[hi]))
    return ts, sigmas + [0.0]


def drawn_schedule(seed: int) -> ScheduleConfig:
    """A training schedule drawn at random: its kind, ends and length."""
    r = random.Random(seed)
    return ScheduleConfig(
        num_train_timesteps=r.choice([500, 1000, 1500]),
        beta_schedule=r.choice(["linear", "scaled_linear", "squaredcos_cap_v2"]),
        beta_start=r.uniform(5e-5, 2e-3),
        beta_end=r.uniform(0.005, 0.03),
    )


SCHEDULES = [("sd", ScheduleConfig())] + [(f"drawn-{s}", drawn_schedule(s)) for s in range(4)]


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name,config", SCHEDULES, ids=[n for n, _ in SCHEDULES])
def test_the_sigma_list_is_the_definition(name, config, steps):
    noise = NoiseSchedule.from_config(config)
    want_t, want_sigmas = definition(noise.sigmas.numpy(), steps)
    for sampler in WALKS_SIGMAS:
        walk = get_sampler(sampler).build_schedule(noise, steps, "sgm_uniform")
        where = f"{name} ({config}), {steps} steps, {sampler}"
        assert walk.timesteps.tolist() == pytest.approx(want_t, abs=1e-9), where  # the UNet runs at these
        assert walk.sigmas.tolist() == pytest.approx(want_sigmas, rel=1e-6, abs=0), where
        # The initial noise follows the sampler's family: the Euler family's sigma_max (the web UI's
        # k-diffusion scales by sigma_max too), the multistep solvers' unit-variance latent.
        s0 = want_sigmas[0]
        init = s0 if sampler in ("euler", "euler_a", "heun") else math.sqrt(s0**2 + 1)
        assert walk.init_noise_sigma == pytest.approx(init, rel=1e-6), where


def test_it_is_not_diffusers_trailing():
    """The same grid of timesteps, fractional here, rounded to integers by diffusers' "trailing": equal at
    1 step, then 0.17 % apart in sigma at 2 steps, 0.28 % at 4 (docs/samplers.md's table)."""
    noise = NoiseSchedule.from_config(ScheduleConfig())
    euler = get_sampler("euler")
    gaps = {}
    for n in (1, 2, 4, 20):
        sgm, trailing = euler.build_schedule(noise, n, "sgm_uniform"), euler.build_schedule(noise, n, "trailing")
        gaps[n] = float(((sgm.sigmas[:-1] - trailing.sigmas[:-1]).abs() / trailing.sigmas[:-1]).max())
    assert gaps[1] == 0
    assert gaps[2] == pytest.approx(0.00167, abs=5e-5) and gaps[4] == pytest.approx(0.00281, abs=5e-5)
    assert gaps[20] == pytest.approx(0.01098, abs=5e-5)
    assert get_sampler("euler").build_schedule(noise, 4, "sgm_uniform").timesteps.tolist() == [
        999,
        749.25,
        499.5,
        249.75,
    ]


@pytest.mark.parametrize("steps", [2, 4])
def test_a_whole_euler_run_equals_diffusers_given_the_same_sigmas(tmp_path, steps):
    """diffusers has no sgm_uniform, but its EulerDiscreteScheduler walks any sigma list it is handed
    (the UNet at the timesteps it maps them back to, in log sigma): handed the definition's, it draws
    what ldmkit draws. Its spacing is "trailing" here, so that it starts from sigma_max noise as ldmkit's
    sgm_uniform does ("leading" would start from sqrt(sigma_max² + 1))."""
    from diffusers import EulerDiscreteScheduler

    pipe = tiny_pipeline(tmp_path / "sd")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    ours = Pipeline.load(tmp_path / "sd", precision="fp32")
    noise = NoiseSchedule.from_config(ours.model.config.schedule, ours.model.alphas_cumprod)
    _, sigmas = definition(noise.sigmas.numpy(), steps)
    kw = dict(prompt_mode="truncate", width=32, height=32, seed=4)
    got = ours("a red circle", steps=steps, cfg=4.0, sampler="euler", timestep_spacing="sgm_uniform", **kw)
    want = pipe(
        "a red circle", sigmas=sigmas, guidance_scale=4.0, width=32, height=32, generator=generators_for(4, 1)
    ).images[0]
    want_latents = pipe(
        "a red circle",
        sigmas=sigmas,
        guidance_scale=4.0,
        width=32,
        height=32,
        generator=generators_for(4, 1),
        output_type="latent",
    ).images
    assert want_latents.abs().mean() > 0.1
    gap = float((got.latents - want_latents).abs().max())
    assert gap <= 1e-3, f"{steps} steps: final latents differ by {gap:.2e}"  # test_samplers.py's bar
    diff = np.abs(np.asarray(got.images[0], dtype=np.float64) - np.asarray(want, dtype=np.float64)).mean()
    assert diff <= 1.0, f"{steps} steps: {diff:.2f}/255"
    trailing = ours("a red circle", steps=steps, cfg=4.0, sampler="euler", timestep_spacing="trailing", **kw)
    assert (trailing.latents - got.latents).abs().max() > 10 * 1e-3, "sgm_uniform and trailing: the same run"


@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if s not in WALKS_SIGMAS])
def test_samplers_it_cannot_apply_to_refuse_it_by_name(sampler):
    """DDIM, PLMS and DDPM step on integer timesteps, LCM on its distillation grid, DPM++ 2M Karras walks
    Karras sigmas: each refuses sgm_uniform in one line naming it and what it allows."""
    noise = NoiseSchedule.from_config(ScheduleConfig())
    with pytest.raises(ConfigError, match=f"^timestep spacing 'sgm_uniform' with {sampler} .*; allowed: ") as e:
        get_sampler(sampler).build_schedule(noise, 4, "sgm_uniform")
    assert "\n" not in str(e.value) and "sgm_uniform" not in str(e.value).split("allowed: ")[1].split(" (")[0]


def test_a_folder_config_cannot_say_it_nor_turn_on_other_sigmas_with_it():
    """A diffusers folder's timestep_spacing takes diffusers' values only (diffusers refuses others too);
    and a folder's Karras or exponential sigmas would replace sgm_uniform's: refused, not mixed."""
    noise = NoiseSchedule.from_config(ScheduleConfig())
    folder = {"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "sgm_uniform"}
    with pytest.raises(ConfigError, match="scheduler config timestep_spacing: 'sgm_uniform' with euler .*; allowed"):
        get_sampler("euler").build_schedule(noise, 4, scheduler_config=folder)
    for key in ("use_karras_sigmas", "use_exponential_sigmas"):
        folder = {"_class_name": "EulerDiscreteScheduler", key: True}
        with pytest.raises(ConfigError, match=f"'sgm_uniform' with euler .* and scheduler config {key}: True"):
            get_sampler("euler").build_schedule(noise, 4, "sgm_uniform", folder)


def test_a_sampler_that_ignores_any_spacing_refuses_each():
    """LCM's grid ignores a spacing (diffusers' LCMScheduler has the field and ignores it too): refused,
    never silently dropped."""
    noise = NoiseSchedule.from_config(ScheduleConfig())
    for spacing in ("leading", "trailing", "linspace", "sgm_uniform"):
        with pytest.raises(
            ConfigError, match=f"'{spacing}' with lcm .*; allowed: none \\(its sigmas do not depend on a spacing\\)"
        ):
            get_sampler("lcm").build_schedule(noise, 4, spacing)


def test_the_web_ui_names():
    """Its API takes the schedule type's label, name or alias; it picks the sampler's uniform row, and the
    samplers the web UI offers no schedule types with (DDIM, UniPC, LCM...) refuse it."""
    for text in ("SGM Uniform", "sgm_uniform", "SGMUniform", " sgm uniform "):
        assert webui_spacing(text) == "sgm_uniform"
    assert webui_spacing("Karras") is None and webui_spacing(None) is None
    assert from_webui("Euler", "SGM Uniform") == "euler" and from_webui("Euler a", "SGM Uniform") == "euler_a"
    assert from_webui("DPM++ 2M", "sgm_uniform") == "dpmpp_2m"  # not its Automatic (Karras) row
    for name in ("DDIM", "UniPC", "LCM"):
        with pytest.raises(ConfigError, match=f"schedule type 'SGM Uniform' with {name}; allowed: Automatic$"):
            from_webui(name, "SGM Uniform")
    with pytest.raises(ConfigError, match="'exponential' with Euler; allowed: Automatic, Uniform, SGM Uniform$"):
        from_webui("Euler", "Exponential")
    # A web UI PNG's parameters: the schedule type brings the spacing with it.
    settings, ours = from_infotext(
        "a cat\nSteps: 4, Sampler: Euler a, Schedule type: SGM Uniform, CFG scale: 1, Seed: 3"
    )
    assert not ours and settings["sampler"] == "euler_a" and settings["timestep_spacing"] == "sgm_uniform"


def test_the_command_line_records_it_as_the_web_ui_does(tmp_path):
    """`--timestep-spacing sgm_uniform`: the PNG says "Schedule type: SGM Uniform" (and ldmkit's
    "Timestep spacing: sgm_uniform"), and --from-png replays it to the same image."""
    model = tmp_path / "tiny.safetensors"
    assert main(["init-model", str(model), "--seed", "0"]) == 0
    common = ["--model", str(model), "--steps", "3", "--seed", "2", "--width", "32", "--height", "32", "-q"]
    assert main(["generate", "a red circle", "--sampler", "euler_a", "--timestep-spacing", "sgm_uniform", *common,
                 "-o", str(tmp_path / "sgm.png")]) == 0  # fmt: skip
    info = Image.open(tmp_path / "sgm.png").info["parameters"]
    assert "Sampler: Euler a, Schedule type: SGM Uniform," in info and "Timestep spacing: sgm_uniform" in info
    assert main(["generate", "--from-png", str(tmp_path / "sgm.png"), "--model", str(model), "-q",
                 "-o", str(tmp_path / "again.png")]) == 0  # fmt: skip
    same = [np.asarray(Image.open(tmp_path / f"{n}.png").convert("RGB")) for n in ("sgm", "again")]
    assert np.array_equal(*same)
    assert main(["generate", "a red circle", "--sampler", "euler_a", "--timestep-spacing", "trailing", *common,
                 "-o", str(tmp_path / "trailing.png")]) == 0  # fmt: skip
    assert "Schedule type: Uniform" in Image.open(tmp_path / "trailing.png").info["parameters"]


def test_the_command_line_refuses_it_with_ddim_in_one_line(tmp_path, capsys):
    model = tmp_path / "tiny.safetensors"
    assert main(["init-model", str(model), "--seed", "0"]) == 0
    args = ["generate", "a red circle", "--model", str(model), "--sampler", "ddim", "--timestep-spacing", "sgm_uniform"]
    assert main([*args, "--steps", "2", "--width", "32", "--height", "32", "-q", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: timestep spacing 'sgm_uniform' with ddim") and len(err.splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_torch_and_numpy_agree_on_the_grid():
    """k-diffusion and ComfyUI build the grid with torch.linspace in float32; ours is numpy's float64:
    the same timesteps to within float32 rounding."""
    for n in STEPS:
        ours = get_sampler("euler").build_schedule(NoiseSchedule.from_config(ScheduleConfig()), n, "sgm_uniform")
        theirs = torch.linspace(999, 0, n + 1)[:-1].double()
        assert (ours.timesteps - theirs).abs().max() <= 1e-4, n
