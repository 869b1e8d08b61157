"""Hires fix, by the popular web UI's rules: its target sizes and second-pass step count, its infotext
entries read back by --from-png, the CLI and the API end to end, and the latent path equal to diffusers'
image-to-image pipeline fed the upscaled latents."""

import json

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from conftest import tiny_pipeline
from ldmkit.cli import main
from ldmkit.diffusion.sampling import generators_for
from ldmkit.pipelines import GenerationParams, Pipeline
from ldmkit.pipelines.hires import Target, second_pass_steps, target, upscale_latents
from ldmkit.pipelines.params import from_infotext
from ldmkit.server.app import ServeConfig, create_app


def test_second_pass_steps_as_the_web_ui_counts_them():
    # setup_img2img_steps(p, steps): int(steps / min(strength, 0.999)) in all, the last `steps` of them run
    assert second_pass_steps(20, 0.7) == (28, 20)
    assert second_pass_steps(10, 0.5) == (20, 10)
    assert second_pass_steps(10, 1.0) == (10, 10)  # min(1.0, 0.999): int(10.01) = 10
    assert second_pass_steps(15, 0.3) == (50, 15)
    assert second_pass_steps(20, 0.0) == (0, 0)


def test_target_sizes_as_the_web_ui_computes_them():
    assert target(512, 768, 2.0, 0, 0, 8) == Target(1024, 1536, 0, 0)
    assert target(512, 512, 1.5, 0, 0, 8) == Target(768, 768, 0, 0)
    assert target(512, 768, 2.0, 1024, 0, 8) == Target(1024, 1536, 0, 0)  # one side: the aspect ratio kept
    assert target(512, 768, 2.0, 0, 1152, 8) == Target(768, 1152, 0, 0)
    # both sides: cover 1024x1024 keeping 2:3 (1024x1536), then crop (1536 - 1024) / 8 = 64 latent rows
    assert target(512, 768, 2.0, 1024, 1024, 8) == Target(1024, 1024, 0, 64)
    assert target(768, 512, 2.0, 1024, 1024, 8) == Target(1024, 1024, 64, 0)


