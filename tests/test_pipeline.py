"""Generation end to end: pixels equal to diffusers' pipeline, image-to-image and inpainting
invariants, the per-step callback, prompts, PNG parameters, and bad requests."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import randomize, tiny_pipeline
from ldmkit.cli import main
from ldmkit.diffusion.registry import get_sampler
from ldmkit.diffusion.sampling import generators_for
from ldmkit.images import format_infotext, parse_infotext, write_png
from ldmkit.models.ldm import LatentDiffusion
from ldmkit.models.presets import tiny
from ldmkit.models.prompts import encode_prompts, parse_emphasis
from ldmkit.pipelines import Pipeline


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("e2e") / "pipe"
    return tiny_pipeline(folder), folder


@pytest.fixture(scope="module")
def tiny_pipe():
    torch.manual_seed(0)
    return Pipeline(randomize(LatentDiffusion(tiny()), std=0.05), "tiny")


def pixels(im):
    return np.asarray(im, dtype=np.float64)


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m_karras", "ddim"])
def test_ldmkit_generate_png_equals_diffusers(sd_folder, tmp_path, capsys, sampler):
    import diffusers

    pipe, folder = sd_folder
    spec = get_sampler(sampler)
    # The documented way to switch samplers in diffusers: from_config of the folder's scheduler config,
    # whose settings (here PNDM's leading spacing, steps_offset 1) ldmkit follows too.
    saved = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    pipe.scheduler = getattr(diffusers, spec.diffusers_class).from_config(saved, **spec.identity)
    ref = pipe(
        "a red circle above a blue square",
        negative_prompt="blurry",
        num_inference_steps=6,
        guidance_scale=6.0,
        height=16,
        width=16,
        generator=generators_for(1234, 1),
    ).images[0]
    code = main(
        [
            "generate",
            "a red circle above a blue square",
            "--negative-prompt",
            "blurry",
            "--model",
            str(folder),
            "--sampler",
            sampler,
            "--steps",
            "6",
            "--cfg",
            "6",
            "--seed",
            "1234",
            "--width",
            "16",
            "--height",
            "16",
            "--prompt-mode",
            "truncate",
            "-q",
            "-o",
            str(tmp_path / "ours.png"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    ours = Image.open(tmp_path / "ours.png")
    assert ours.size == ref.size
    assert pixels(ref).std() > 5  # a real picture, not a flat one
    assert np.abs(pixels(ours) - pixels(ref)).mean() <= 1.0  # mean difference <= 1/255
    info = ours.info["parameters"]
    assert "Seed: 1234" in info and "Size: 16x16" in info and f"ldmkit sampler: {sampler}" in info


def test_webui_prompt_mode_equals_truncation_for_a_plain_short_prompt(sd_folder):
    _, folder = sd_folder
    pipe = Pipeline.load(folder)
    a = pipe("a red circle, above a blue square", steps=3, seed=5, width=16, height=16, prompt_mode="webui")
    b = pipe("a red circle, above a blue square", steps=3, seed=5, width=16, height=16, prompt_mode="truncate")
    assert torch.equal(a.latents, b.latents)


def test_img2img_strength_zero_returns_the_vae_round_trip(tiny_pipe):
    src = tiny_pipe("a cat", steps=4, seed=1, width=32, height=32).images[0]
    out = tiny_pipe("a dog", init_image=src, strength=0.0, seed=9, steps=4)
    vae = tiny_pipe.model.vae
    from ldmkit.images import pil_to_tensor, tensor_to_pil

    with torch.no_grad():
        z = vae.scale(vae.encode(pil_to_tensor(src, 32, 32)).sample(generators_for(9, 1)[0]))
        expected = tensor_to_pil(vae.decode(vae.unscale(z)))[0]
    assert np.abs(pixels(out.images[0]) - pixels(expected)).max() <= 1


def test_img2img_runs_the_last_fraction_of_the_steps(tiny_pipe):
    src = tiny_pipe("a cat", steps=4, seed=1, width=32, height=32).images[0]
    seen = []
    tiny_pipe(
        "a dog", init_image=src, strength=0.5, seed=9, steps=10, sampler="euler", callback=lambda s: seen.append(s)
    )
    assert len(seen) == 5


def test_latent_blend_inpainting_keeps_unmasked_latents_and_pixels(tiny_pipe):
    src = tiny_pipe("a cat", steps=4, seed=1, width=32, height=32).images[0]
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    for sampler in ("euler_a", "ddim"):  # ddim ends at sigma 0.029, not 0: the final blend still holds
        out = tiny_pipe("a dog", init_image=src, mask=mask, mask_blur=0, strength=1.0, seed=3, steps=6, sampler=sampler)
        from ldmkit.images import pil_to_tensor

        vae = tiny_pipe.model.vae
        with torch.no_grad():
            z_init = vae.scale(vae.encode(pil_to_tensor(src, 32, 32)).sample(generators_for(3, 1)[0]))
        keep = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
        keep[..., 4:12, 4:12] = True
        assert torch.equal(out.latents[~keep.expand_as(out.latents)], z_init[~keep.expand_as(z_init)])
        assert not torch.allclose(out.latents[keep.expand_as(out.latents)], z_init[keep.expand_as(z_init)])
        outside = np.ones((32, 32), dtype=bool)
        outside[8:24, 8:24] = False
        assert np.abs(pixels(out.images[0])[outside] - pixels(src)[outside]).max() <= 1


def test_nine_channel_inpainting_model(tmp_path):
    config = tiny()
    config.unet.in_channels = 9
    pipe = Pipeline(randomize(LatentDiffusion(config), std=0.05), "tiny-inpaint")
    src = Image.new("RGB", (32, 32), (200, 30, 30))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    out = pipe("a blue square", init_image=src, mask=mask, mask_blur=0, steps=3, seed=1)
    assert np.abs(pixels(out.images[0])[:, 16:] - pixels(src)[:, 16:]).max() <= 1
    assert np.abs(pixels(out.images[0])[:, :16] - pixels(src)[:, :16]).mean() > 1
    from ldmkit.errors import ConfigError

    with pytest.raises(ConfigError, match="inpaint_blend: tiny-inpaint is an inpainting model: the mask is its input"):
        pipe("a blue square", init_image=src, mask=mask, steps=1, inpaint_blend="noised")


def test_the_two_inpainting_blends_keep_the_unmasked_region_and_say_which_ran(tiny_pipe):
    """Both blends end with the original latents outside the mask; with an ancestral sampler they differ
    inside it (for ODE samplers the original noised to each sigma is what a replaced prediction leads to,
    so the two coincide), the diffusers one is written into the infotext and read back, and nonsense is
    refused in one line."""
    from ldmkit.errors import ConfigError
    from ldmkit.pipelines.params import GenerationParams, from_infotext

    src = tiny_pipe("a cat", steps=4, seed=1, width=32, height=32).images[0]
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    kw = dict(init_image=src, mask=mask, mask_blur=0, strength=0.8, seed=3, steps=5, sampler="euler_a")
    web, diff = (tiny_pipe("a dog", **kw, inpaint_blend=b) for b in ("denoised", "noised"))
    keep = torch.ones(1, 4, 16, 16, dtype=torch.bool)
    keep[..., 4:12, 4:12] = False
    assert torch.equal(web.latents[keep], diff.latents[keep])
    assert (web.latents[~keep] - diff.latents[~keep]).abs().max() > 1e-2
    assert "Inpaint blend: noised" in diff.infotexts[0] and "Inpaint blend" not in web.infotexts[0]
    assert from_infotext(diff.infotexts[0])[0]["inpaint_blend"] == "noised"
    with pytest.raises(ConfigError, match="inpaint_blend: 'latents'; allowed: denoised, noised"):
        GenerationParams(prompt="x", init_image=src, mask=mask, inpaint_blend="latents")


def test_callback_sees_every_step_with_a_preview(tiny_pipe):
    seen = []
    tiny_pipe("a cat", steps=5, seed=2, width=32, height=32, sampler="heun", callback=seen.append)
    assert [s.step for s in seen] == [1, 2, 3, 4, 5] and seen[-1].steps == 5
    preview = seen[0].preview()
    assert len(preview) == 1 and preview[0].size == (32, 32)


def test_batch_seeds_and_infotexts(tiny_pipe):
    out = tiny_pipe(
        "a cat", negative_prompt="dog", steps=2, seed=10, batch=3, width=32, height=32, sampler="ddim", eta=0.5
    )
    assert out.seeds == [10, 11, 12]
    prompt, negative, fields = parse_infotext(out.infotexts[2])
    assert (prompt, negative) == ("a cat", "dog")
    assert fields["Seed"] == "12" and fields["Sampler"] == "DDIM" and fields["Eta DDIM"] == "0.5"
    single = tiny_pipe("a cat", negative_prompt="dog", steps=2, seed=11, width=32, height=32, sampler="ddim", eta=0.5)
    assert (out.latents[1] - single.latents[0]).abs().max() <= 1e-4


def test_a_list_of_prompts_is_one_image_each(tiny_pipe):
    prompts = ["a cat", "a red dog", "a cat"]
    out = tiny_pipe(prompts, steps=2, seed=5, width=32, height=32, sampler="euler_a")
    assert out.seeds == [5, 6, 7] and [parse_infotext(t)[0] for t in out.infotexts] == prompts
    scale = out.latents.abs().max()  # sigma_max-sized: a batch of 3 vs of 1 differs only in float rounding
    for i, prompt in enumerate(prompts):
        single = tiny_pipe(prompt, steps=2, seed=5 + i, width=32, height=32, sampler="euler_a")
        assert (out.latents[i] - single.latents[0]).abs().max() <= 1e-5 * scale, i
    same = tiny_pipe(["a cat"] * 3, steps=2, seed=5, width=32, height=32, sampler="euler_a")
    batch = tiny_pipe("a cat", batch=3, steps=2, seed=5, width=32, height=32, sampler="euler_a")
    assert torch.equal(same.latents, batch.latents)
    assert (out.latents[0] - out.latents[1]).abs().max() > 1e-2  # the prompts really differ
    from ldmkit.errors import ConfigError

    with pytest.raises(ConfigError, match="one image each"):
        tiny_pipe(prompts, batch=2, steps=1, width=32, height=32)
    with pytest.raises(ConfigError, match="non-empty list"):
        tiny_pipe([], steps=1, width=32, height=32)


# --- prompts ---------------------------------------------------------------------------------------


def test_emphasis_parsing():
    def parsed(p):
        return [(f.text, round(f.weight, 4)) for f in parse_emphasis(p)]

    assert parsed("a (red:1.5) circle") == [("a ", 1.0), ("red", 1.5), (" circle", 1.0)]
    assert parsed("((big)) [small]") == [("big", 1.21), (" ", 1.0), ("small", 0.9091)]
    assert parsed(r"a \(literal\) [x:2]") == [("a (literal) ", 1.0), ("x:2", 0.9091)]
    assert parsed("one BREAK two") == [("one", 1.0), ("BREAK", -1.0), ("two", 1.0)]
    assert parsed("(a (b:2) c)") == [("a ", 1.1), ("b", 2.2), (" c", 1.1)]


def test_unbalanced_brackets_warn_and_read_as_the_web_ui(caplog):
    assert [(f.text, f.weight) for f in parse_emphasis("stray) closer")] == [("stray) closer", 1.0)]
    assert [(f.text, round(f.weight, 2)) for f in parse_emphasis("open (rest")] == [("open ", 1.0), ("rest", 1.1)]
    assert "unbalanced bracket" in caplog.text


def test_weights_long_prompts_and_break(tiny_pipe):
    te = tiny_pipe.model.text_encoder
    plain = encode_prompts(te, ["a red circle"]).context
    same = encode_prompts(te, ["a (red:1.0) circle"]).context
    weighted = encode_prompts(te, ["a (red:1.5) circle"]).context
    assert torch.equal(plain, same)
    assert (weighted - plain).abs().max() > 1e-3
    assert torch.allclose(weighted.mean(), plain.mean(), atol=1e-5)  # the web UI keeps the mean
    long = "a red circle above a blue square, " * 12  # > 75 tokens
    ctx, unc = encode_prompts(te, [long], ["blurry"])[:2]
    assert ctx.shape[1] == 154 and unc.shape[1] == 154  # negative padded to the same chunk count
    broken = encode_prompts(te, ["a red circle BREAK a blue square"]).context
    assert broken.shape[1] == 154
    truncated = encode_prompts(te, [long], mode="truncate").context
    assert truncated.shape[1] == 77


# --- PNG parameters and the CLI ------------------------------------------------------------------


def test_infotext_roundtrip():
    text = format_infotext("a, b: c", "d", {"Steps": 20, "CFG scale": 7.0, "Model": "x, y", "Seed": 1})
    assert text == 'a, b: c\nNegative prompt: d\nSteps: 20, CFG scale: 7, Model: "x, y", Seed: 1'
    assert parse_infotext(text) == ("a, b: c", "d", {"Steps": "20", "CFG scale": "7", "Model": "x, y", "Seed": "1"})


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    assert main(["init-model", str(path)]) == 0
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_from_png_reproduces_ldmkit_images(tiny_file, tmp_path, capsys):
    code, out, _ = run(
        capsys,
        "generate",
        "a (red:1.2) circle",
        "--model",
        tiny_file,
        "--steps",
        "4",
        "--seed",
        "7",
        "--batch",
        "2",
        "--sampler",
        "euler_a",
        "-q",
        "-o",
        tmp_path / "a.png",
    )
    assert code == 0 and json.loads(out)["written"] == [str(tmp_path / "a-7.png"), str(tmp_path / "a-8.png")]
    code, _, err = run(
        capsys, "generate", "--from-png", tmp_path / "a-8.png", "--model", tiny_file, "-q", "-o", tmp_path / "b.png"
    )
    assert code == 0 and "warning" not in err
    # Image 2 of a batch, regenerated alone: equal up to the float rounding batch size changes.
    diff = np.abs(pixels(Image.open(tmp_path / "a-8.png")) - pixels(Image.open(tmp_path / "b.png")))
    assert diff.max() <= 1 and diff.mean() < 0.05
    # Regenerated at its own batch size: identical.
    code, _, _ = run(
        capsys, "generate", "--from-png", tmp_path / "b.png", "--model", tiny_file, "-q", "-o", tmp_path / "c.png"
    )
    assert code == 0
    assert np.array_equal(pixels(Image.open(tmp_path / "b.png")), pixels(Image.open(tmp_path / "c.png")))


def test_from_png_of_another_tool_warns_and_maps_its_sampler(tiny_file, tmp_path, capsys):
    text = (
        "a cat\nNegative prompt: dog\nSteps: 3, Sampler: DPM++ 2M Karras, CFG scale: 5, Seed: 3, Size: 32x32, Model: x"
    )
    write_png(tmp_path / "webui.png", Image.new("RGB", (32, 32)), text)
    code, out, err = run(
        capsys, "generate", "--from-png", tmp_path / "webui.png", "--model", tiny_file, "-q", "-o", tmp_path / "c.png"
    )
    assert code == 0 and "warning:" in err and "will differ" in err
    _, _, fields = parse_infotext(Image.open(tmp_path / "c.png").info["parameters"])
    assert fields["ldmkit sampler"] == "dpmpp_2m_karras" and fields["Size"] == "32x32" and fields["Seed"] == "3"


def one_line_error(code, err, *needles):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0]


def test_bad_requests(tiny_file, tmp_path, capsys):
    base = ["generate", "a cat", "--model", tiny_file, "-q", "-o", tmp_path / "x.png"]
    one_line_error(
        *run(capsys, *base, "--sampler", "nope")[::2], "unknown sampler 'nope'", "euler_a", "dpmpp_2m_karras"
    )
    one_line_error(*run(capsys, *base, "--steps", "0")[::2], "steps")
    one_line_error(*run(capsys, *base, "--width", "60")[::2], "width: 60", "multiple of 8")
    img = tmp_path / "init.png"
    Image.new("RGB", (32, 32)).save(img)
    Image.new("L", (16, 16)).save(tmp_path / "small-mask.png")
    one_line_error(
        *run(capsys, *base, "--init-image", img, "--mask", tmp_path / "small-mask.png")[::2], "mask is 16x16", "32x32"
    )
    one_line_error(*run(capsys, *base, "--init-image", tmp_path / "missing.png")[::2], "missing.png", "no such file")
    one_line_error(*run(capsys, *base, "--mask", tmp_path / "small-mask.png")[::2], "--mask needs --init-image")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    one_line_error(*run(capsys, *base, "--init-image", tmp_path / "broken.png")[::2], "not a readable image")
    one_line_error(*run(capsys, *base, "--strength", "1.5", "--init-image", img)[::2], "strength")
    assert not (tmp_path / "x.png").exists()
    code, out, err = run(
        capsys, "generate", "a (cat", "--model", tiny_file, "--steps", "1", "-q", "-o", tmp_path / "y.png"
    )
    assert code == 0 and "warning: unbalanced bracket" in err and (tmp_path / "y.png").exists()


def test_large_images_decode_whole_unless_memory_requires_bands(tiny_pipe, monkeypatch):
    """Whole, as the reference decodes, at any size the machine can hold; in bands (the same image
    within float rounding) when asked, or when a whole pass would not fit in free memory."""
    from ldmkit.images import tensor_to_pil
    from ldmkit.pipelines import codec

    pipe = tiny_pipe
    vae = pipe.model.vae
    big = pipe("a red circle", steps=2, seed=1, width=128, height=128)  # twice the model's side
    assert pipe.vae_tile(big.latents) is None
    with torch.no_grad():
        whole = vae.decode(vae.unscale(big.latents))
        banded = vae.decode(vae.unscale(big.latents), 32)
    assert pixels(big.images[0]).tolist() == pixels(tensor_to_pil(whole)[0]).tolist()
    assert (banded - whole).abs().max() <= 1e-5
    need = codec.estimate_vae_bytes(vae, big.latents)
    assert need == 4 * 32 * 128 * 128 * 4  # the tiny model's widest map: 32 channels upsampled to full size, fp32
    monkeypatch.setattr(codec, "available_memory", lambda: need - 1)
    assert pipe.vae_tile(big.latents) == 32
    again = pipe("a red circle", steps=2, seed=1, width=128, height=128).images[0]
    assert pixels(again).tolist() == pixels(tensor_to_pil(banded)[0]).tolist()
    pipe.tiled_vae = False  # never, whatever memory says
    try:
        assert pipe.vae_tile(big.latents) is None
    finally:
        pipe.tiled_vae = None
    monkeypatch.undo()
    pipe.tiled_vae = True
    try:
        assert pipe.vae_tile(torch.zeros(1, 4, 48, 48)) == 32
    finally:
        pipe.tiled_vae = None


def test_bf16_path_stays_close_to_fp32_and_leaves_global_state_alone(tmp_path):
    from ldmkit.models.precision import bf16_supported

    assert main(["init-model", str(tmp_path / "m.safetensors")]) == 0
    precision = torch.get_float32_matmul_precision()
    fp32 = Pipeline.load(tmp_path / "m.safetensors")
    bf16 = Pipeline.load(tmp_path / "m.safetensors", precision="bf16")
    assert Pipeline.load(tmp_path / "m.safetensors", precision="auto").precision == "fp32"  # small: no gain
    assert next(bf16.model.unet.parameters()).dtype == torch.bfloat16
    assert next(bf16.model.text_encoder.parameters()).dtype == torch.float32
    # layouts by measurement: channels-last for a bf16 UNet, the default for an fp32 one
    assert bf16.model.unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not fp32.model.unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([900, 50]), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        a = fp32.model.unet(x, t, ctx)
        b = bf16.model.unet(x.bfloat16(), t, ctx.bfloat16()).float()
    # bf16 keeps 8 mantissa bits: one UNet call within 3% of the output's scale
    assert (a - b).abs().max() <= 0.03 * a.abs().max()
    a = fp32("a red circle", steps=4, seed=2, width=32, height=32)
    b = bf16("a red circle", steps=4, seed=2, width=32, height=32)
    assert "Precision: bf16" in b.infotexts[0] and "Precision" not in a.infotexts[0]
    assert (a.latents - b.latents).abs().max() <= 0.05 * a.latents.abs().max()
    assert torch.get_float32_matmul_precision() == precision
    assert bf16_supported() in (True, False)


@pytest.mark.slow
def test_compiled_unet_gives_the_eager_result(tmp_path):
    """Slow: inductor compiles for tens of seconds."""
    assert main(["init-model", str(tmp_path / "m.safetensors")]) == 0
    eager = Pipeline.load(tmp_path / "m.safetensors")
    compiled = Pipeline.load(tmp_path / "m.safetensors")
    compiled.compile()
    before = torch.get_float32_matmul_precision()
    a = eager("a red circle", steps=3, seed=1, width=32, height=32)
    b = compiled("a red circle", steps=3, seed=1, width=32, height=32)
    assert (a.latents - b.latents).abs().max() <= 1e-3 * a.latents.abs().max()
    assert torch.get_float32_matmul_precision() == before
    assert set(compiled.model.state_dict()) == set(eager.model.state_dict())


def test_feature_cache_runs_the_deep_blocks_every_nth_step_and_round_trips(tiny_file, tmp_path, capsys):
    pipe = Pipeline.load(tiny_file)
    middle = []
    pipe.model.unet.middle_block.register_forward_hook(lambda *a: middle.append(1))
    plain = pipe("a red circle", steps=5, seed=1, sampler="euler", cfg=3.0)
    assert len(middle) == 5 and "Feature cache" not in plain.infotexts[0]
    middle.clear()
    cached = pipe("a red circle", steps=5, seed=1, sampler="euler", cfg=3.0, feature_cache=2)
    assert len(middle) == 3  # calls 0, 2, 4 (a guidance pair is one call)
    assert "Feature cache: 2" in cached.infotexts[0]
    assert not torch.equal(cached.latents, plain.latents)
    code, _, _ = run(
        capsys, "generate", "a red circle", "--model", tiny_file, "--steps", "4", "--seed", "3", "--feature-cache",
        "3", "-q", "-o", tmp_path / "a.png",
    )  # fmt: skip
    assert code == 0
    code, _, _ = run(
        capsys, "generate", "--from-png", tmp_path / "a.png", "--model", tiny_file, "-q", "-o", tmp_path / "b.png"
    )
    assert code == 0 and np.array_equal(pixels(Image.open(tmp_path / "a.png")), pixels(Image.open(tmp_path / "b.png")))
    code, _, err = run(capsys, "generate", "x", "--model", tiny_file, "--feature-cache", "0", "-q")
    one_line_error(code, err, "feature cache interval 0", "allowed: 1 or more")
