"""SDXL parity on configurations drawn at random from diffusers' space: UNet widths, levels with and
without attention, transformer depth per level, heads, the addition embedding's sizes, both text towers'
sizes and activations, base or refiner. Each is built by diffusers with random weights and saved with
`save_pretrained`; ldmkit loads the folder and must compute what diffusers computes — the UNet with its
micro-conditioning, both towers' hidden states and the pooled vector, and whole generations of
StableDiffusionXLPipeline on the same seed. Replay a failure with its printed seed:
`python -m pytest tests/test_sdxl.py -m slow -k "seed-117]"`."""

import random

import numpy as np
import pytest
import torch

from conftest import randomize
from ldmkit.diffusion.sampling import generators_for
from ldmkit.pipelines import Pipeline

PROMPTS = ["a red circle above a blue square", "an astronaut riding a horse, oil painting"]


def draw(seed: int) -> dict:
    """One SDXL-style pipeline's configuration: what diffusers' SDXL components accept."""
    r = random.Random(seed)
    refiner = r.random() < 0.25
    levels = r.randint(2, 3)
    groups = r.choice([4, 8])
    widths = [groups * r.randint(2, 6) for _ in range(levels)]
    attention = [False] + [True] * (levels - 1) if r.random() < 0.7 else [True] * levels
    heads = [r.choice([h for h in (1, 2, 4) if w % h == 0]) for w in widths]
    towers = [dict(hidden_size=r.choice([16, 32]), act=r.choice(["quick_gelu", "gelu"]))] if not refiner else []
    towers.append(dict(hidden_size=r.choice([16, 32, 48]), act="gelu", projection_dim=r.choice([16, 24, 32])))
    time_dim = r.choice([4, 8, 16])
    pooled = towers[-1]["projection_dim"]
    unet = dict(
        block_out_channels=widths,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        layers_per_block=r.randint(1, 2),
        transformer_layers_per_block=[r.randint(1, 3) for _ in widths],
        attention_head_dim=heads,
        use_linear_projection=r.random() < 0.8,
        norm_num_groups=groups,
        cross_attention_dim=sum(t["hidden_size"] for t in towers),
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled + (5 if refiner else 6) * time_dim,
        sample_size=r.choice([4, 6, 8]),
    )
    return dict(unet=unet, towers=towers, refiner=refiner, vae_levels=r.randint(1, 2), zeros=r.random() < 0.5)