def test_hires_reaches_cli_api_and_reads_back(tmp_path, capsys):
    argv = ["generate", "a red circle above a blue square", "--seed", "3", "--steps", "4", "--hires", "2"]
    argv += ["--hires-steps", "3", "--hires-upscaler", "Latent (nearest)", "--strength", "0.6"]
    argv += ["--hires-prompt", 'a green star, "bright"\nabove: all']  # quoted as the web UI quotes
    assert main([*argv, "-q", "-o", str(tmp_path / "cli.png")]) == 0
    first = Image.open(tmp_path / "cli.png")
    assert first.size == (128, 128)
    text = first.info["parameters"]
    assert "Size: 64x64" in text and "Denoising strength: 0.6" in text and "Hires upscale: 2" in text
    assert "Hires steps: 3" in text and "Hires upscaler: Latent (nearest)" in text
    assert 'Hires prompt: "a green star, \\"bright\\"\\nabove: all"' in text
    read, _ = from_infotext(text)
    assert (read["hires_scale"], read["hires_steps"], read["hires_upscaler"]) == (2.0, 3, "Latent (nearest)")
    assert read["hires_prompt"] == 'a green star, "bright"\nabove: all' and "hires_negative_prompt" not in read
    assert main(["generate", "--from-png", str(tmp_path / "cli.png"), "-q", "-o", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "cli.png").read_bytes()
    capsys.readouterr()

    app = create_app(ServeConfig(outputs=str(tmp_path / "outputs")))
    app.state.ready.result()
    body = {"prompt": "a red circle above a blue square", "seed": 3, "steps": 4, "denoising_strength": 0.6}
    body.update(enable_hr=True, hr_scale=2, hr_second_pass_steps=3, hr_upscaler="Latent (nearest)")
    body.update(hr_prompt='a green star, "bright"\nabove: all')
    with TestClient(app) as client:
        answer = client.post("/sdapi/v1/txt2img", json=body)
        same = client.post("/sdapi/v1/txt2img", json={**body, "hr_prompt": ""})
        refused = client.post("/sdapi/v1/txt2img", json={**body, "hr_prompt": "x" * 100_000})
    assert answer.status_code == 200, answer.text
    assert json.loads(answer.json()["info"])["infotexts"][0] == text
    assert "Hires prompt" not in json.loads(same.json()["info"])["infotexts"][0]
    assert same.json()["images"][0] != answer.json()["images"][0]  # the second pass's prompt took effect
    assert refused.status_code == 422 and "hr_prompt: 100000 characters" in refused.text


@pytest.mark.parametrize("upscaler", ["Lanczos", "Latent (bicubic antialiased)"])
def test_hires_sizes_and_refusals(upscaler):
    pipe = Pipeline.load(None)
    out = pipe("a red circle", seed=1, steps=2, hires_width=96, hires_height=128, hires_upscaler=upscaler)
    assert out.images[0].size == (96, 128) and "Hires resize: 96x128" in out.infotexts[0]
    with pytest.raises(Exception, match="text-to-image"):
        GenerationParams(prompt="x", init_image=out.images[0], hires_scale=2)
    with pytest.raises(Exception, match="hires upscaler"):
        GenerationParams(prompt="x", hires_scale=2, hires_upscaler="")
    # a name that is no built-in one may be a model upscaler's (tests/test_upscalers.py): found once the
    # pipeline is known, here with no upscaler folder
    with pytest.raises(Exception, match="hires upscaler 'R-ESRGAN 4x\\+': not a built-in upscaler"):
        pipe("x", hires_scale=2, hires_upscaler="R-ESRGAN 4x+")


@pytest.mark.parametrize("second", [{}, {"hires_prompt": "a green star", "hires_negative_prompt": "red"}])
def test_the_latent_second_pass_equals_diffusers_img2img_fed_latents(tmp_path, second):
    """First pass, our latents upscaled by our rule; then diffusers' img2img pipeline given those latents
    with num_inference_steps and strength that run the same steps of the same schedule as ours, and the
    second pass's own prompts where given."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline

    folder = tmp_path / "pipe"
    ref = tiny_pipeline(folder)
    ours = Pipeline.load(folder)
    settings = dict(prompt="a red circle", negative_prompt="blue", steps=4, cfg=5.0, sampler="euler", seed=11)
    settings.update(width=16, height=16, prompt_mode="truncate")
    first = ours(**settings).latents
    hires = ours(**settings, **second, hires_scale=2, hires_steps=5, strength=0.5)  # 10 steps, the last 5 run
    total, run = second_pass_steps(5, 0.5)
    f = ours.model.config.vae.downsample_factor
    size = GenerationParams(**settings, hires_scale=2).hires_target(f)
    upscaled = upscale_latents(first, size, f, "Latent")
    img2img = StableDiffusionImg2ImgPipeline(**ref.components)
    # the documented way to switch samplers: from_config of the folder's saved config (leading spacing)
    saved = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    img2img.scheduler = EulerDiscreteScheduler.from_config(saved)
    want = img2img(
        second.get("hires_prompt", "a red circle"),
        image=upscaled,
        negative_prompt=second.get("hires_negative_prompt", "blue"),
        strength=run / total,
        num_inference_steps=total,
        guidance_scale=5.0,
        generator=generators_for(11, 1),
        output_type="latent",
    ).images
    assert want.shape == hires.latents.shape and want.abs().mean() > 0.1
    assert (hires.latents - want).abs().max() <= 1e-3, (hires.latents - want).abs().max()
    assert torch.equal(ours(**settings, **second, hires_scale=2, hires_steps=5, strength=0.5).latents, hires.latents)
