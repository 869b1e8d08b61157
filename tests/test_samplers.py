"""Seed-for-seed parity of every sampler with diffusers' own pipelines: a random-weight UNet in both
implementations, the same prompt embeddings, seeds and steps; final latents compared in fp32."""

import diffusers
import pytest
import torch

from conftest import tiny_diffusers_unet, tiny_pipeline
from ldmkit.checkpoints.single_file import load_model
from ldmkit.diffusion.denoiser import Conditioning, Denoiser
from ldmkit.diffusion.registry import SAMPLERS, get_sampler
from ldmkit.diffusion.sampling import generators_for, sample_latents
from ldmkit.diffusion.schedule import NoiseSchedule
from ldmkit.nn.embedding import guidance_scale_embedding

STEPS = 6


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd")
    pipe = tiny_pipeline(folder / "eps")
    vpipe = tiny_pipeline(folder / "v", prediction_type="v_prediction")
    return {"epsilon": (pipe, load_model(folder / "eps")), "v_prediction": (vpipe, load_model(folder / "v"))}


def embeds(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 77, 32, generator=g), torch.randn(batch, 77, 32, generator=g)


def ours(model, name, batch, seed, cfg=5.0, steps=STEPS, **options):
    spec = get_sampler(name)
    schedule = NoiseSchedule.from_config(model.config.schedule)
    denoiser = Denoiser(model.unet, schedule, model.config.schedule.prediction_type)
    ctx, unc = embeds(batch)
    cond = Conditioning(ctx, unc, cfg_scale=cfg)
    z = sample_latents(denoiser, spec, steps, cond, generators_for(seed, batch), (4, 8, 8), **options)
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
    denoiser = Denoiser(model.unet, NoiseSchedule.from_config(model.config.schedule), "v_prediction")
    ctx, unc = embeds(2)
    z = sample_latents(
        denoiser,
        spec,
        STEPS,
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
        denoiser = Denoiser(model.unet, NoiseSchedule.from_config(model.config.schedule), "epsilon")
        alone = sample_latents(
            denoiser, spec, STEPS, Conditioning(ctx[1:2], unc[1:2], cfg_scale=5.0), generators_for(101, 1), (4, 8, 8)
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
        denoiser = Denoiser(model.unet, NoiseSchedule.from_config(model.config.schedule), "epsilon")
        cond = Conditioning(ctx, None, timestep_cond=guidance_scale_embedding(torch.full((3,), 8.0), 32))
        z = sample_latents(denoiser, spec, steps, cond, generators_for(9, 3), (4, 8, 8))
        assert denoiser.calls == steps
        assert ref.abs().mean() > 0.1 and (z - ref).abs().max() <= 1e-3


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
    denoiser = Denoiser(model.unet, NoiseSchedule.from_config(model.config.schedule), "epsilon")
    z = sample_latents(
        denoiser, spec, 5, Conditioning(ctx, unc, cfg_scale=5.0), generators_for(11, 2), (4, 8, 8), spacing=spacing
    )
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
    denoiser = Denoiser(model.unet, noise, "v_prediction")
    z = sample_latents(
        denoiser, spec, 5, Conditioning(ctx, unc, cfg_scale=5.0), generators_for(12, 2), (4, 8, 8), spacing=spacing
    )
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

    assert markdown_table() in (Path(__file__).parent.parent / "README.md").read_text()
