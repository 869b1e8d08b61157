"""LCM-LoRA on SD 1.x equal to diffusers, on tiny SD 1.x pipelines whose configuration is drawn at random
(tests/test_random_configs.py's draw: widths, levels, attention, heads, projections, kernels, middle block,
VAE, text tower, tokenizer, scheduler config), and `ldmkit generate --fast FILE`.

The file people use, latent-consistency/lcm-lora-sdv1-5's pytorch_lora_weights.safetensors, has
lcm-lora-sdxl's layout (tests/test_sdxl_lcm.py): a UNet-only LoRA in kohya's key layout on diffusers' module
names (`lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight`), over the layers diffusers' LCM-LoRA
distillation script adapts, in fp16. The file here is written by those rules from diffusers' own module names
(test_sdxl_lcm.lcm_lora_sdxl, which any UNet2DConditionModel takes), not by ldmkit.

diffusers runs it as its LCM-LoRA guide does: LCMScheduler.from_config(the folder's scheduler config),
load_lora_weights(file), 4 steps, guidance 1 (no unconditional pass) and 1.5 (classifier-free guidance: the
LoRA adds no guidance embedding); once more with the LoRA fused into the weights (fuse_lora), as ldmkit
merges it. ldmkit runs sampler "lcm" with loras=[(file, 1)]. Final latents within 1e-4 of their scale (PEFT
adds the update beside each layer, ldmkit merges it, so float32 rounding differs), images within 1/255
mean. Replay a failure with its printed seed: `python -m pytest tests/test_lcm_lora.py -m slow -k "seed-117]"`."""

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_random_configs import build, draw
from test_sdxl_lcm import lcm_lora_sdxl, mean_diff, tolerance

from ldmkit.checkpoints.lora_files import read_lora
from ldmkit.cli import main
from ldmkit.diffusion.sampling import generators_for
from ldmkit.models.tokenizers import EOS
from ldmkit.pipelines import Pipeline

PROMPT = "an astronaut riding a horse, oil painting"
STEPS, GUIDANCES = 4, (1.0, 1.5)


def sd1_spec(seed: int) -> dict:
    """A drawn configuration made SD 1.x's: eps prediction, a CLIP tower padding with its end-of-text token
    (gelu and "!" padding together would make it SD 2's OpenCLIP), and cross-attention in the first level
    when the draw put it nowhere (SD 1.x's prompt reaches its UNet there; without, guidance could not tell)."""
    spec = draw(seed, "epsilon")
    spec["tokenizer"]["pad"] = EOS
    unet = spec["unet"]
    if "CrossAttnDownBlock2D" not in unet["down_block_types"]:
        unet["down_block_types"][0], unet["up_block_types"][-1] = "CrossAttnDownBlock2D", "CrossAttnUpBlock2D"
    return spec


def image_size(spec: dict) -> tuple[int, int]:
    """(width, height): twice the native size, not square, multiples of 8 (test_random_configs' `large`)."""
    native = spec["unet"]["sample_size"] * 2 ** (len(spec["vae"]["block_out_channels"]) - 1)
    side = max(8, 2 * native) + (-max(8, 2 * native) % 8)
    return side, side + 8


def diffusers_runs(pipe, lora, width: int, height: int) -> dict:
    """diffusers' (image, final latents) for each guidance with the LoRA loaded, ("fused", 1.0) with it fused
    into the weights, and ("none", 1.5) without it."""
    from diffusers import LCMScheduler

    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)

    def run(guidance: float):
        kw = dict(num_inference_steps=STEPS, width=width, height=height, guidance_scale=guidance)
        image = pipe(PROMPT, generator=generators_for(3, 1), **kw).images[0]
        return image, pipe(PROMPT, generator=generators_for(3, 1), output_type="latent", **kw).images

    out = {}
    pipe.load_lora_weights(str(lora))
    for g in GUIDANCES:
        out[g] = run(g)
    pipe.fuse_lora()
    out["fused", 1.0] = run(1.0)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    out["none", 1.5] = run(1.5)
    return out


def check(seed: int, tmp_path) -> None:
    torch.manual_seed(seed)
    spec = sd1_spec(seed)
    where = f"seed {seed} ({spec})"
    pipe = build(spec, tmp_path / "pipe", seed)
    lora = tmp_path / "lcm-lora-sdv1-5.safetensors"
    save_file(lcm_lora_sdxl(pipe.unet, seed=seed), str(lora))
    width, height = image_size(spec)
    want = diffusers_runs(pipe, lora, width, height)
    ours = Pipeline.load(tmp_path / "pipe", precision="fp32")
    assert ours.model.config.family == "sd1", f"{where}: read as {ours.model.config.family}"
    read = read_lora(lora, ours.model)
    assert len(read.patches) == len({p.module for p in read.patches}) == len(lcm_lora_sdxl(pipe.unet)) // 3, where
    # The comparisons below can tell: guidance and the LoRA each move diffusers' latents far beyond the bar.
    bar = tolerance(want[1.5][1])
    assert (want[1.5][1] - want[1.0][1]).abs().max() > 10 * bar, f"{where}: guidance hardly changes the latents"
    assert (want[1.5][1] - want["none", 1.5][1]).abs().max() > 10 * bar, f"{where}: the LoRA hardly changes them"
    for key in (*GUIDANCES, ("fused", 1.0)):
        guidance = key if isinstance(key, float) else key[1]
        kw = dict(steps=STEPS, cfg=guidance, sampler="lcm", seed=3, width=width, height=height, prompt_mode="truncate")
        result = ours(PROMPT, loras=[(lora, 1.0)], **kw)
        image, latents = want[key]
        gap = float((result.latents - latents).abs().max())
        assert gap <= tolerance(latents), f"{where}: {key}: final latents differ by {gap:.2e}"
        diff = mean_diff(result.images[0], image)
        assert diff <= 1.0, f"{where}: {key}: images differ by {diff:.2f}/255"
    info = result.infotexts[0]
    assert "Sampler: LCM" in info and f"lcm-lora-sdv1-5: {read.hash}" in info, where


