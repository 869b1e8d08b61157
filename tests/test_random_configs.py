"""Parity on configurations drawn at random from diffusers' space, not on the ones we chose.

Each seed draws a Stable Diffusion 1.x / 2.x-style pipeline — UNet widths (not multiples of one
another), levels with and without attention, residual blocks and transformer depth per level, heads,
projections, group counts and epsilons, kernels, the middle block (or none); VAE levels, widths and
middle attention; a CLIP text tower's size and activation; a tokenizer with its own vocabulary, padding,
length and an added token; the scheduler config; eps or v — builds it with diffusers, perturbs its
weights and saves it with `save_pretrained`. ldmkit then loads the folder, and a single file it
converted, and must compute what diffusers computes. Replay a failure with its printed seed:
`python -m pytest tests/test_random_configs.py -m slow -k "seed-117]"`."""

import json
import random

import numpy as np
import pytest
import torch

from conftest import randomize, tiny_pipeline
from ldmkit.checkpoints.diffusers_folder import save_diffusers
from ldmkit.checkpoints.files import read_tensors
from ldmkit.checkpoints.single_file import load_model, save_single_file
from ldmkit.diffusion.registry import get_sampler
from ldmkit.diffusion.sampling import generators_for
from ldmkit.errors import ConfigError
from ldmkit.models.tokenizers import BOS, EOS, clip_vocab_and_merges
from ldmkit.pipelines import Pipeline

SAMPLERS = ("ddim", "euler_a", "dpmpp_2m_karras")
PROMPTS = ["a red circle above a blue square", "a <cat-toy> riding a horse, oil painting"]


