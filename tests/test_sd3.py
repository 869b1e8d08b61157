"""Whole SD3 generations equal to diffusers' StableDiffusion3Pipeline on random tiny pipelines: the
transformer's configuration drawn as tests/test_mmdit.py draws it, the three text towers as
tests/test_sd3_text.py does, a 16-channel autoencoder with its scale and shift, a FlowMatch scheduler
config with a drawn shift. Saved by diffusers, loaded by ldmkit from the folder; text-to-image and
image-to-image, with and without T5, flow Euler and flow Heun, within 1/255 mean on the same seed.
Replay a failure with its printed seed: `python -m pytest tests/test_sd3.py -m slow -k "seed-7]"`."""

import random

import numpy as np
import pytest
from PIL import Image
from test_mmdit import draw as draw_transformer
from test_sd3_text import clip_tokenizer, t5_tokenizer  # noqa: F401  (a fixture)
from test_sd3_text import draw as draw_towers

from conftest import randomize
from ldmkit.diffusion.sampling import generators_for
from ldmkit.pipelines import Pipeline

PROMPTS = ["a red circle above a blue square", "an astronaut riding a horse, oil painting"]


def draw(seed: int) -> dict:
    r = random.Random(seed)
    towers = draw_towers(seed)
    transformer = draw_transformer(seed)
    transformer.update(in_channels=16, out_channels=16, joint_attention_dim=towers["t5"]["d_model"])
    transformer["pooled_projection_dim"] = towers["clip_l"]["projection_dim"] + towers["clip_g"]["projection_dim"]
    scheduler = {"shift": r.choice([1.0, 3.0]), "t5": r.random() < 0.7}
    # a 16-pixel image (a multiple of 8) at least must fit the table: a second VAE level halves the latent
    levels = r.randint(1, 2) if transformer["pos_embed_max_size"] * transformer["patch_size"] >= 8 else 2
    return dict(towers=towers, transformer=transformer, scheduler=scheduler, vae_levels=levels)


def build(spec: dict, folder, seed: int, t5_tok, with_t5: bool = True):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from test_mmdit import reference
    from test_sd3_text import random_towers

    towers, t5 = random_towers(spec["towers"], t5_tok, seed, with_t5)
    n = spec["vae_levels"]
    vae = AutoencoderKL(
        block_out_channels=[8 * (i + 1) for i in range(n)], down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n, latent_channels=16, norm_num_groups=8, layers_per_block=1,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    transformer = reference(spec["transformer"], seed)
    assert isinstance(transformer, SD3Transformer2DModel)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=spec["scheduler"]["shift"]),
        vae=randomize(vae, seed=seed + 3),
        text_encoder=towers[0],
        tokenizer=clip_tokenizer("<|endoftext|>"),
        text_encoder_2=towers[1],
        tokenizer_2=clip_tokenizer("!"),
        text_encoder_3=t5,
        tokenizer_3=t5_tok if with_t5 else None,
    )
    pipe.save_pretrained(str(folder))
    return pipe


def side_of(spec: dict) -> int:
    """The largest side (a multiple of 8) whose latent the transformer's position table covers, in pixels."""
    tr = spec["transformer"]
    f = 2 ** (spec["vae_levels"] - 1)
    return tr["pos_embed_max_size"] * tr["patch_size"] * f // 8 * 8


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def check(seed: int, t5_tok, tmp_path, sampler: str, img2img: bool) -> None:
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FlowMatchHeunDiscreteScheduler,
        StableDiffusion3Img2ImgPipeline,
    )

    spec = draw(seed)
    with_t5 = spec["scheduler"]["t5"]
    pipe = build(spec, tmp_path / "sd3", seed, t5_tok, with_t5)
    if sampler == "dpmpp_2m":
        from test_flow import reference

        pipe.scheduler = reference("dpmpp_2m", {"shift": spec["scheduler"]["shift"]})
    else:
        cls = FlowMatchEulerDiscreteScheduler if sampler == "euler" else FlowMatchHeunDiscreteScheduler
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    side = side_of(spec)
    where = f"seed {seed}, {sampler}, {'img2img' if img2img else 'txt2img'}, T5 {with_t5}, {side}px: {spec}"
    ours = Pipeline.load(tmp_path / "sd3", precision="fp32")
    kw = dict(negative_prompt="blurry", steps=6, cfg=5.0, sampler=sampler, seed=3, width=side, height=side)
    ref_kw = dict(negative_prompt="blurry", num_inference_steps=6, guidance_scale=5.0, width=side, height=side)
    if img2img:
        rng = np.random.default_rng(seed)
        picture = Image.fromarray(rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)).resize((side, side), Image.BICUBIC)
        kw.update(init_image=picture, strength=0.7)
        ref_kw.update(image=picture, strength=0.7)
        pipe = StableDiffusion3Img2ImgPipeline(**pipe.components)
    out = ours(PROMPTS[1], **kw)
    ref = pipe(PROMPTS[1], generator=generators_for(3, 1), output_type="latent", **ref_kw).images
    scale = float(ref.abs().max())
    gap = float((out.latents - ref).abs().max())
    assert gap <= 1e-4 * max(1.0, scale), f"{where}: latents differ by {gap:.2e} (of {scale:.2f})"
    image = pipe(PROMPTS[1], generator=generators_for(3, 1), **ref_kw).images[0]
    diff = np.abs(pixels(out.images[0]) - pixels(image))
    assert diff.mean() <= 1.0, f"{where}: {diff.mean():.2f}/255"


