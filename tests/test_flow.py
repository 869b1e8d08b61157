"""Rectified-flow sampling equal to diffusers' FlowMatchEulerDiscreteScheduler and
FlowMatchHeunDiscreteScheduler: the sigma and timestep lists for scheduler configs drawn at random
(training steps, static shift, the resolution-dependent shift and its anchors), and whole sampling runs
of a small fixed velocity model, from noise and from an image at a strength, with classifier-free
guidance. Replay a failure with its printed seed: `python -m pytest tests/test_flow.py -k "seed-7]"`."""

import random

import numpy as np
import pytest
import torch

from ldmkit.diffusion.denoiser import Conditioning, Denoiser
from ldmkit.diffusion.flow import FlowSchedule, resolution_mu
from ldmkit.diffusion.registry import get_sampler
from ldmkit.diffusion.sampling import generators_for, sample_latents, sampling_schedule
from ldmkit.errors import ConfigError


def draw(seed: int) -> dict:
    r = random.Random(seed)
    cfg = {"num_train_timesteps": r.choice([1000, 1000, 500]), "shift": r.choice([1.0, 3.0, r.uniform(0.5, 6)])}
    if r.random() < 0.3:
        cfg.update(use_dynamic_shifting=True, base_shift=r.uniform(0.3, 0.7), max_shift=r.uniform(0.9, 1.3))
        cfg.update(base_image_seq_len=r.choice([64, 256]), max_image_seq_len=r.choice([1024, 4096]))
        cfg["time_shift_type"] = r.choice(["exponential", "linear"])
    return cfg


def reference(sampler: str, cfg: dict):
    import diffusers

    if sampler == "dpmpp_2m":  # DPM-Solver++(2M) on flow sigmas, as diffusers' docs configure it for SD3
        return diffusers.DPMSolverMultistepScheduler(
            num_train_timesteps=cfg.get("num_train_timesteps", 1000), use_flow_sigmas=True,
            prediction_type="flow_prediction", flow_shift=cfg.get("shift", 1.0), algorithm_type="dpmsolver++",
            solver_order=2, solver_type="midpoint",
        )  # fmt: skip
    cls = diffusers.FlowMatchEulerDiscreteScheduler if sampler == "euler" else diffusers.FlowMatchHeunDiscreteScheduler
    return cls.from_config(cfg)


class Velocity(torch.nn.Module):
    """A small fixed nonlinear velocity field v(x, t, context): enough to make every step matter."""

    def __init__(self, channels: int = 4, width: int = 6):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(channels, channels, generator=g) * 0.5)
        self.c = torch.nn.Parameter(torch.randn(width, channels, generator=g) * 0.3)

    def forward(self, x, t, context, y=None, timestep_cond=None, control=None, cache=None):
        mixed = torch.einsum("oc,bchw->bohw", self.w, x)
        bias = (context.mean(1) @ self.c)[:, :, None, None]
        return torch.tanh(mixed) * (t[:, None, None, None] / 1000) + bias - 0.3 * x


def ours_run(sampler, cfg, steps, x_init, noise, strength, context, uncond, mu_len):
    spec = get_sampler(sampler)
    schedule = FlowSchedule.from_config(cfg)
    walk = sampling_schedule(spec, schedule, steps, None, cfg, strength, image_seq_len=mu_len)
    model = Velocity()
    denoiser = Denoiser(model, schedule, "flow", walk)
    cond = Conditioning(context, uncond, cfg_scale=4.0)
    gens = generators_for(0, noise.shape[0])  # unused: the noise is given
    return sample_latents(denoiser, spec, cond, gens, tuple(noise.shape[1:]), x_init, noise=noise), walk


def diffusers_run(sampler, cfg, steps, x_init, noise, strength, context, uncond, mu_len):
    ref = reference(sampler, cfg)
    kwargs = {"mu": resolution_mu(mu_len, {**ref.config})} if cfg.get("use_dynamic_shifting") else {}
    ref.set_timesteps(steps, **kwargs)
    timesteps = ref.timesteps
    if x_init is None:
        x = noise.clone()
    else:
        from types import SimpleNamespace

        from diffusers import StableDiffusion3Img2ImgPipeline

        # the cut SD3's img2img pipeline makes (its get_timesteps), run on this scheduler
        timesteps, _ = StableDiffusion3Img2ImgPipeline.get_timesteps(
            SimpleNamespace(scheduler=ref), steps, strength, "cpu"
        )
        x = ref.scale_noise(x_init, timesteps[:1], noise)
    model = Velocity()
    with torch.no_grad():
        for t in timesteps:
            tt = t.expand(2 * x.shape[0])
            out = model(torch.cat([x, x]), tt, torch.cat([uncond, context]))
            v_uncond, v_cond = out.chunk(2)
            x = ref.step(v_uncond + 4.0 * (v_cond - v_uncond), t, x).prev_sample
    return x, ref


