"""LCM-LoRA on SDXL equal to diffusers, on a random tiny SDXL pipeline made by tests/test_sdxl.py.

The file people use, latent-consistency/lcm-lora-sdxl's pytorch_lora_weights.safetensors, is a UNet-only
LoRA in kohya's key layout on diffusers' module names: `lora_unet_<diffusers module path, dots as
underscores>` with `.lora_down.weight` / `.lora_up.weight` (and an `.alpha` of the rank, or none: scale 1
either way), over the layers diffusers' LCM-LoRA distillation script adapts (its PEFT target_modules,
TARGETS below). The file here is written by those rules from diffusers' own module names, not by ldmkit, in
fp16 (the published file holds 197M parameters in 394 MB: two bytes each).

diffusers runs it as its LCM-LoRA guide does: StableDiffusionXLPipeline, LCMScheduler.from_config(the
folder's scheduler config), load_lora_weights(file), 4 steps, guidance 1 (no unconditional pass) or 1.5
(classifier-free guidance: the LoRA adds no guidance embedding), SDXL's micro-conditioning defaults.
ldmkit runs the same with sampler "lcm", once from Python and once from the command line (--lora FILE
and a <lora:NAME:WEIGHT> tag with --lora-dir). Images within 1/255 mean, as test_sdxl.py, and the final
latents within 1e-4 of their scale, as test_sdxl_personalisation.py's LoRA outputs (measured here: 1e-6
of the scale, identical 8-bit images; guidance 1.5 against 1 moves the latents 150 times the tolerance,
the images by 1/255 only)."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_sdxl import build, draw

from ldmkit.checkpoints.lora_files import read_lora
from ldmkit.cli import main
from ldmkit.diffusion.sampling import generators_for
from ldmkit.pipelines import Pipeline

SEED = 9  # draw(9): a base model, both towers, 3 levels, the first without attention
RANK = 4
PROMPT = "an astronaut riding a horse, oil painting"
STEPS, GUIDANCES = 4, (1.0, 1.5)
# The UNet layers diffusers' LCM-LoRA distillation scripts adapt (their default PEFT target_modules).
TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)


def lcm_lora_sdxl(unet, seed: int = 0, alpha: bool = True) -> dict[str, torch.Tensor]:
    """A random LoRA in lcm-lora-sdxl's layout for a diffusers UNet: each layer PEFT's target_modules
    select (a name equal to a target or ending in "." + target), keyed `lora_unet_` + its diffusers
    name with dots as underscores; down [r, in(, k, k)], up [out, r(, 1, 1)], fp16; alpha the rank
    (scale 1, as the distillation ran with lora_alpha = r) or, with `alpha` False, no alpha keys."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in unet.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if not any(name == t or name.endswith("." + t) for t in TARGETS):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        w = m.weight
        conv = w.ndim == 4
        down = torch.randn((RANK, *w.shape[1:]) if conv else (RANK, w.shape[1]), generator=g) * 0.2
        up = torch.randn((w.shape[0], RANK, 1, 1) if conv else (w.shape[0], RANK), generator=g) * 0.2
        out[f"{key}.lora_down.weight"] = down.half()
        out[f"{key}.lora_up.weight"] = up.half()
        if alpha:
            out[f"{key}.alpha"] = torch.tensor(float(RANK), dtype=torch.float16)
    return out


def image_size(spec: dict) -> tuple[int, int]:
    """(width, height): eight times the native size of these tiny models (a few hundred latent pixels, so
    the mean difference is not of a handful), not square, multiples of 8."""
    native = spec["unet"]["sample_size"] * 2 ** (spec["vae_levels"] - 1)
    width = 8 * native
    return width, width + 8


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """A tiny SDXL base folder, its LCM-LoRA in a LoRA folder, and diffusers' image and final latents at
    each guidance."""
    from diffusers import LCMScheduler

    root = tmp_path_factory.mktemp("sdxl-lcm")
    spec = draw(SEED)
    assert not spec["refiner"] and len(spec["towers"]) == 2
    ref = build(spec, root / "pipe", SEED)
    (root / "loras").mkdir()
    lora = root / "loras" / "lcm-lora-sdxl.safetensors"
    save_file(lcm_lora_sdxl(ref.unet), str(lora))
    width, height = image_size(spec)
    ref.scheduler = LCMScheduler.from_config(ref.scheduler.config)
    ref.load_lora_weights(str(lora))

    def run(guidance: float, output_type: str = "pil"):
        kw = dict(num_inference_steps=STEPS, width=width, height=height, output_type=output_type)
        return ref(PROMPT, guidance_scale=guidance, generator=generators_for(3, 1), **kw).images[0]

    want = {g: (run(g), run(g, "latent")) for g in GUIDANCES}
    # Guidance 1.5 moves these tiny random models' images by about 1/255 only, within the bar, so the
    # final latents are compared too, and guided and unguided ones must differ well beyond their
    # tolerance: a run that skipped (or added) the unconditional pass fails.
    (_, unguided), (_, guided) = want[1.0], want[1.5]
    assert (guided - unguided).abs().max() > 10 * tolerance(guided), "guidance hardly changes the latents"
    ref.unload_lora_weights()  # the same call without it: the comparison is not blind to the LoRA
    assert mean_diff(want[1.5][0], run(1.5)) > 5, "the LoRA hardly changes diffusers' image"
    return spec, root, lora, want


