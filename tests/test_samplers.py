"""Seed-for-seed parity of every sampler with diffusers' own pipelines: a random-weight UNet in both
implementations, the same prompt embeddings, seeds and steps; final latents compared in fp32. And a
model folder's scheduler config deciding every sampler's sigma list exactly as diffusers'
`<class>.from_config(folder_config)` does, over folder configs drawn at random."""

import inspect
import json
import random
import re

import diffusers
import pytest
import torch

from conftest import randomize, tiny_diffusers_unet, tiny_pipeline
from ldmkit.checkpoints.diffusers_configs import schedule_from_diffusers
from ldmkit.checkpoints.single_file import load_model
from ldmkit.diffusion.denoiser import Conditioning, Denoiser
from ldmkit.diffusion.registry import DIFFUSERS_CLASSES, SAMPLERS, get_sampler
from ldmkit.diffusion.sampling import generators_for, sample_latents, sampling_schedule
from ldmkit.diffusion.schedule import NoiseSchedule
from ldmkit.errors import ConfigError
from ldmkit.models.ldm import ScheduleConfig
from ldmkit.nn.embedding import guidance_scale_embedding

STEPS = 6


@pytest.fixture(scope="module")
def sd_folders(tmp_path_factory):
    return tmp_path_factory.mktemp("sd")


@pytest.fixture(scope="module")
def pipes(sd_folders):
    folder = sd_folders
    pipe = tiny_pipeline(folder / "eps")
    vpipe = tiny_pipeline(folder / "v", prediction_type="v_prediction")
    return {"epsilon": (pipe, load_model(folder / "eps")), "v_prediction": (vpipe, load_model(folder / "v"))}


@pytest.fixture(scope="module")
def folder_pipe(pipes, sd_folders):
    """The eps model's folder as a user has it (as written: tests swap `pipes`' schedulers later):
    diffusers' pipeline loaded from disk, ours loaded from the same folder, and the loaded pipeline's
    scheduler config -- the folder's JSON, unlike an in-memory pipeline's, which marks the fields it
    left at their defaults for from_config to drop. Tests that swap this pipeline's scheduler start
    from that config, not from `pipe.scheduler`."""
    loaded = diffusers.StableDiffusionPipeline.from_pretrained(str(sd_folders / "eps"))
    return loaded, load_model(sd_folders / "eps"), dict(loaded.scheduler.config)


def embeds(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 77, 32, generator=g), torch.randn(batch, 77, 32, generator=g)


def ours(model, name, batch, seed, cfg=5.0, steps=STEPS, **options):
    spec = get_sampler(name)
    schedule = NoiseSchedule.from_config(model.config.schedule)
    walk = sampling_schedule(spec, schedule, steps)
    denoiser = Denoiser(model.unet, schedule, model.config.schedule.prediction_type, walk)
    ctx, unc = embeds(batch)
    cond = Conditioning(ctx, unc, cfg_scale=cfg)
    z = sample_latents(denoiser, spec, cond, generators_for(seed, batch), (4, 8, 8), **options)
    return z, denoiser.calls


def reference(pipe, name, batch, seed, cfg=5.0, steps=STEPS, **kwargs):
    spec = get_sampler(name)
    pipe.scheduler = getattr(diffusers, spec.diffusers_class)(
        **spec.diffusers_config, prediction_type=pipe.scheduler.config.prediction_type
    )
    ctx, unc = embeds(batch)
    out = pipe(
        prompt_embeds=ctx,
        negative_prompt_embeds=unc,
        guidance_scale=cfg,
        num_inference_steps=steps,
        generator=generators_for(seed, batch),
        height=16,
        width=16,
        output_type="latent",
        **kwargs,
    )
    return out.images


@pytest.mark.parametrize("name", [n for n in SAMPLERS if n != "lcm"])
@pytest.mark.parametrize("batch", [1, 3])
def test_parity_with_diffusers(pipes, name, batch):
    pipe, model = pipes["epsilon"]
    z, _ = ours(model, name, batch, seed=42)
    ref = reference(pipe, name, batch, seed=42)
    assert z.shape == ref.shape
    assert ref.abs().mean() > 0.1
    assert (z - ref).abs().max() <= 1e-3, (z - ref).abs().max()


# Not plms: with v-prediction diffusers' PNDMScheduler combines the raw v outputs of several steps and
# converts the mix to eps with the current step's alpha; the original SD 2 code (and ours) converts
# each output to eps first. A known divergence, listed in the sampler table.
@pytest.mark.parametrize("name", ["ddim", "euler_a", "heun", "dpmpp_2m_karras", "unipc", "ddpm"])
def test_parity_v_prediction(pipes, name):
    pipe, model = pipes["v_prediction"]
    z, _ = ours(model, name, 2, seed=7)
    ref = reference(pipe, name, 2, seed=7)
    assert (z - ref).abs().max() <= 1e-3