@pytest.mark.parametrize("seed", range(3))
def test_sigmas_and_timesteps_equal_diffusers(seed):
    cfg = draw(seed)
    r = random.Random(seed)
    for sampler in ("euler", "heun", "dpmpp_2m"):
        steps, mu_len = r.randint(1, 40), r.choice([64, 256, 1024, 4096])
        if sampler != "euler" and cfg.get("use_dynamic_shifting"):
            with pytest.raises(ConfigError, match=f"sampler '{sampler}' with a resolution-dependent shift"):
                sampling_schedule(get_sampler(sampler), FlowSchedule.from_config(cfg), steps, None, cfg)
            continue
        walk = sampling_schedule(get_sampler(sampler), FlowSchedule.from_config(cfg), steps, None, cfg, None, mu_len)
        ref = reference(sampler, cfg)
        kwargs = {"mu": resolution_mu(mu_len, {**ref.config})} if cfg.get("use_dynamic_shifting") else {}
        ref.set_timesteps(steps, **kwargs)
        # Heun's lists repeat each inner sigma for its two stages; ours are the step boundaries
        heun = sampler == "heun"
        want_sigmas = torch.cat([ref.sigmas[:1], ref.sigmas[1::2]]) if heun else ref.sigmas
        want_t = torch.cat([ref.timesteps[:1], ref.timesteps[1::2]]) if heun else ref.timesteps
        assert torch.equal(walk.sigmas, want_sigmas.float()), f"seed {seed} {sampler}"
        assert torch.equal(walk.timesteps.float(), want_t.float()), f"seed {seed} {sampler}"


def check_run(seed: int, sampler: str, strength: float | None) -> None:
    cfg = draw(seed)
    if sampler != "euler" and cfg.get("use_dynamic_shifting"):
        cfg = {k: v for k, v in cfg.items() if k not in ("use_dynamic_shifting", "time_shift_type")}
    r = random.Random(seed)
    steps, mu_len = r.randint(2, 12), r.choice([64, 1024])
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(2, 4, 5, 6, generator=g)
    x_init = None if strength is None else torch.randn(2, 4, 5, 6, generator=g)
    context, uncond = torch.randn(2, 3, 6, generator=g), torch.randn(2, 3, 6, generator=g)
    args = (sampler, cfg, steps, x_init, noise, strength, context, uncond, mu_len)
    got, walk = ours_run(*args)
    want, _ = diffusers_run(*args)
    scale = float(want.abs().max())
    assert (got - want).abs().max() <= 1e-5 * max(1.0, scale), f"seed {seed} {sampler} strength {strength}: {cfg}"


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("strength", [None, 0.75])
def test_sampling_runs_equal_diffusers(seed, sampler, strength):
    check_run(seed, sampler, strength)


@pytest.mark.parametrize("seed", range(3))
def test_dpm_solver_on_flow_sigmas_equals_diffusers(seed):
    """diffusers' SD3 image-to-image pipeline cannot run DPM-Solver (it has no scale_noise): from noise."""
    check_run(seed, "dpmpp_2m", None)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2, 40))
def test_many_sampling_runs_equal_diffusers(seed):
    for sampler in ("euler", "heun"):
        for strength in (None, 0.3, 0.75, 1.0):
            check_run(seed, sampler, strength)
    check_run(seed, "dpmpp_2m", None)


def test_what_a_flow_model_cannot_do_is_refused_in_one_line():
    noise = FlowSchedule.from_config({"shift": 3.0})
    with pytest.raises(
        ConfigError, match="sampler 'dpmpp_2m_karras' with a flow-matching model; allowed: euler, heun, dpmpp_2m"
    ):
        sampling_schedule(get_sampler("dpmpp_2m_karras"), noise, 10)
    with pytest.raises(ConfigError, match="timestep spacing with a flow-matching model"):
        sampling_schedule(get_sampler("euler"), noise, 10, "trailing")
    with pytest.raises(ConfigError, match="scheduler config use_karras_sigmas: True; allowed: False"):
        FlowSchedule.from_config({"use_karras_sigmas": True})
    with pytest.raises(ConfigError, match="resolution-dependent shift needs the image's size"):
        sampling_schedule(get_sampler("euler"), FlowSchedule.from_config({"use_dynamic_shifting": True}), 4)


def test_the_training_sigmas_are_diffusers():
    for cfg in ({"shift": 3.0}, {"shift": 1.0, "num_train_timesteps": 500}, {"use_dynamic_shifting": True}):
        ref = reference("euler", cfg)
        assert np.array_equal(FlowSchedule.from_config(cfg).sigmas.numpy(), ref.sigmas.numpy()), cfg
