"""SDXL inpainting equal to diffusers' StableDiffusionXLInpaintPipeline on random tiny models: an ordinary
(4-channel) UNet blending its latents with the noised original after every step (`inpaint_blend="noised"`),
and a 9-channel inpainting UNet that takes the mask and the masked image's latents as input. The same
seed draws the same posterior samples and noise as diffusers' generators, so whole generations agree;
ours then pastes the original pixels back outside the mask, which diffusers leaves to its caller."""

import numpy as np
import pytest
from PIL import Image
from test_sdxl import PROMPTS, build, draw

from ldmkit.diffusion.sampling import generators_for
from ldmkit.pipelines import Pipeline


def picture_and_mask(side: int, seed: int) -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(seed)
    smooth = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)  # a blurry picture, as a VAE meets them
    picture = Image.fromarray(smooth).resize((side, side), Image.BICUBIC)
    mask = Image.new("L", (side, side), 0)
    mask.paste(255, (side // 4, side // 8, side * 3 // 4, side * 5 // 8))
    return picture, mask


def made(tmp_path, channels: int, sampler: str, seed: int = 2):
    import diffusers

    from ldmkit.diffusion.registry import get_sampler

    spec = draw(seed)
    assert not spec["refiner"]
    spec["unet"]["in_channels"] = channels
    pipe = build(spec, tmp_path / "model", seed)
    s = get_sampler(sampler)
    pipe.scheduler = getattr(diffusers, s.diffusers_class).from_config(pipe.scheduler.config, **s.identity)
    pipe.save_pretrained(str(tmp_path / "model"))
    side = 2 * spec["unet"]["sample_size"] * 2 ** (spec["vae_levels"] - 1)
    return diffusers.StableDiffusionXLInpaintPipeline(**pipe.components), side + (-side % 8)


def compare(tmp_path, channels: int, sampler: str, strength: float, blend: str, seed: int = 2) -> None:
    ref_pipe, side = made(tmp_path, channels, sampler, seed)
    picture, mask = picture_and_mask(side, 7)
    ours = Pipeline.load(tmp_path / "model", precision="fp32")
    kw = dict(negative_prompt="blurry", steps=8, cfg=5.0, sampler=sampler, seed=4, width=side, height=side)
    blending = {"inpaint_blend": blend} if channels == 4 else {}
    out = ours(PROMPTS[0], init_image=picture, mask=mask, mask_blur=0, strength=strength, **kw, **blending)
    ref_kw = dict(image=picture, mask_image=mask, strength=strength, width=side, height=side, guidance_scale=5.0)
    ref_kw.update(negative_prompt="blurry", num_inference_steps=8)
    walked = []  # diffusers' latents after each step

    def step_end(pipe, i, t, tensors):
        walked.append(float(tensors["latents"].abs().max()))
        return tensors

    ref = ref_pipe(
        PROMPTS[0], generator=generators_for(4, 1), output_type="latent", callback_on_step_end=step_end, **ref_kw
    ).images
    # The tolerance is relative to the size of the numbers computed. A clipping sampler (DDIM's clip_sample)
    # caps the final latents at ±1 while the walk to them computed with latents up to ~3 (drawn seed 192:
    # 1.5e-5 apart after the first step, growing to 8e-5 at the last, smoothly); then the walk's largest
    # latent is the scale.
    scale = float(ref.abs().max())
    if ref_pipe.scheduler.config.get("clip_sample"):
        scale = max([scale, *walked])
    gap = float((out.latents - ref).abs().max())
    assert gap <= 1e-4 * scale, f"seed {seed}, {sampler} at {strength}: latents differ by {gap:.2e} (of {scale:.2f})"
    image = ref_pipe(PROMPTS[0], generator=generators_for(4, 1), **ref_kw).images[0]
    inside = np.asarray(mask) >= 128
    ours_px, ref_px = (np.asarray(x, dtype=np.float64) for x in (out.images[0], image))
    diff = np.abs(ours_px - ref_px)[inside]
    assert diff.mean() <= 1.0, f"seed {seed}, {sampler} at {strength}: {diff.mean():.2f}/255 inside the mask"
    assert np.array_equal(ours_px[~inside], np.asarray(picture, dtype=np.float64)[~inside])


@pytest.mark.parametrize(("sampler", "strength"), [("euler_a", 0.9999), ("dpmpp_2m", 1.0)])
def test_an_ordinary_model_inpaints_as_diffusers(tmp_path, sampler, strength):
    compare(tmp_path, 4, sampler, strength, "noised")


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_an_inpainting_model_inpaints_as_diffusers(tmp_path, strength):
    compare(tmp_path, 9, "euler", strength, "denoised")


SAMPLERS = ["ddpm", "ddim", "plms", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras", "unipc", "lcm"]
# Not PLMS below full strength: diffusers cuts PNDM's timestep list (whose second timestep is doubled for
# the warm-up) by position and counts steps with a counter, so from an image its calls fall out of step
# with its timesteps (at strength 0.5 of 8 steps the latent of t=376 is evaluated at t=251); ldmkit
# runs PLMS's own warm-up on the steps that remain.
CASES = [(s, strength) for s in SAMPLERS for strength in (1.0, 0.9999, 0.5) if s != "plms" or strength == 1.0]
# configurations drawn at random (test_sdxl.draw), base models only: one per case
SEEDS = [s for s in range(100, 200) if not draw(s)["refiner"]]


@pytest.mark.slow
@pytest.mark.parametrize(("case", "seed"), list(zip(CASES, SEEDS)))
def test_all_ten_samplers_inpaint_as_diffusers(tmp_path, case, seed):
    compare(tmp_path, 4, *case, "noised", seed)


@pytest.mark.slow
@pytest.mark.parametrize(("sampler", "seed"), list(zip(["euler_a", "dpmpp_2m", "ddim"] * 3, SEEDS[-9:])))
def test_every_sampler_with_an_inpainting_model(tmp_path, sampler, seed):
    compare(tmp_path, 9, sampler, 0.9999, "denoised", seed)