def build(spec: dict, folder, seed: int):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from ldmkit.models.tokenizers import clip_vocab_and_merges

    vocab, merges = clip_vocab_and_merges()
    encoders, tokenizers = [], []
    for i, t in enumerate(spec["towers"]):
        last = i == len(spec["towers"]) - 1
        cfg = CLIPTextConfig(
            vocab_size=49408,
            hidden_size=t["hidden_size"],
            intermediate_size=2 * t["hidden_size"] + 3,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act=t["act"],
            projection_dim=t.get("projection_dim", t["hidden_size"]),
            pad_token_id=0 if last else 1,
        )
        model = (CLIPTextModelWithProjection if last else CLIPTextModel)(cfg)
        encoders.append(randomize(model, seed=seed + 10 + i, std=0.05))
        pad = "!" if last else "<|endoftext|>"  # bigG pads with "!" (id 0), CLIP-L with end-of-text
        tokenizers.append(CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad, model_max_length=77))
    n = spec["vae_levels"]
    vae = AutoencoderKL(
        block_out_channels=[8 * (i + 1) for i in range(n)],
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        scaling_factor=0.13025,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    parts = (
        dict(text_encoder=None, tokenizer=None)
        if spec["refiner"]
        else dict(text_encoder=encoders[0], tokenizer=tokenizers[0])
    )
    pipe = StableDiffusionXLPipeline(
        vae=randomize(vae, seed=seed + 1),
        unet=randomize(UNet2DConditionModel(**spec["unet"]), seed=seed),
        text_encoder_2=encoders[-1],
        tokenizer_2=tokenizers[-1],
        scheduler=scheduler,
        force_zeros_for_empty_prompt=spec["zeros"],
        **parts,
    )
    pipe.save_pretrained(str(folder))
    return pipe


def close(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    return bool((ours - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max())))


def check_components(pipe, ours, spec, where: str) -> None:
    """The UNet with its addition embedding, the towers' hidden states and pooled vector."""
    m = ours.model
    g = torch.Generator().manual_seed(0)
    u = spec["unet"]
    x = torch.randn(2, 4, u["sample_size"] * 2, u["sample_size"] * 2 + 2, generator=g)
    ctx = torch.randn(2, 5, u["cross_attention_dim"], generator=g)
    pooled_dim = spec["towers"][-1]["projection_dim"]
    text_embeds = torch.randn(2, pooled_dim, generator=g)
    time_ids = torch.tensor([[64.0, 48, 0, 8, 64, 48], [32, 32, 4, 0, 40, 40]])[:, : 5 if spec["refiner"] else 6]
    t = torch.tensor([3, 901])
    from ldmkit.nn.embedding import size_embedding

    y = torch.cat([text_embeds, size_embedding(time_ids, u["addition_time_embed_dim"])], dim=-1)
    with torch.no_grad():
        ref = pipe.unet(x, t, ctx, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
        assert ref.abs().mean() > 1e-3, f"{where}: the reference UNet is blind"
        assert close(m.unet(x, t, ctx, y=y), ref), f"{where}: UNet"
        want, _, want_pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
        got, got_pooled = m.text_encoder.encode_texts(PROMPTS)
        assert close(got, want), f"{where}: the towers' hidden states"
        assert close(got_pooled, want_pooled), f"{where}: the pooled vector"


def check_generation(pipe, ours, spec, where: str) -> None:
    """Whole generations at twice the native size (not square), guided, with and without a negative
    prompt (an empty one is zeros where the folder says force_zeros_for_empty_prompt), the second with
    micro-conditioning of its own: text-to-image for a base model, image-to-image for a refiner
    (aesthetic scores), as each is used."""
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from PIL import Image

    f = 2 ** (spec["vae_levels"] - 1)
    native = spec["unet"]["sample_size"] * f
    width = 2 * native + (-2 * native % 8)
    height = width + 8
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    reference = pipe
    if spec["refiner"]:
        reference = StableDiffusionXLImg2ImgPipeline(
            **pipe.components, requires_aesthetics_score=True, force_zeros_for_empty_prompt=spec["zeros"]
        )
    micro = {  # the second run: micro-conditioning as diffusers names it, not the defaults
        "original_size": (2 * height, 3 * width),
        "crops_coords_top_left": (4, 12),
        "negative_original_size": (height, height),
        "negative_crops_coords_top_left": (0, 8),
    }
    if spec["refiner"]:
        micro.update(aesthetic_score=7.5, negative_aesthetic_score=1.0)
    else:
        micro.update(target_size=(height + 8, width), negative_target_size=(width, height))
    for negative, extra in ((None, {}), ("blurry", micro)):
        kw = dict(steps=4, cfg=5.0, sampler="euler", seed=3, width=width, height=height, prompt_mode="truncate")
        ref_kw = dict(negative_prompt=negative, num_inference_steps=4, guidance_scale=5.0, **extra)
        kw.update(extra)
        if spec["refiner"]:
            kw.update(init_image=init, strength=0.6)
            ref_kw.update(image=init, strength=0.6)
        else:
            ref_kw.update(width=width, height=height)
        image = ours(PROMPTS[0], negative_prompt=negative or "", **kw).images[0]
        ref = reference(PROMPTS[0], generator=generators_for(3, 1), **ref_kw).images[0]
        diff = np.abs(np.asarray(image, dtype=np.float64) - np.asarray(ref, dtype=np.float64))
        assert diff.mean() <= 1.0, f"{where}: negative {negative!r} at {width}x{height}: {diff.mean():.2f}/255"


def check_round_trip(pipe, ours, spec, tmp_path, where: str) -> None:
    """ldmkit writes the model as a diffusers folder: diffusers reads it back to the same tensors, every
    one, and ldmkit too."""
    from diffusers import DiffusionPipeline

    from ldmkit.checkpoints.diffusers_folder import save_diffusers

    save_diffusers(ours.model, tmp_path / "back")
    back = DiffusionPipeline.from_pretrained(str(tmp_path / "back"))
    assert back.config.force_zeros_for_empty_prompt == spec["zeros"], where
    names = ["unet", "vae", "text_encoder_2"] + ([] if spec["refiner"] else ["text_encoder"])
    for name in names:
        a, b = getattr(pipe, name).state_dict(), getattr(back, name).state_dict()
        assert set(a) == set(b), f"{where}: {name} keys differ: {sorted(set(a) ^ set(b))[:3]}"
        assert all(torch.equal(a[k], b[k]) for k in a), f"{where}: {name} tensors changed"
    again = Pipeline.load(tmp_path / "back", precision="fp32")
    for (k, v), (k2, v2) in zip(ours.model.state_dict().items(), again.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), f"{where}: {k} after ldmkit -> diffusers -> ldmkit"


def run(seed: int, tmp_path) -> None:
    torch.manual_seed(seed)
    spec = draw(seed)
    where = f"seed {seed} ({spec})"
    folder = tmp_path / "pipe"
    pipe = build(spec, folder, seed)
    ours = Pipeline.load(folder, precision="fp32")
    assert ours.model.config.family == ("sdxl-refiner" if spec["refiner"] else "sdxl"), where
    check_components(pipe, ours, spec, where)
    check_generation(pipe, ours, spec, where)
    check_round_trip(pipe, ours, spec, tmp_path, where)


@pytest.mark.parametrize("seed", [1, 2, 3], ids=lambda v: f"seed-{v}")
def test_random_sdxl_configs_equal_diffusers(seed, tmp_path):
    run(seed, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 140), ids=lambda v: f"seed-{v}")
def test_many_random_sdxl_configs_equal_diffusers(seed, tmp_path):
    run(seed, tmp_path)


def test_micro_conditioning_only_where_a_model_takes_it(tmp_path):
    from ldmkit.errors import ConfigError

    base = build(draw(2), tmp_path / "base", 2)
    assert not draw(2)["refiner"] and draw(1)["refiner"]
    refiner = build(draw(1), tmp_path / "refiner", 1)
    del base, refiner
    sd1 = Pipeline.load(None)
    with pytest.raises(ConfigError, match="original_size: only SDXL-family models"):
        sd1("x", steps=1, original_size=(64, 64))
    with pytest.raises(ConfigError, match="aesthetic_score: only the SDXL refiner"):
        Pipeline.load(tmp_path / "base")("x", steps=1, width=16, height=16, aesthetic_score=7.0)
    with pytest.raises(ConfigError, match="target_size: the SDXL refiner takes aesthetic scores"):
        Pipeline.load(tmp_path / "refiner")("x", steps=1, width=16, height=16, target_size=(64, 64))
    with pytest.raises(
        ConfigError, match="is SDXL refiner, trained on the last, low-noise steps only: give it an init image"
    ):
        Pipeline.load(tmp_path / "refiner")("x", steps=1, width=16, height=16)
    with pytest.raises(ConfigError, match="crops_coords_top_left: .* two whole numbers"):
        Pipeline.load(tmp_path / "base")("x", steps=1, crops_coords_top_left=(1, 2, 3))


@pytest.mark.parametrize("steps", [1, 4])
def test_turbo_settings_equal_diffusers(tmp_path, steps):
    """SDXL-Turbo as it is meant to run: Euler a on trailing timesteps (its scheduler config), no guidance
    (diffusers' guidance_scale 0, ldmkit's cfg 1), one to four steps."""
    from diffusers import EulerAncestralDiscreteScheduler

    spec = draw(2)
    pipe = build(spec, tmp_path / "turbo", 2)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.save_pretrained(str(tmp_path / "turbo"))  # the folder's scheduler config says trailing
    side = 2 * spec["unet"]["sample_size"] * 2 ** (spec["vae_levels"] - 1)
    side += -side % 8
    ours = Pipeline.load(tmp_path / "turbo", precision="fp32")
    image = ours(PROMPTS[1], steps=steps, cfg=1.0, sampler="euler_a", seed=5, width=side, height=side).images[0]
    ref = pipe(
        PROMPTS[1],
        num_inference_steps=steps,
        guidance_scale=0.0,
        width=side,
        height=side,
        generator=generators_for(5, 1),
    ).images[0]
    diff = np.abs(np.asarray(image, dtype=np.float64) - np.asarray(ref, dtype=np.float64))
    assert diff.mean() <= 1.0, f"{steps} steps: {diff.mean():.2f}/255"


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "ddim", "dpmpp_2m"])
def test_base_to_refiner_hand_off_equals_diffusers(tmp_path, sampler):
    """The base model runs the timesteps down to the switch, the refiner the rest from its latents
    (diffusers' denoising_end / denoising_start), each image's generator carried across."""
    import diffusers
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from ldmkit.diffusion.registry import get_sampler

    base_spec, refiner_spec = draw(2), draw(1)
    assert not base_spec["refiner"] and refiner_spec["refiner"]
    base = build(base_spec, tmp_path / "base", 2)
    refiner = build(refiner_spec, tmp_path / "refiner", 1)
    refiner.vae = base.vae  # one latent space: SDXL's base and refiner share their autoencoder
    s = get_sampler(sampler)
    for pipe, folder in ((base, "base"), (refiner, "refiner")):
        pipe.scheduler = getattr(diffusers, s.diffusers_class).from_config(pipe.scheduler.config, **s.identity)
        pipe.save_pretrained(str(tmp_path / folder))
    side = 2 * base_spec["unet"]["sample_size"] * 2 ** (base_spec["vae_levels"] - 1)
    side += -side % 8
    ours = Pipeline.load(tmp_path / "base", precision="fp32")
    ours.refiner = Pipeline.load(tmp_path / "refiner", precision="fp32")
    kw = dict(negative_prompt="blurry", steps=10, cfg=5.0, sampler=sampler, seed=3, width=side, height=side)
    out = ours(PROMPTS[0], **kw, prompt_mode="truncate", refiner_switch_at=0.7)
    assert "Refiner: refiner [" in out.infotexts[0] and "Refiner switch at: 0.7" in out.infotexts[0]
    generators = generators_for(3, 1)
    ref_kw = dict(negative_prompt="blurry", num_inference_steps=10, guidance_scale=5.0, generator=generators)
    latents = base(PROMPTS[0], width=side, height=side, denoising_end=0.7, output_type="latent", **ref_kw).images
    img2img = StableDiffusionXLImg2ImgPipeline(**refiner.components, requires_aesthetics_score=True)
    ref = img2img(PROMPTS[0], image=latents, denoising_start=0.7, **ref_kw).images[0]
    diff = np.abs(np.asarray(out.images[0], dtype=np.float64) - np.asarray(ref, dtype=np.float64))
    assert diff.mean() <= 1.0, f"{sampler}: {diff.mean():.2f}/255"


