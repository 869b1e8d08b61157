"""SD-Turbo as it is meant to run (stabilityai/sd-turbo's model card: SD 2.1's architecture at 512, 1 to 4
steps, no guidance -- diffusers' guidance_scale 0, which makes no unconditional pass -- on trailing
timesteps), equal to diffusers, on tiny SD 2.x-style pipelines drawn at random (tests/test_random_configs.py's
draw, made SD 2's: an OpenCLIP-style tower, gelu and "!" padding; linear projections; eps prediction) whose
folder's scheduler config is Euler ancestral with trailing spacing, as tests/test_sdxl.py does for
SDXL-Turbo. Euler on trailing timesteps too, the same model's other few-step setting. ldmkit's "no
guidance" is cfg 1 (the web UI's scale: cfg 0 would be the unconditional prediction alone)."""

import numpy as np
import pytest
import torch
from test_random_configs import build, check_components, draw

from ldmkit.checkpoints.single_file import load_model
from ldmkit.diffusion.sampling import generators_for
from ldmkit.pipelines import Pipeline

PROMPT = "a cinematic shot of a baby racoon wearing an intricate italian priest robe"
CLASSES = {"euler_a": "EulerAncestralDiscreteScheduler", "euler": "EulerDiscreteScheduler"}


def sd2_spec(seed: int) -> dict:
    spec = draw(seed, "epsilon")
    spec["clip"]["hidden_act"] = "gelu"
    spec["tokenizer"]["pad"] = "!"  # with gelu: OpenCLIP's tower, the SD 2 family
    spec["unet"]["use_linear_projection"] = True
    return spec


def image_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


def check(seed: int, sampler: str, steps: int, tmp_path) -> None:
    import diffusers

    torch.manual_seed(seed)
    spec = sd2_spec(seed)
    where = f"seed {seed} ({spec}), {sampler}, {steps} steps"
    folder = tmp_path / "turbo"
    pipe = build(spec, folder, seed)
    pipe.scheduler = getattr(diffusers, CLASSES[sampler]).from_config(
        pipe.scheduler.config, timestep_spacing="trailing"
    )
    pipe.save_pretrained(str(folder))  # the folder's scheduler config says trailing
    ours = Pipeline.load(folder, precision="fp32")
    assert ours.model.config.family == "sd2-eps", f"{where}: read as {ours.model.config.family}"
    native = spec["unet"]["sample_size"] * 2 ** (len(spec["vae"]["block_out_channels"]) - 1)
    side = max(8, 2 * native) + (-max(8, 2 * native) % 8)
    kw = dict(steps=steps, cfg=1.0, sampler=sampler, seed=5, width=side, height=side + 8, prompt_mode="truncate")
    got = ours(PROMPT, **kw)
    ref = pipe(
        PROMPT,
        num_inference_steps=steps,
        guidance_scale=0.0,
        width=side,
        height=side + 8,
        generator=generators_for(5, 1),
    ).images[0]
    diff = image_diff(got.images[0], ref)
    assert diff <= 1.0, f"{where}: {diff:.2f}/255"
    # No unconditional pass: a negative prompt changes nothing at cfg 1 (it would, were one made).
    assert np.array_equal(
        np.asarray(ours(PROMPT, negative_prompt="blurry, ugly", **kw).images[0]), np.asarray(got.images[0])
    )
    info = got.infotexts[0]
    assert "CFG scale: 1," in info and "Schedule type: Uniform" in info and "Timestep spacing" not in info, info


@pytest.mark.parametrize("seed,sampler,steps", [(1, "euler_a", 1), (2, "euler_a", 4), (3, "euler", 4)])
def test_sd_turbo_settings_equal_diffusers(seed, sampler, steps, tmp_path):
    check(seed, sampler, steps, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 120), ids=lambda v: f"seed-{v}")
def test_sd_turbo_settings_on_many_configs_equal_diffusers(seed, tmp_path):
    check(seed, ("euler_a", "euler")[seed % 2], 1 + seed % 4, tmp_path)


def test_an_openclip_tower_with_a_narrower_projection_loads(tmp_path):
    """A folder whose OpenCLIP-style text config has a projection_dim other than its width (transformers'
    CLIPTextConfig default is 512, under SD 2's tower 1024 wide) loads, and computes what diffusers does:
    the projection diffusers does not keep is a stand-in of the config's shape."""
    spec = sd2_spec(1)
    spec["clip"]["projection_dim"] = spec["clip"]["hidden_size"] // 2
    pipe = build(spec, tmp_path / "pipe", 1)
    model = load_model(tmp_path / "pipe")
    assert (
        model.config.family == "sd2-eps"
        and model.text_encoder.text_projection.shape[1] == spec["clip"]["projection_dim"]
    )
    check_components(pipe, model, spec, "seed 1, projection_dim half the width")