@pytest.mark.parametrize("seed", [1, 2], ids=lambda v: f"seed-{v}")
def test_lcm_lora_on_random_sd1_configs_equals_diffusers(seed, tmp_path):
    check(seed, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 130), ids=lambda v: f"seed-{v}")
def test_lcm_lora_on_many_random_sd1_configs_equals_diffusers(seed, tmp_path):
    check(seed, tmp_path)


# --- ldmkit generate --fast FILE -------------------------------------------------------------------------

SEED = 3


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """A drawn tiny SD 1.x folder, its LCM-LoRA, a LoRA for another drawn architecture, and diffusers' images
    with the LoRA at 4 steps, guidance 1 (what --fast FILE runs) and at 2 steps, guidance 1.5."""
    from diffusers import LCMScheduler

    root = tmp_path_factory.mktemp("lcm-lora")
    spec = sd1_spec(SEED)
    pipe = build(spec, root / "pipe", SEED)
    lora = root / "lcm-lora-sdv1-5.safetensors"
    save_file(lcm_lora_sdxl(pipe.unet, seed=SEED), str(lora))
    other = build(sd1_spec(SEED + 1), root / "other", SEED + 1)
    assert other.unet.config != pipe.unet.config
    save_file(lcm_lora_sdxl(other.unet), str(root / "other-lora.safetensors"))
    width, height = image_size(spec)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(lora))
    want = {
        (steps, g): pipe(
            PROMPT,
            num_inference_steps=steps,
            guidance_scale=g,
            width=width,
            height=height,
            generator=generators_for(SEED, 1),
        ).images[0]
        for steps, g in ((4, 1.0), (2, 1.5))
    }
    return root, lora, (width, height), want


def generate(sd1, out, *args) -> int:
    root, _, (width, height), _ = sd1
    size = ["--width", str(width), "--height", str(height), "--seed", str(SEED), "--prompt-mode", "truncate"]
    return main(["generate", *args, "--model", str(root / "pipe"), *size, "--precision", "fp32", "-q", "-o", str(out)])


def test_fast_with_an_lcm_lora_is_diffusers_lcm_lora_run(sd1, tmp_path):
    """--fast FILE alone: the LoRA at weight 1, lcm, 4 steps, guidance 1 -- diffusers' LCM-LoRA image."""
    _, lora, _, want = sd1
    assert generate(sd1, tmp_path / "fast.png", PROMPT, "--fast", str(lora)) == 0
    image = Image.open(tmp_path / "fast.png")
    assert mean_diff(image.convert("RGB"), want[4, 1.0]) <= 1.0
    info = image.info["parameters"]
    assert "Steps: 4, Sampler: LCM," in info and "CFG scale: 1," in info and "lcm-lora-sdv1-5: " in info, info


def test_settings_given_explicitly_win(sd1, tmp_path):
    """--steps and --cfg given (before or after --fast FILE) are the user's; so is --sampler."""
    _, lora, _, want = sd1
    assert generate(sd1, tmp_path / "a.png", "--fast", str(lora), PROMPT, "--steps", "2", "--cfg", "1.5") == 0
    image = Image.open(tmp_path / "a.png")
    assert mean_diff(image.convert("RGB"), want[2, 1.5]) <= 1.0
    assert "Steps: 2, Sampler: LCM," in image.info["parameters"] and "CFG scale: 1.5," in image.info["parameters"]
    assert generate(sd1, tmp_path / "b.png", PROMPT, "--fast", str(lora), "--sampler", "euler_a") == 0
    info = Image.open(tmp_path / "b.png").info["parameters"]
    assert "Steps: 4, Sampler: Euler a," in info and "CFG scale: 1," in info


def test_fast_alone_keeps_its_bundled_meaning(sd1, tmp_path, capsys):
    """Plain --fast swaps a bundled model for its distilled version; this folder has none, and says so --
    also when --fast comes before the prompt, which argparse then hands --fast as its value."""
    for args in ([PROMPT, "--fast"], ["--fast", PROMPT]):
        assert generate(sd1, tmp_path / "x.png", *args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --fast: a few-step version of ") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.png").exists()


def test_a_file_that_is_no_lcm_lora_for_this_model_is_refused_in_one_line(sd1, tmp_path, capsys):
    """Not a LoRA (a model's weights, bytes that are no checkpoint), a LoRA for another architecture, a
    missing file: one line `error: ...` naming it, exit 2, no image."""
    root, _, _, _ = sd1
    (tmp_path / "noise.safetensors").write_bytes(b"\x00\x01not a checkpoint" * 64)
    cases = {
        str(root / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"): "not a LoRA file",
        str(tmp_path / "noise.safetensors"): "noise.safetensors: not a checkpoint",
        str(root / "other-lora.safetensors"): "a LoRA for another architecture",
        str(tmp_path / "missing.safetensors"): "--fast " + str(tmp_path / "missing.safetensors") + ": no such file",
    }
    for path, needle in cases.items():
        assert generate(sd1, tmp_path / "x.png", PROMPT, "--fast", path) == 2, path
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and len(err.splitlines()) == 1, (path, err)
        assert not (tmp_path / "x.png").exists()