def tolerance(ref: torch.Tensor) -> float:
    """As tests/test_sdxl_personalisation.py: 1e-4 of the scale. ldmkit merges the update into the weight,
    PEFT adds it beside the layer, so float32 rounding differs."""
    return 1e-4 * max(1.0, float(ref.abs().max()))


def mean_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


def test_the_file_is_read_layer_for_layer(xl):
    """Every layer of the file lands on its layer of ours, none twice; without alpha keys the scale is
    the same 1 (how diffusers and the web UIs read a LoRA with no alphas)."""
    from diffusers import UNet2DConditionModel

    _, root, lora, _ = xl
    unet = UNet2DConditionModel.from_pretrained(str(root / "pipe" / "unet"))
    pipe = Pipeline.load(root / "pipe", precision="fp32")
    read = read_lora(lora, pipe.model)
    assert len(read.patches) == len({p.module for p in read.patches}) == len(lcm_lora_sdxl(unet)) // 3
    assert {p.target for p in read.patches} == {"unet"}
    assert all(p.alpha == RANK for p in read.patches)
    save_file(lcm_lora_sdxl(unet, alpha=False), str(root / "no-alpha.safetensors"))
    bare = read_lora(root / "no-alpha.safetensors", pipe.model)
    for a, b in zip(read.patches, bare.patches, strict=True):
        shape = pipe.model.unet.get_submodule(a.module).weight.shape
        assert a.module == b.module and b.alpha is None and torch.equal(a.delta(shape), b.delta(shape))


@pytest.mark.parametrize("guidance", GUIDANCES)
def test_lcm_lora_sdxl_equals_diffusers(xl, guidance):
    spec, root, lora, want = xl
    width, height = image_size(spec)
    pipe = Pipeline.load(root / "pipe", precision="fp32")
    kw = dict(steps=STEPS, cfg=guidance, sampler="lcm", seed=3, width=width, height=height, prompt_mode="truncate")
    result = pipe(PROMPT, loras=[(lora, 1.0)], **kw)
    image, latents = want[guidance]
    gap = float((result.latents - latents).abs().max())
    assert gap <= tolerance(latents), f"guidance {guidance}: final latents differ by {gap:.2e}"
    diff = mean_diff(result.images[0], image)
    assert diff <= 1.0, f"guidance {guidance}: images differ by {diff:.2f}/255"
    info = result.infotexts[0]
    assert "Sampler: LCM" in info and f"CFG scale: {guidance:g}" in info and f"Steps: {STEPS}" in info
    assert f"lcm-lora-sdxl: {read_lora(lora, pipe.model).hash}" in info


def test_from_the_command_line(xl, tmp_path):
    """`ldmkit generate` with --lora FILE, and with a <lora:NAME:WEIGHT> tag found in --lora-dir: the
    LoRA does not change the model's defaults (as in the web UI), so sampler, guidance and steps are given."""
    spec, root, lora, want = xl
    width, height = image_size(spec)
    common = ["--model", str(root / "pipe"), "--sampler", "lcm", "--cfg", "1.5", "--steps", str(STEPS), "--seed", "3"]
    common += ["--width", str(width), "--height", str(height), "--prompt-mode", "truncate", "--precision", "fp32", "-q"]
    runs = {
        "file": [PROMPT, "--lora", f"{lora}:1", "-o", str(tmp_path / "file.png")],
        "tag": [f"{PROMPT} <lora:lcm-lora-sdxl:1>", "--lora-dir", str(lora.parent), "-o", str(tmp_path / "tag.png")],
    }
    for how, args in runs.items():
        assert main(["generate", *args, *common]) == 0, how
        image = Image.open(tmp_path / f"{how}.png")
        diff = mean_diff(image.convert("RGB"), want[1.5][0])
        assert diff <= 1.0, f"--lora by {how}: images differ by {diff:.2f}/255"
        assert "Sampler: LCM" in image.info["parameters"] and "lcm-lora-sdxl: " in image.info["parameters"]
    # The tagged run's infotext carries the tag, sampler, guidance and steps: it replays to the same image.
    again = ["--from-png", str(tmp_path / "tag.png"), "--model", str(root / "pipe"), "--lora-dir", str(lora.parent)]
    assert main(["generate", *again, "--precision", "fp32", "-q", "-o", str(tmp_path / "again.png")]) == 0
    same = [np.asarray(Image.open(tmp_path / f"{name}.png").convert("RGB")) for name in ("tag", "again")]
    assert np.array_equal(*same)


def test_fast_with_the_lcm_lora_file(xl, tmp_path):
    """`--fast FILE` on SDXL: the LoRA merged at weight 1 and the settings of diffusers' LCM-LoRA guide (lcm,
    4 steps, guidance 1) with none given: diffusers' unguided image (cli/fast.py)."""
    spec, root, lora, want = xl
    width, height = image_size(spec)
    out = tmp_path / "fast.png"
    args = [PROMPT, "--fast", str(lora), "--model", str(root / "pipe"), "--seed", "3", "--prompt-mode", "truncate"]
    args += ["--width", str(width), "--height", str(height), "--precision", "fp32", "-q", "-o", str(out)]
    assert main(["generate", *args]) == 0
    image = Image.open(out)
    diff = mean_diff(image.convert("RGB"), want[1.0][0])
    assert diff <= 1.0, f"--fast FILE: images differ by {diff:.2f}/255"
    info = image.info["parameters"]
    assert f"Steps: {STEPS}, Sampler: LCM," in info and "CFG scale: 1," in info and "lcm-lora-sdxl: " in info, info