def draw(seed: int, prediction: str | None = None) -> dict:
    """One pipeline's configuration, drawn from what diffusers' SD components accept."""
    r = random.Random(seed)
    groups = r.choice([4, 8])
    levels = r.randint(1, 4)
    widths = [groups * r.randint(2, 8) for _ in range(levels)]
    attention = [r.random() < 0.6 for _ in range(levels)]
    heads = [r.choice([h for h in (1, 2, 4, 8) if w % h == 0]) for w in widths]
    uniform_heads = [h for h in (1, 2, 4) if all(w % h == 0 for w in widths)]
    text_hidden = r.choice([16, 32, 48])
    text_heads = r.choice([h for h in (1, 2, 4) if text_hidden % h == 0])
    per_level = r.random() < 0.5
    unet = dict(
        block_out_channels=widths,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        layers_per_block=[r.randint(1, 2) for _ in widths] if per_level else r.randint(1, 2),
        transformer_layers_per_block=[r.randint(1, 2) for _ in widths] if r.random() < 0.5 else r.randint(1, 2),
        attention_head_dim=heads if r.random() < 0.6 or not uniform_heads else r.choice(uniform_heads),
        mid_block_type=r.choice(["UNetMidBlock2DCrossAttn", "UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None]),
        use_linear_projection=r.random() < 0.5,
        upcast_attention=r.random() < 0.3,
        norm_num_groups=groups,
        norm_eps=r.choice([1e-5, 1e-6]),
        conv_in_kernel=r.choice([3, 3, 1, 5]),
        conv_out_kernel=r.choice([3, 3, 1]),
        cross_attention_dim=text_hidden,
        sample_size=r.choice([4, 6, 8]),
        in_channels=4,
        out_channels=4,
    )
    vae_levels = r.randint(1, 4)
    vae_groups = r.choice([4, 8])
    vae = dict(
        block_out_channels=[vae_groups * r.randint(1, 4) for _ in range(vae_levels)],
        down_block_types=["DownEncoderBlock2D"] * vae_levels,
        up_block_types=["UpDecoderBlock2D"] * vae_levels,
        layers_per_block=r.randint(1, 2),
        latent_channels=4,
        norm_num_groups=vae_groups,
        mid_block_add_attention=r.random() < 0.7,
        scaling_factor=round(r.uniform(0.1, 1.5), 5),
        force_upcast=r.random() < 0.5,
    )
    max_positions = r.choice([77, 77, 32])
    clip = dict(
        hidden_size=text_hidden,
        intermediate_size=r.randint(16, 64),
        num_hidden_layers=r.randint(1, 3),
        num_attention_heads=text_heads,
        max_position_embeddings=max_positions,
        hidden_act=r.choice(["quick_gelu", "gelu"]),
        layer_norm_eps=r.choice([1e-5, 1e-6]),
        projection_dim=r.choice([text_hidden, 8]),
    )
    tokenizer = dict(merges=r.choice([None, 300, 2000]), pad=r.choice([EOS, "!"]), length=max_positions)
    prediction = prediction or r.choice(["epsilon", "v_prediction"])
    scheduler = r.choice(
        [
            ("PNDMScheduler", dict(skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)),
            ("DDIMScheduler", dict(steps_offset=1, set_alpha_to_one=False, clip_sample=False)),
            ("EulerDiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1)),
            ("EulerAncestralDiscreteScheduler", dict(timestep_spacing="trailing")),
            ("DPMSolverMultistepScheduler", dict(timestep_spacing="linspace")),
        ]
    )
    # Drawn last, so that the draws above stay what they were for every seed.
    if r.random() < 0.25:  # the first attention attends to the context (original: disable_self_attn)
        unet["only_cross_attention"] = [r.random() < 0.5 for _ in widths] if r.random() < 0.5 else True
    unet["timestep_post_act"] = r.choice([None, None, None, "silu", "mish"])
    return dict(unet=unet, vae=vae, clip=clip, tokenizer=tokenizer, prediction=prediction, scheduler=scheduler)


def tokenizer_for(spec: dict):
    """A CLIP tokenizer whose vocabulary is the first `merges` merges of CLIP's (a valid BPE
    vocabulary of its own, as small test tokenizers are), or CLIP's whole one; plus an added word."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    if spec["merges"] is not None:
        merges = merges[: spec["merges"]]
        tokens = list(vocab)[:512] + ["".join(m) for m in merges] + [BOS, EOS]
        vocab = {t: i for i, t in enumerate(tokens)}
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=spec["pad"], model_max_length=spec["length"])
    tok.add_tokens(["<cat-toy>"])  # a textual-inversion word baked into the tokenizer
    return tok


def build(spec: dict, folder, seed: int):
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = tokenizer_for(spec["tokenizer"])
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **spec["clip"],
        )
    )
    name, options = spec["scheduler"]
    scheduler = getattr(diffusers, name)(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=spec["prediction"],
        **options,
    )
    return tiny_pipeline(
        folder,
        unet=randomize(UNet2DConditionModel(**spec["unet"]), seed=seed),
        vae=randomize(AutoencoderKL(**spec["vae"]), seed=seed + 1),
        text_encoder=randomize(text, seed=seed + 2, std=0.05),
        tokenizer=tok,
        scheduler=scheduler,
    )


def close(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    """Within 1e-5, or 1e-5 of the output's largest magnitude where that exceeds 1: random weights
    make deep decoders' outputs reach ~10, where fp32 rounding alone differs by more than 1e-5."""
    return bool((ours - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max())))


def check_components(pipe, model, spec, where: str) -> None:
    """UNet, VAE and text encoder outputs, and the token ids, equal to the reference's."""
    g = torch.Generator().manual_seed(0)
    side = spec["unet"]["sample_size"] * 2
    x = torch.randn(2, 4, side, side + 2, generator=g)
    ctx = torch.randn(2, 5, spec["clip"]["hidden_size"], generator=g)
    t = torch.tensor([3, 901])
    f = 2 ** (len(spec["vae"]["block_out_channels"]) - 1)
    image = torch.rand(1, 3, 8 * f, 16 * f, generator=g) * 2 - 1
    with torch.no_grad():
        ref = pipe.unet(x, t, ctx).sample
        assert ref.abs().mean() > 1e-3, f"{where}: the reference UNet is blind"
        assert close(model.unet(x, t, ctx), ref), f"{where}: UNet"
        z = torch.randn(1, 4, 8, 16, generator=g)
        assert close(model.vae.decode(z), pipe.vae.decode(z).sample), f"{where}: VAE decoder"
        ref = pipe.vae.encode(image).latent_dist.mean
        assert close(model.vae.encode(image).mean, ref), f"{where}: VAE encoder"
        ours = model.text_encoder.tokenizer(PROMPTS)["input_ids"]
        theirs = pipe.tokenizer(
            PROMPTS,
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        assert torch.equal(ours, theirs), f"{where}: token ids"
        ref, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
        assert close(model.text_encoder(PROMPTS), ref), f"{where}: text encoder"


def check_generation(pipe, folder, spec, where: str) -> None:
    """ldmkit's whole generation equals the diffusers pipeline's — DDIM, Euler a and DPM++ 2M Karras at
    twice the native size (not square), Euler a also below it — with the reference's scheduler built by
    from_config of the folder's own scheduler config."""
    import diffusers

    ours = Pipeline.load(folder, precision="fp32")
    # The folder's file, not the in-memory scheduler: diffusers drops the fields an object took by
    # default (`_use_default_values`) when switching classes, but a folder read from disk names them all.
    saved = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    native = spec["unet"]["sample_size"] * 2 ** (len(spec["vae"]["block_out_channels"]) - 1)
    large = max(8, 2 * native) + (-max(8, 2 * native) % 8)
    small = max(8, native // 2 - native // 2 % 8)
    runs = [(sampler, large, large + 8) for sampler in SAMPLERS]
    if small < native:
        runs.append(("euler_a", small, small))
    for sampler, width, height in runs:
        s = get_sampler(sampler)
        pipe.scheduler = getattr(diffusers, s.diffusers_class).from_config(saved, **s.identity)
        kw = dict(steps=5, cfg=4.0, sampler=sampler, seed=7, width=width, height=height, prompt_mode="truncate")
        try:
            image = ours(PROMPTS[0], **kw).images[0]
        except ConfigError as e:
            # The one refusal the scheduler configs drawn here can meet (see diffusion/registry.py).
            assert sampler == "ddim" and "timestep_spacing" in str(e) and "linspace" in str(e), f"{where}: {e}"
            continue
        ref = pipe(
            PROMPTS[0],
            num_inference_steps=5,
            guidance_scale=4.0,
            width=width,
            height=height,
            generator=generators_for(7, 1),
        ).images[0]
        diff = np.abs(np.asarray(image, dtype=np.float64) - np.asarray(ref, dtype=np.float64))
        assert diff.mean() <= 1.0, f"{where}: {sampler} at {width}x{height} differs by {diff.mean():.2f}/255 on average"


def check_hires(pipe, folder, spec, seed: int, where: str) -> None:
    """The hires fix's second pass (a latent upscaler drawn at random, at a drawn scale, strength and
    step count) equals diffusers' image-to-image pipeline fed our upscaled first-pass latents, with the
    schedule from_config of the folder's scheduler config: the same last steps of the same schedule."""
    import diffusers

    from ldmkit.pipelines import GenerationParams
    from ldmkit.pipelines.hires import LATENT_UPSCALERS, second_pass_steps, upscale_latents

    r = random.Random(seed + 1000)
    ours = Pipeline.load(folder, precision="fp32")
    f = 2 ** (len(spec["vae"]["block_out_channels"]) - 1)
    native = spec["unet"]["sample_size"] * f
    side = max(16, native - native % 16)  # x1.5 stays a multiple of 8 (any f)
    sampler, upscaler = r.choice(SAMPLERS), r.choice(sorted(LATENT_UPSCALERS))
    scale, strength, steps = r.choice([1.5, 2.0]), r.choice([0.3, 0.5, 0.75]), r.randint(2, 4)
    first = dict(prompt=PROMPTS[0], steps=3, cfg=4.0, sampler=sampler, seed=5, width=side, height=side)
    first.update(prompt_mode="truncate")
    hires = dict(hires_scale=scale, hires_upscaler=upscaler, hires_steps=steps, strength=strength)
    where = f"{where}, hires {sampler} {upscaler} x{scale} strength {strength} steps {steps} at {side}"
    try:
        got = ours(**first, **hires).latents
    except ConfigError as e:  # the one refusal these scheduler configs can meet (diffusion/registry.py)
        assert sampler == "ddim" and "timestep_spacing" in str(e), f"{where}: {e}"
        return
    size = GenerationParams(**first, hires_scale=scale).hires_target(ours.model.config.vae.downsample_factor)
    upscaled = upscale_latents(ours(**first).latents, size, ours.model.config.vae.downsample_factor, upscaler)
    total, run = second_pass_steps(steps, strength)
    s = get_sampler(sampler)
    saved = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.scheduler = getattr(diffusers, s.diffusers_class).from_config(saved, **s.identity)
    want = img2img(
        PROMPTS[0],
        image=upscaled,
        strength=min(1.0, (run + 0.5) / total),  # int(total * strength) = run: the last `run` steps, as ours
        num_inference_steps=total,
        guidance_scale=4.0,
        generator=generators_for(5, 1),
        output_type="latent",
    ).images
    assert want.shape == got.shape, f"{where}: {tuple(want.shape)} vs {tuple(got.shape)}"
    assert (got - want).abs().max() <= 1e-3 * max(1.0, float(want.abs().max())), f"{where}: second pass latents"


def check_round_trip(folder, tmp_path, where: str) -> None:
    """diffusers -> single file -> diffusers keeps every tensor of the three components."""
    save_single_file(load_model(folder), tmp_path / "one.safetensors")
    save_diffusers(load_model(tmp_path / "one.safetensors"), tmp_path / "back")
    for sub, name in (
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ):
        a, _ = read_tensors(folder / sub / f"{name}.safetensors")
        b, _ = read_tensors(tmp_path / "back" / sub / f"{name}.safetensors")
        a = {k.removeprefix("text_model."): v for k, v in a.items()}
        b = {k.removeprefix("text_model."): v for k, v in b.items()}
        assert set(a) == set(b), f"{where}: {sub} keys differ: {sorted(set(a) ^ set(b))[:3]}"
        for k in a:
            assert torch.equal(a[k], b[k]), f"{where}: {sub} tensor {k} changed"


def check_architecture_from_weights(model, path, where: str) -> None:
    """What a file without ldmkit's header tells: every architecture field the weights can say, read
    off the tensors alone (heads and scales are not in the weights: family rules give them)."""
    from ldmkit.checkpoints.components import strip_prefix
    from ldmkit.checkpoints.detect import UNET, VAE, unet_config_from_weights, vae_config_from_weights

    state, _ = read_tensors(path)
    unet, want = unet_config_from_weights(strip_prefix(state, UNET), where), model.config.unet
    fields = ("channels", "num_res_blocks", "attention_resolutions", "middle_block", "conv_in_kernel")
    cross_only = [want.has_attention(i) and want.self_attention_disabled_at(i) for i in range(want.levels)]
    if any(cross_only) and want.context_dim not in want.channels:  # else undecidable from shapes
        read = [unet.has_attention(i) and unet.self_attention_disabled_at(i) for i in range(unet.levels)]
        assert read == cross_only, f"{where}: only-cross-attention levels read off the weights"
    fields += ("conv_out_kernel", "in_channels", "out_channels")
    if want.attention_resolutions or want.middle_block == "attention":  # else no weight says these
        fields += ("context_dim", "use_linear_in_transformer")
    for name in fields:
        assert getattr(unet, name) == getattr(want, name), f"{where}: UNet {name} read off the weights"
    if want.attention_resolutions or want.middle_block == "attention":
        levels = [i for i in range(want.levels) if want.has_attention(i)]
        if want.middle_block == "attention":
            levels.append(want.levels - 1)
        assert all(unet.depth_at(i) == want.depth_at(i) for i in levels), f"{where}: transformer depth"
    vae, want = vae_config_from_weights(strip_prefix(state, VAE), where), model.config.vae
    for name in ("channels", "num_res_blocks", "z_channels", "mid_attention", "use_quant_conv"):
        assert getattr(vae, name) == getattr(want, name), f"{where}: VAE {name} read off the weights"


def run(seed: int, tmp_path, prediction: str | None = None) -> None:
    torch.manual_seed(seed)
    spec = draw(seed, prediction)
    where = f"seed {seed} ({spec})"
    folder = tmp_path / "pipe"
    pipe = build(spec, folder, seed)
    check_components(pipe, load_model(folder), spec, f"{where}, from the folder")
    save_single_file(load_model(folder), tmp_path / "converted.safetensors")
    check_components(pipe, load_model(tmp_path / "converted.safetensors"), spec, f"{where}, from a single file")
    check_architecture_from_weights(load_model(folder), tmp_path / "converted.safetensors", where)
    check_round_trip(folder, tmp_path, where)
    check_generation(pipe, folder, spec, where)
    check_hires(pipe, folder, spec, seed, where)


@pytest.mark.parametrize(
    "seed,prediction", [(1, "epsilon"), (2, "v_prediction"), (3, None)], ids=["seed-1-eps", "seed-2-v", "seed-3"]
)
def test_random_sd_configs_equal_diffusers(seed, prediction, tmp_path):
    run(seed, tmp_path, prediction)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 160), ids=lambda v: f"seed-{v}")
def test_many_random_sd_configs_equal_diffusers(seed, tmp_path):
    run(seed, tmp_path)