def test_ddim_with_eta_is_ancestral_and_matches(pipes):
    pipe, model = pipes["epsilon"]
    z, _ = ours(model, "ddim", 3, seed=3, eta=0.7)
    ref = reference(pipe, "ddim", 3, seed=3, eta=0.7)
    assert (z - ref).abs().max() <= 1e-3
    z0, _ = ours(model, "ddim", 3, seed=3)
    assert (z - z0).abs().max() > 1e-2  # eta changes the result


def test_guidance_rescale_matches(pipes):
    pipe, model = pipes["v_prediction"]
    spec = get_sampler("euler")
    noise = NoiseSchedule.from_config(model.config.schedule)
    denoiser = Denoiser(model.unet, noise, "v_prediction", sampling_schedule(spec, noise, STEPS))
    ctx, unc = embeds(2)
    z = sample_latents(
        denoiser,
        spec,
        Conditioning(ctx, unc, cfg_scale=6.0, guidance_rescale=0.7),
        generators_for(5, 2),
        (4, 8, 8),
    )
    ref = reference(pipe, "euler", 2, seed=5, cfg=6.0, guidance_rescale=0.7)
    assert (z - ref).abs().max() <= 1e-3


def test_a_seed_reproduces_its_image_at_any_batch_size(pipes):
    _, model = pipes["epsilon"]
    for name in ("euler_a", "ddpm"):
        batch3, _ = ours(model, name, 3, seed=100)  # image 1 of the batch has seed 101
        ctx, unc = embeds(3)
        spec = get_sampler(name)
        noise = NoiseSchedule.from_config(model.config.schedule)
        denoiser = Denoiser(model.unet, noise, "epsilon", sampling_schedule(spec, noise, STEPS))
        alone = sample_latents(
            denoiser, spec, Conditioning(ctx[1:2], unc[1:2], cfg_scale=5.0), generators_for(101, 1), (4, 8, 8)
        )
        assert (batch3[1:2] - alone).abs().max() <= 1e-3  # batch size only changes float rounding


def test_unet_call_counts(pipes):
    _, model = pipes["epsilon"]
    assert ours(model, "plms", 1, 0)[1] == STEPS + 1  # PLMS: N + 1 calls for N steps
    assert ours(model, "heun", 1, 0)[1] == 2 * STEPS - 1
    assert ours(model, "euler", 1, 0)[1] == STEPS
    assert ours(model, "dpmpp_2m", 1, 0, cfg=1.0)[1] == STEPS  # cfg 1: no unconditional pass either


def test_traps_are_reproduced():
    from ldmkit.models.ldm import ScheduleConfig

    noise = NoiseSchedule.from_config(ScheduleConfig())
    euler = get_sampler("euler").build_schedule(noise, 10)
    assert euler.init_noise_sigma == pytest.approx(float(euler.sigmas[0]))  # linspace: sigma_max
    ddim = get_sampler("ddim").build_schedule(noise, 10)
    assert float(ddim.sigmas[-1]) == pytest.approx(0.0292, abs=1e-4)  # ends at sigma(t=0), not 0
    assert ddim.init_noise_sigma == pytest.approx((float(ddim.sigmas[0]) ** 2 + 1) ** 0.5)
    assert list(ddim.timesteps[:3]) == [901, 801, 701]
    karras = get_sampler("dpmpp_2m_karras").build_schedule(noise, 10)
    assert all(float(t) == round(float(t)) for t in karras.timesteps)  # UNet at rounded timesteps
    assert float(karras.sigmas[0]) == pytest.approx(float(noise.sigmas[-1]))


def test_euler_with_leading_spacing_starts_at_sqrt_sigma_max_squared_plus_one():
    """diffusers' Euler schedulers scale the initial noise by sqrt(sigma_max² + 1) with "leading"
    spacing and by sigma_max otherwise; ours reproduces the scheduler it is configured like."""
    sched = diffusers.EulerDiscreteScheduler(
        **{**get_sampler("euler").diffusers_config, "timestep_spacing": "leading", "steps_offset": 1}
    )
    sched.set_timesteps(10)
    assert float(sched.init_noise_sigma) == pytest.approx((float(sched.sigmas[0]) ** 2 + 1) ** 0.5)
    sched = diffusers.EulerDiscreteScheduler(**get_sampler("euler").diffusers_config)
    sched.set_timesteps(10)
    assert float(sched.init_noise_sigma) == pytest.approx(float(sched.sigmas[0]))