def test_the_web_ui_api_serves_sdxl_with_its_refiner(tmp_path):
    import base64
    import io
    import json

    from fastapi.testclient import TestClient
    from PIL import Image

    from ldmkit.server.app import ServeConfig, create_app

    build(draw(2), tmp_path / "models" / "xl-base", 2)
    refiner = build(draw(1), tmp_path / "models" / "xl-refiner", 1)
    refiner.vae = build(draw(2), tmp_path / "unused", 2).vae
    refiner.save_pretrained(str(tmp_path / "models" / "xl-refiner"))
    app = create_app(ServeConfig(str(tmp_path / "models" / "xl-base"), models_dir=str(tmp_path / "models")))
    app.state.ready.result()
    body = {"prompt": "a red circle", "steps": 6, "seed": 2, "width": 32, "height": 32, "cfg_scale": 4}
    with TestClient(app) as client:
        plain = client.post("/sdapi/v1/txt2img", json=body)
        refined = client.post("/sdapi/v1/txt2img", json={**body, "refiner_checkpoint": "xl-refiner"})
        missing = client.post("/sdapi/v1/txt2img", json={**body, "refiner_checkpoint": "nope"})
        bad = client.post(
            "/sdapi/v1/txt2img", json={**body, "refiner_checkpoint": "xl-refiner", "refiner_switch_at": 1.5}
        )
    assert plain.status_code == refined.status_code == 200, (plain.text, refined.text)
    info = json.loads(refined.json()["info"])["infotexts"][0]
    assert "Refiner: xl-refiner" in info and "Refiner switch at: 0.8" in info
    assert "Refiner" not in json.loads(plain.json()["info"])["infotexts"][0]
    images = [Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))) for r in (plain, refined)]
    assert images[0].tobytes() != images[1].tobytes()
    assert missing.status_code == 404 and "nope" in missing.json()["detail"]
    assert bad.status_code == 422 and "refiner_switch_at" in bad.json()["detail"]


def test_sharded_folders_load_and_a_hostile_index_is_refused(tmp_path):
    """save_pretrained shards a component above its max_shard_size (SDXL's fp32 UNet at the default 10 GB):
    the shards load to the same model; an index naming a file outside its folder is refused in one line."""
    import json

    from ldmkit.checkpoints.single_file import load_model
    from ldmkit.errors import CheckpointError

    pipe = build(draw(2), tmp_path / "whole", 2)
    pipe.save_pretrained(str(tmp_path / "sharded"), max_shard_size="200KB")
    index = tmp_path / "sharded" / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    assert index.exists() and len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    whole, sharded = load_model(tmp_path / "whole"), load_model(tmp_path / "sharded")
    for (k, a), (k2, b) in zip(whole.state_dict().items(), sharded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = "../../whole/unet/diffusion_pytorch_model.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="names a shard .* that is not a file of unet/"):
        load_model(tmp_path / "sharded")