CASES = [(5, "euler", False), (7, "heun", False), (11, "euler", True), (13, "dpmpp_2m", False)]


@pytest.mark.parametrize(("seed", "sampler", "img2img"), CASES)
def test_random_sd3_pipelines_equal_diffusers(seed, sampler, img2img, t5_tokenizer, tmp_path):  # noqa: F811
    check(seed, t5_tokenizer, tmp_path, sampler, img2img)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 120))
def test_many_random_sd3_pipelines_equal_diffusers(seed, t5_tokenizer, tmp_path):  # noqa: F811
    for sampler in ("euler", "heun"):
        for img2img in (False, True):
            check(seed, t5_tokenizer, tmp_path / f"{sampler}-{img2img}", sampler, img2img)
    check(seed, t5_tokenizer, tmp_path / "dpmpp_2m", "dpmpp_2m", False)  # diffusers' SD3 img2img cannot run it


def test_a_prompt_over_t5s_limit_is_truncated_and_said(t5_tokenizer, tmp_path):  # noqa: F811
    """As diffusers, T5 reads the first 256 tokens; the result says, in one line, how many were dropped."""
    spec = draw(5)
    build(spec, tmp_path / "sd3", 5, t5_tokenizer, with_t5=True)
    ours = Pipeline.load(tmp_path / "sd3", precision="fp32")
    side = side_of(spec)
    long = " ".join(["a red circle above a blue square"] * 60)
    out = ours(long, negative_prompt="blurry", steps=1, seed=0, width=side, height=side)
    notes = [w for w in out.warnings if "T5 reads its first 256 tokens" in w]
    assert len(notes) == 1 and notes[0].startswith("prompt 1:") and "dropped" in notes[0] and "\n" not in notes[0]
    assert not ours("a red circle", steps=1, seed=0, width=side, height=side).warnings


def test_the_web_ui_api_serves_sd3(t5_tokenizer, tmp_path):  # noqa: F811
    """txt2img and img2img through the web UI's API draw what the Python API draws (the PNG's bytes
    aside, the same pixels), with SD3's defaults (Euler, CFG 7) where the request leaves them out."""
    import base64
    import io
    import json

    from fastapi.testclient import TestClient

    from ldmkit.server.app import ServeConfig, create_app

    spec = draw(5)
    build(spec, tmp_path / "models" / "sd3", 5, t5_tokenizer, with_t5=True)
    side = side_of(spec)
    app = create_app(ServeConfig(str(tmp_path / "models" / "sd3"), models_dir=str(tmp_path / "models")))
    app.state.ready.result()
    body = {"prompt": PROMPTS[0], "negative_prompt": "blurry", "steps": 3, "seed": 2, "width": side, "height": side}
    picture = Image.new("RGB", (side, side), (200, 40, 40))
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    init = {"init_images": [base64.b64encode(buf.getvalue()).decode()], "denoising_strength": 0.6}
    with TestClient(app) as client:
        txt = client.post("/sdapi/v1/txt2img", json=body)
        img = client.post("/sdapi/v1/img2img", json={**body, **init})
    assert txt.status_code == img.status_code == 200, (txt.text, img.text)
    info = json.loads(txt.json()["info"])["infotexts"][0]
    assert "Sampler: Euler," in info and "CFG scale: 7," in info
    ours = Pipeline.load(tmp_path / "models" / "sd3", precision="fp32")
    kw = dict(negative_prompt="blurry", steps=3, seed=2, width=side, height=side)
    for response, want in (
        (txt, ours(PROMPTS[0], **kw)),
        (img, ours(PROMPTS[0], **kw, init_image=picture, strength=0.6)),
    ):
        got = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
        diff = np.abs(pixels(got) - pixels(want.images[0]))
        assert diff.mean() <= 0.5, diff.mean()