def test_lcm_parity_with_guidance_embedding(tmp_path):
    from diffusers import LatentConsistencyModelPipeline

    unet = tiny_diffusers_unet(time_cond_proj_dim=32)
    base = tiny_pipeline(tmp_path / "lcm", unet=unet)
    spec = get_sampler("lcm")
    pipe = LatentConsistencyModelPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=base.unet,
        scheduler=diffusers.LCMScheduler(**spec.diffusers_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    model = load_model(tmp_path / "lcm")
    ctx, _ = embeds(3)
    for steps in (1, 4):
        ref = pipe(
            prompt_embeds=ctx,
            guidance_scale=8.0,
            num_inference_steps=steps,
            generator=generators_for(9, 3),
            height=16,
            width=16,
            output_type="latent",
        ).images
        noise = NoiseSchedule.from_config(model.config.schedule)
        denoiser = Denoiser(model.unet, noise, "epsilon", sampling_schedule(spec, noise, steps))
        cond = Conditioning(ctx, None, timestep_cond=guidance_scale_embedding(torch.full((3,), 8.0), 32))
        z = sample_latents(denoiser, spec, cond, generators_for(9, 3), (4, 8, 8))
        assert denoiser.calls == steps
        assert ref.abs().mean() > 0.1 and (z - ref).abs().max() <= 1e-3


@pytest.mark.parametrize(
    "prediction,overrides",
    [
        # LCMScheduler's clip, its consistency boundary scaling and distillation grid from the folder
        (
            "epsilon",
            {"clip_sample": True, "clip_sample_range": 0.5, "timestep_scaling": 5.0, "original_inference_steps": 40},
        ),
        # zero terminal SNR: LCMScheduler keeps ᾱ_T = 0, so the first step starts from pure noise
        ("v_prediction", {"rescale_betas_zero_snr": True}),
    ],
)
def test_lcm_follows_its_folder_config(tmp_path, prediction, overrides):
    from diffusers import LatentConsistencyModelPipeline

    base = tiny_pipeline(tmp_path / "lcm", unet=tiny_diffusers_unet(time_cond_proj_dim=32), prediction_type=prediction)
    model = load_model(tmp_path / "lcm")
    folder = {**model.config.schedule.diffusers, **overrides}
    pipe = LatentConsistencyModelPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=base.unet,
        scheduler=diffusers.LCMScheduler.from_config(folder),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    ctx, _ = embeds(2)
    ref = pipe(
        prompt_embeds=ctx,
        guidance_scale=8.0,
        num_inference_steps=4,
        generator=generators_for(9, 2),
        height=16,
        width=16,
        output_type="latent",
    ).images
    noise = NoiseSchedule.from_config(schedule_from_diffusers(folder))
    walk = sampling_schedule(get_sampler("lcm"), noise, 4, scheduler_config=folder)
    denoiser = Denoiser(model.unet, noise, prediction, walk)
    cond = Conditioning(ctx, None, timestep_cond=guidance_scale_embedding(torch.full((2,), 8.0), 32))
    z = sample_latents(denoiser, get_sampler("lcm"), cond, generators_for(9, 2), (4, 8, 8))
    assert ref.abs().mean() > 0.1 and (z - ref).abs().max() <= 1e-3, (z - ref).abs().max()


@pytest.mark.parametrize(
    "name,spacing",
    [
        ("euler", "leading"),
        ("euler", "trailing"),
        ("euler_a", "leading"),
        ("heun", "trailing"),
        ("ddim", "trailing"),
        ("ddpm", "trailing"),
        ("dpmpp_2m", "leading"),
        ("dpmpp_2m", "trailing"),
        ("unipc", "trailing"),
    ],
)
def test_timestep_spacings_match_diffusers(pipes, name, spacing):
    """Including the trap: Euler with "leading" spacing starts from sqrt(sigma_max² + 1) noise.
    5 steps, not 6: diffusers' DDIM steps to t - T//n, which with "trailing" is the next timestep
    it evaluates only when n divides T (a divergence we do not copy)."""
    pipe, model = pipes["epsilon"]
    spec = get_sampler(name)
    pipe.scheduler = getattr(diffusers, spec.diffusers_class)(
        **{**spec.diffusers_config, "timestep_spacing": spacing, "steps_offset": 1}
    )
    ctx, unc = embeds(2)
    ref = pipe(
        prompt_embeds=ctx,
        negative_prompt_embeds=unc,
        guidance_scale=5.0,
        num_inference_steps=5,
        generator=generators_for(11, 2),
        height=16,
        width=16,
        output_type="latent",
    ).images
    noise = NoiseSchedule.from_config(model.config.schedule)
    denoiser = Denoiser(model.unet, noise, "epsilon", sampling_schedule(spec, noise, 5, spacing))
    z = sample_latents(denoiser, spec, Conditioning(ctx, unc, cfg_scale=5.0), generators_for(11, 2), (4, 8, 8))
    assert (z - ref).abs().max() <= 1e-3


def test_spacings_that_no_sigma_list_describes_are_refused():
    from ldmkit.errors import ConfigError
    from ldmkit.models.ldm import ScheduleConfig

    noise = NoiseSchedule.from_config(ScheduleConfig())
    with pytest.raises(ConfigError, match="'linspace' with ddim"):
        get_sampler("ddim").build_schedule(noise, 10, "linspace")
    with pytest.raises(ConfigError, match="with dpmpp_2m_karras"):
        get_sampler("dpmpp_2m_karras").build_schedule(noise, 10, "leading")


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_beta_schedules_equal_diffusers(kind):
    from ldmkit.models.ldm import ScheduleConfig

    ref = diffusers.DDPMScheduler(beta_schedule=kind, beta_start=0.0001, beta_end=0.02)
    ours = NoiseSchedule.from_config(ScheduleConfig(beta_schedule=kind, beta_start=0.0001, beta_end=0.02))
    assert torch.allclose(ours.alphas_cumprod, ref.alphas_cumprod, atol=1e-7)


def test_x0_prediction_parity(tmp_path):
    pipe = tiny_pipeline(tmp_path / "x0", prediction_type="sample")
    model = load_model(tmp_path / "x0")
    assert model.config.schedule.prediction_type == "sample"
    for name in ("ddim", "euler", "dpmpp_2m"):
        z, _ = ours(model, name, 1, seed=4)
        ref = reference(pipe, name, 1, seed=4)
        assert (z - ref).abs().max() <= 1e-3, name


@pytest.mark.parametrize(
    "name,spacing",
    [("euler", "trailing"), ("ddim", "trailing"), ("ddim", "leading"), ("ddpm", "trailing"), ("dpmpp_2m", "trailing")],
)
def test_zero_terminal_snr_matches_diffusers(pipes, name, spacing):
    """Rescaled betas reach ᾱ_T = 0. Like diffusers' sigma-space schedulers, Euler and DPM-Solver
    clamp ᾱ_T to 2^-24; DDIM and DDPM start from ᾱ_T = 0 exactly (sigma = inf), as diffusers' do."""
    pipe, model = pipes["v_prediction"]
    spec = get_sampler(name)
    pipe.scheduler = getattr(diffusers, spec.diffusers_class)(
        **{**spec.diffusers_config, "timestep_spacing": spacing, "steps_offset": 1, "rescale_betas_zero_snr": True},
        prediction_type="v_prediction",
    )
    ctx, unc = embeds(2)
    ref = pipe(
        prompt_embeds=ctx,
        negative_prompt_embeds=unc,
        guidance_scale=5.0,
        num_inference_steps=5,
        generator=generators_for(12, 2),
        height=16,
        width=16,
        output_type="latent",
    ).images
    noise = NoiseSchedule.from_config(model.config.schedule, zero_terminal_snr=True)
    denoiser = Denoiser(model.unet, noise, "v_prediction", sampling_schedule(spec, noise, 5, spacing))
    z = sample_latents(denoiser, spec, Conditioning(ctx, unc, cfg_scale=5.0), generators_for(12, 2), (4, 8, 8))
    assert (z - ref).abs().max() <= 1e-3, (z - ref).abs().max()


def test_zero_terminal_snr_refuses_eps_prediction():
    from ldmkit.errors import ConfigError
    from ldmkit.models.ldm import ScheduleConfig

    with pytest.raises(ConfigError, match="zero terminal SNR"):
        NoiseSchedule.from_config(ScheduleConfig(prediction_type="epsilon"), zero_terminal_snr=True)


def test_ddim_under_zero_terminal_snr_starts_at_pure_noise():
    from ldmkit.models.ldm import ScheduleConfig

    noise = NoiseSchedule.from_config(ScheduleConfig(prediction_type="v_prediction"), zero_terminal_snr=True)
    assert noise.terminal_is_pure_noise and float(noise.sigmas[-1]) == pytest.approx(4096, rel=1e-4)
    assert get_sampler("ddim").build_schedule(noise, 5, "trailing").sigmas[0] == float("inf")
    assert get_sampler("euler").build_schedule(noise, 5, "trailing").sigmas[0] == pytest.approx(4096, rel=1e-4)


def test_readme_shows_the_sampler_table():
    from pathlib import Path

    from ldmkit.diffusion.registry import markdown_table

    assert markdown_table() in (Path(__file__).parent.parent / "docs/samplers.md").read_text()


# --- a model folder's scheduler config decides every sampler's sigma list ------------------------

FOLDER_CLASSES = (
    "PNDMScheduler",
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
)
# Schedulers whose latents live in sigma space (scale_model_input divides by sqrt(sigma² + 1)): their
# init_noise_sigma is a sigma-space scale; the others start from unit variance-preserving noise.
SIGMA_SPACE = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler")


def folder_config(rng: random.Random) -> dict:
    """A scheduler_config.json as a diffusers model folder carries it: SD's betas, a class of those
    SD folders ship, its spacing / offset / final-sigma / alpha settings at random, Karras sigmas
    sometimes, zero terminal SNR sometimes for v-prediction, and sometimes the legacy keys SD 1.x
    and SDXL folders still carry from their PNDM days."""
    name = rng.choice(FOLDER_CLASSES)
    cls = getattr(diffusers, name)
    takes = inspect.signature(cls.__init__).parameters
    v = rng.random() < 0.5
    settings = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "v_prediction" if v else "epsilon",
        "timestep_spacing": rng.choice(["leading", "trailing", "linspace"]),
        "steps_offset": rng.choice([0, 1]),
    }
    choices = {
        "set_alpha_to_one": [True, False],
        "final_sigmas_type": ["zero", "sigma_min"],
        "use_karras_sigmas": [False, False, True],
        "clip_sample": [False, True],  # DDIM's default is True
        "skip_prk_steps": [True],
        "rescale_betas_zero_snr": [False, True] if v else [False],
        "timestep_type": ["discrete", "discrete", "continuous"],  # continuous: EDM's ¼ ln σ with v (SVD)
    }
    settings.update({key: rng.choice(values) for key, values in choices.items() if key in takes})
    if settings.get("use_karras_sigmas") and "sigma_min" in takes and rng.random() < 0.5:
        settings.update(sigma_min=0.002, sigma_max=rng.choice([14.6, 80.0, 700.0]))  # EDM's / SVD's ends
    config = json.loads(cls(**settings).to_json_string())
    if rng.random() < 0.3:
        config = {"clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True, **config}
    return config


def diffusers_sigma_list(sched, n: int):
    """What a diffusers scheduler walks for n steps, in sigma space: (sigmas, UNet timesteps, initial
    noise scale in sigma space). Sigma-space schedulers list their sigmas (Heun twice each); the
    variance-preserving ones list timesteps, each step going to ᾱ of the step's previous timestep:
    DDIM and PNDM's t - T//n (below 0: final_alpha_cumprod), DDPM's previous_timestep, LCM's last step
    to the clean latent."""
    sched.set_timesteps(n)
    name = type(sched).__name__
    if hasattr(sched, "sigmas") and name != "LCMScheduler":
        sigmas, t = sched.sigmas, sched.timesteps
        if name == "HeunDiscreteScheduler":
            sigmas, t = torch.cat([sigmas[:1], sigmas[1:-1:2], sigmas[-1:]]), torch.cat([t[:1], t[1::2]])
        init = float(sched.init_noise_sigma) if name in SIGMA_SPACE else (float(sigmas[0]) ** 2 + 1) ** 0.5
        return sigmas.float(), t.double(), init
    ab, t = sched.alphas_cumprod, sched.timesteps
    if name == "PNDMScheduler":  # PLMS evaluates its second timestep twice (the warm-up)
        t = torch.tensor(sorted(set(t.tolist()), reverse=True))
    if name == "DDPMScheduler":
        prev = int(sched.previous_timestep(t[-1]))
        final = ab[prev] if prev >= 0 else sched.one
    elif name == "LCMScheduler":
        final = torch.tensor(1.0)
    else:
        prev = int(t[-1]) - sched.config.num_train_timesteps // sched.num_inference_steps
        final = ab[prev] if prev >= 0 else sched.final_alpha_cumprod
    ab = torch.cat([ab[t], final.reshape(1)])
    sigmas = ((1 - ab) / ab) ** 0.5  # ᾱ = 0 (zero terminal SNR): inf
    return sigmas.float(), t.double(), (float(sigmas[0]) ** 2 + 1) ** 0.5


def takes(sched, key: str) -> bool:
    """Whether the scheduler's class has this setting. Not `key in sched.config`: from_config keeps a
    folder's unknown keys on the config too."""
    return key in inspect.signature(type(sched).__init__).parameters


def expected_refusal(sched, folder: dict) -> str | None:
    """The field we must refuse for this scheduler, or None: DDIM/PNDM step to t - T//n, which with
    linspace is not the next timestep they evaluate; PNDM and Heun cannot take a zero-SNR model."""
    if type(sched).__name__ in ("DDIMScheduler", "PNDMScheduler") and sched.config.timestep_spacing == "linspace":
        return "timestep_spacing"
    if folder.get("rescale_betas_zero_snr") and not takes(sched, "rescale_betas_zero_snr"):
        return "rescale_betas_zero_snr"
    return None


def check_folder_draw(seed: int) -> None:
    rng = random.Random(seed)
    folder = folder_config(rng)
    n = rng.randint(1, 30)
    noise = NoiseSchedule.from_config(schedule_from_diffusers(folder))
    for name, spec in SAMPLERS.items():
        where = f"seed {seed}: {name} on {folder['_class_name']} {n} steps"
        sched = getattr(diffusers, spec.diffusers_class).from_config(folder, **spec.identity)
        refused = expected_refusal(sched, folder)
        try:
            ours = spec.build_schedule(noise, n, scheduler_config=folder)
        except ConfigError as e:
            assert refused and re.search(f"{refused}: .* with {name} ", str(e)), f"{where}: {e}"
            continue
        assert not refused, f"{where}: should refuse {refused}"
        sigmas, timesteps, init = diffusers_sigma_list(sched, n)
        # Equal floats: the same float32 operations in the same order (inf where ᾱ = 0).
        assert torch.equal(ours.sigmas, sigmas), f"{where}: {ours.sigmas} != {sigmas}"
        assert torch.equal(ours.timesteps.float(), timesteps.float()), f"{where}: {ours.timesteps} != {timesteps}"
        assert ours.init_noise_sigma == pytest.approx(init, rel=1e-6), where
        if takes(sched, "clip_sample"):
            clip = sched.config.clip_sample_range if sched.config.clip_sample else None
            assert ours.options["clip_sample_range"] == clip, where


@pytest.mark.parametrize("seed", range(16))
def test_folder_config_decides_every_sigma_list_as_diffusers(seed):
    check_folder_draw(seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(16, 1016))
def test_folder_config_decides_every_sigma_list_as_diffusers_many(seed):
    check_folder_draw(seed)


def test_class_defaults_are_diffusers_own():
    """The defaults a field takes when a folder does not give it: each class's __init__. sigma_min /
    sigma_max are read by Heun's and DPM-Solver's Karras conversion without being __init__ fields."""
    for name, cls in DIFFUSERS_CLASSES.items():
        params = inspect.signature(getattr(diffusers, name).__init__).parameters
        for key, default in cls.defaults.items():
            if key not in params:
                assert key in ("sigma_min", "sigma_max") and default is None, (name, key)
                continue
            assert params[key].default == default, (name, key)


def ours_from_folder(model, name, folder: dict, steps=STEPS, seed=21, spacing=None):
    """Our final latents with a folder's scheduler config, batch 2 (the noise schedule from the same
    config, as loading the folder makes it)."""
    noise = NoiseSchedule.from_config(schedule_from_diffusers(folder))
    walk = sampling_schedule(get_sampler(name), noise, steps, spacing, folder)
    denoiser = Denoiser(model.unet, noise, model.config.schedule.prediction_type, walk)
    ctx, unc = embeds(2)
    return sample_latents(
        denoiser, get_sampler(name), Conditioning(ctx, unc, cfg_scale=5.0), generators_for(seed, 2), (4, 8, 8)
    )


def diffusers_from_folder(pipe, name, folder: dict, steps=STEPS, seed=21):
    """diffusers' final latents with `<class>.from_config(folder, **identity)`, batch 2."""
    spec = get_sampler(name)
    pipe.scheduler = getattr(diffusers, spec.diffusers_class).from_config(folder, **spec.identity)
    ctx, unc = embeds(2)
    return pipe(
        prompt_embeds=ctx,
        negative_prompt_embeds=unc,
        guidance_scale=5.0,
        num_inference_steps=steps,
        generator=generators_for(seed, 2),
        height=16,
        width=16,
        output_type="latent",
    ).images


def test_euler_a_follows_a_leading_folder_config_as_diffusers(folder_pipe):
    """The folder says "leading" (SD 1.x's PNDM config); euler_a on it walks leading timesteps, as
    diffusers' documented EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config) does --
    where the web UI's linspace list (a single file's) gives another picture."""
    pipe, model, loaded = folder_pipe
    folder = model.config.schedule.diffusers
    assert folder["timestep_spacing"] == loaded["timestep_spacing"] == "leading"
    ref = diffusers_from_folder(pipe, "euler_a", loaded)
    z = ours_from_folder(model, "euler_a", folder)
    assert ref.abs().mean() > 0.1
    assert (z - ref).abs().max() <= 1e-3, (z - ref).abs().max()
    without, _ = ours(model, "euler_a", 2, seed=21, cfg=5.0)  # no folder config: linspace
    assert (without - ref).abs().max() > 1e-2


# Folder settings that change more than the spacing, each proven on a whole loop. The base is the tiny
# folder's PNDM config, which has no clip_sample: DDIM and DDPM then clip at their own default (True),
# as from_config does. DDIM clips the x0 term only, DDPM steps from the clamped x0; DDPM takes
# linspace; Heun's Karras sigmas and clip; DPM-Solver's final sigma_min (second order on the last
# step from 15 steps on); Euler's exponential sigmas under a sigma_max; UniPC's Karras sigmas ending
# at their own sigma_min.
FOLDER_LOOPS = [
    ("ddim", {"timestep_spacing": "trailing", "set_alpha_to_one": True}, 5),
    ("ddim", {"clip_sample_range": 1.5, "steps_offset": 0}, 6),
    ("ddpm", {"timestep_spacing": "linspace"}, 6),
    ("heun", {"use_karras_sigmas": True, "clip_sample": True, "timestep_spacing": "trailing"}, 4),
    ("dpmpp_2m", {"final_sigmas_type": "sigma_min"}, 6),
    ("dpmpp_2m", {"final_sigmas_type": "sigma_min", "timestep_spacing": "trailing"}, 16),
    ("euler", {"use_exponential_sigmas": True, "final_sigmas_type": "sigma_min", "sigma_max": 10.0}, 6),
    ("unipc", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, 6),
]


@pytest.mark.parametrize("name,overrides,steps", FOLDER_LOOPS)
def test_folder_settings_match_diffusers_whole_loop(folder_pipe, name, overrides, steps):
    pipe, model, loaded = folder_pipe
    folder = {**loaded, **overrides}
    ref = diffusers_from_folder(pipe, name, folder, steps)
    z = ours_from_folder(model, name, folder, steps)
    assert ref.abs().mean() > 0.1
    assert (z - ref).abs().max() <= 1e-3, (z - ref).abs().max()


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_clip_sample_is_active_in_those_loops(folder_pipe, name):
    """The clip runs in the loops above: without it the same folder gives other latents."""
    _, model, loaded = folder_pipe
    clipped = ours_from_folder(model, name, {**loaded, "clip_sample": True})
    plain = ours_from_folder(model, name, {**loaded, "clip_sample": False})
    assert (clipped - plain).abs().max() > 1e-2


@pytest.mark.parametrize(
    "name,overrides,field",
    [
        ("ddim", {"thresholding": True}, "thresholding"),
        ("dpmpp_2m", {"use_beta_sigmas": True}, "use_beta_sigmas"),
        ("dpmpp_2m", {"lambda_min_clipped": -5.1}, "lambda_min_clipped"),
        ("unipc", {"use_dynamic_shifting": True}, "use_dynamic_shifting"),
        ("euler", {"interpolation_type": "log_linear"}, "interpolation_type"),
        ("ddpm", {"variance_type": "fixed_large"}, "variance_type"),
        ("plms", {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
        ("ddim", {"timestep_spacing": "linspace"}, "timestep_spacing"),
    ],
)
def test_folder_settings_we_cannot_follow_are_refused_by_name(name, overrides, field):
    folder = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "steps_offset": 1, **overrides}
    noise = NoiseSchedule.from_config(schedule_from_diffusers(folder))
    with pytest.raises(ConfigError, match=f"scheduler config {field}: .* with {name} .*; allowed: "):
        get_sampler(name).build_schedule(noise, 10, scheduler_config=folder)
    # Only a sampler that cannot follow the setting refuses: euler_a's scheduler has none of these.
    get_sampler("euler_a").build_schedule(noise, 10, scheduler_config=folder)


def test_an_explicit_spacing_wins_over_the_folders():
    folder = {"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "trailing", "steps_offset": 1}
    noise = NoiseSchedule.from_config(ScheduleConfig(diffusers=folder))
    leading = get_sampler("euler").build_schedule(noise, 10, "leading", folder)
    ref = diffusers.EulerDiscreteScheduler.from_config(
        {**folder, **get_sampler("euler").diffusers_config}, timestep_spacing="leading"
    )
    assert torch.equal(leading.sigmas, diffusers_sigma_list(ref, 10)[0])
    assert list(leading.timesteps[:2]) == [901, 801]  # leading, + the folder's steps_offset
    with pytest.raises(ConfigError, match="timestep spacing 'leading' with dpmpp_2m_karras .*; allowed: none"):
        get_sampler("dpmpp_2m_karras").build_schedule(noise, 10, "leading", folder)


def test_zero_terminal_snr_comes_from_the_folder():
    """rescale_betas_zero_snr in the folder config makes the noise schedule zero-SNR (ᾱ_T = 0), also
    when the model file stores its own ᾱ; trained_betas replace the beta schedule, as in diffusers."""
    sd = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    folder = {**sd, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}
    ref = diffusers.DDIMScheduler.from_config(folder).alphas_cumprod
    zsnr = NoiseSchedule.from_config(schedule_from_diffusers(folder))
    assert zsnr.terminal_is_pure_noise and torch.equal(zsnr.alphas_cumprod, ref)
    stored = NoiseSchedule.from_config(ScheduleConfig(prediction_type="v_prediction")).alphas_cumprod
    again = NoiseSchedule.from_config(schedule_from_diffusers(folder), stored)
    # The stored ᾱ goes through Algorithm 1 directly, while diffusers takes the cumulative product of
    # the rescaled betas again: float32 rounding apart, no more.
    assert again.terminal_is_pure_noise and torch.allclose(again.alphas_cumprod, ref, rtol=1e-6, atol=0)
    with pytest.raises(ConfigError, match="zero terminal SNR"):
        NoiseSchedule.from_config(schedule_from_diffusers({**sd, "rescale_betas_zero_snr": True}))
    betas = [0.0005 + 0.012 * i / 1000 for i in range(1000)]
    trained = NoiseSchedule.from_config(schedule_from_diffusers({**sd, "trained_betas": betas}))
    assert torch.equal(trained.alphas_cumprod, diffusers.DDIMScheduler(trained_betas=betas).alphas_cumprod)


def test_pipeline_timestep_spacing_reaches_the_sampler_and_infotext():
    """timestep_spacing= (the CLI's --timestep-spacing) changes the sigma list, so the picture, and
    is recorded in the parameters and the infotext."""
    from ldmkit.models.ldm import LatentDiffusion
    from ldmkit.models.presets import tiny
    from ldmkit.pipelines import Pipeline

    torch.manual_seed(0)
    pipe = Pipeline(randomize(LatentDiffusion(tiny()), std=0.05), "tiny")
    common = dict(steps=3, cfg=3.0, sampler="euler", seed=8, width=32, height=32, prompt_mode="truncate")
    leading = pipe("a red circle", timestep_spacing="leading", **common)
    trailing = pipe("a red circle", timestep_spacing="trailing", **common)
    assert (leading.latents - trailing.latents).abs().max() > 1e-3
    assert leading.params.timestep_spacing == "leading"
    assert "Timestep spacing: leading" in leading.infotexts[0]
    assert "Timestep spacing: trailing" in trailing.infotexts[0]


def test_pipeline_follows_the_model_folders_scheduler_config(folder_pipe):
    """A folder's config (here "leading") reaches the sampler: the same model without one (as a
    single file has none) walks the web UI's linspace list instead."""
    from dataclasses import replace

    from ldmkit.pipelines import Pipeline

    _, model, _ = folder_pipe
    common = dict(steps=3, cfg=3.0, sampler="euler_a", seed=8, width=16, height=16, prompt_mode="truncate")
    with_folder = Pipeline(model, "folder")("a red circle", **common)
    schedule = model.config.schedule
    model.config.schedule = replace(schedule, diffusers={})
    try:
        without = Pipeline(model, "single")("a red circle", **common)
    finally:
        model.config.schedule = schedule
    assert (with_folder.latents - without.latents).abs().max() > 1e-3


def test_infotext_names_the_schedule_a_folder_config_turned_on(folder_pipe):
    """Euler is "Uniform" in the web UI's words, but a folder whose config says use_karras_sigmas walks
    Karras sigmas with it: the image's parameters say so."""
    from dataclasses import replace

    from ldmkit.pipelines import Pipeline

    _, model, _ = folder_pipe
    common = dict(steps=2, cfg=3.0, sampler="euler", seed=8, width=16, height=16, prompt_mode="truncate")
    assert "Schedule type: Uniform" in Pipeline(model, "folder")("a cat", **common).infotexts[0]
    schedule = model.config.schedule
    model.config.schedule = replace(schedule, diffusers={**schedule.diffusers, "use_karras_sigmas": True})
    try:
        assert "Schedule type: Karras" in Pipeline(model, "karras")("a cat", **common).infotexts[0]
    finally:
        model.config.schedule = schedule
