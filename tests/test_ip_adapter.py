"""IP-Adapter parity with diffusers (`load_ip_adapter`) on configurations drawn at random: the UNet and
pipeline of an SD 1.x/2.x or SDXL draw (tests/test_random_configs.py, tests/test_sdxl.py), a CLIP vision
tower (width, depth, heads, patch and image size, projection, activation) and an adapter of each kind
(base, plus with its resampler's tokens, width and heads, full), all with random weights, the adapter
saved in the published layout (.safetensors, or the original nested .bin). The UNet with the adapter must
give diffusers' output within 1e-5 at scales 0, 0.5 and 1 and a per-block scale dict, scale 0 exactly the
UNet without it, and whole generations within 1/255 on the same seed. Replay a failure with its printed
seed: `python -m pytest tests/test_ip_adapter.py -m slow -k "seed-117]"`."""

import json
import random

import numpy as np
import pytest
import test_random_configs as sd
import test_sdxl as xl
import torch
from PIL import Image

from conftest import randomize
from ldmkit.checkpoints.files import write_safetensors
from ldmkit.checkpoints.image_encoder_files import load_image_encoder
from ldmkit.checkpoints.ip_adapter_files import read_ip_adapter
from ldmkit.diffusion.denoiser import with_image_tokens
from ldmkit.diffusion.registry import get_sampler
from ldmkit.diffusion.sampling import generators_for
from ldmkit.models.ip_adapter import IPAdapter, IPAdapterConfig, attach, bound, cross_attentions, detach
from ldmkit.nn.embedding import size_embedding
from ldmkit.pipelines import Pipeline
from ldmkit.pipelines.image_prompt import ImagePromptInput

PROMPT = "a red circle above a blue square"


def draw_adapter(r: random.Random, kind: str | None = None) -> dict:
    """A CLIP vision tower and an adapter reading it, as diffusers can load them: base adapters have 4
    tokens and plus resamplers depth 4 and 64 channels per head (what its converter assumes)."""
    width = r.choice([32, 48, 64])
    patch = r.choice([4, 7, 8])
    tower = dict(
        hidden_size=width,
        intermediate_size=r.randint(20, 80),
        num_hidden_layers=r.randint(2, 3),
        num_attention_heads=r.choice([h for h in (1, 2, 4) if width % h == 0]),
        patch_size=patch,
        image_size=patch * r.choice([2, 3, 4]),
        projection_dim=r.choice([16, 24, 40]),
        hidden_act=r.choice(["gelu", "quick_gelu"]),
    )
    kind = kind or r.choice(["base", "plus", "full"])
    adapter = dict(kind=kind, tokens=4 if kind == "base" else r.randint(2, 16) if kind == "plus" else 0)
    if kind == "plus":
        adapter.update(width=r.choice([32, 48, 96]), heads=r.randint(1, 3), depth=4, dim_head=64, ff_mult=4)
    return dict(tower=tower, adapter=adapter)


def write_tower(spec: dict, folder, seed: int):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    model = randomize(CLIPVisionModelWithProjection(CLIPVisionConfig(**spec["tower"])), seed=seed, std=0.05)
    model.save_pretrained(str(folder))
    return load_image_encoder(folder)


def make_adapter(spec: dict, unet, encoder, seed: int) -> IPAdapter:
    a = spec["adapter"]
    image_dim = encoder.embed_dim if a["kind"] == "base" else encoder.width
    widths = tuple(attn.to_q.out_features for *_, attn in cross_attentions(unet))
    config = IPAdapterConfig(image_dim=image_dim, context_dim=unet.config.context_dim, layer_widths=widths, **a)
    return randomize(IPAdapter(config), seed=seed, std=0.1)


def save_adapter(adapter: IPAdapter, path) -> None:
    state = {k: v.contiguous() for k, v in adapter.state_dict().items()}
    if str(path).endswith(".bin"):  # the original releases: two nested dicts, pickled
        torch.save(
            {
                p: {k[len(p) + 1 :]: v for k, v in state.items() if k.startswith(p + ".")}
                for p in ("image_proj", "ip_adapter")
            },
            path,
        )
    else:
        write_safetensors(path, state)


def prompt_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    h, w = rng.integers(20, 70, 2)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def close(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    return bool((ours - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max())))


def scale_dict(r: random.Random, unet, reference) -> dict | None:
    """A per-block scale in diffusers' form over blocks this UNet has, or None where diffusers cannot
    expand one (its config lists residual blocks per level)."""
    layers = cross_attentions(unet)
    # diffusers cannot expand one where its config lists residual blocks per level, or without a middle
    # attention (it always scales "mid")
    if not isinstance(reference.config.layers_per_block, int) or not any(p == "mid" for p, *_ in layers):
        return None
    blocks = sorted({(p, b) for p, b, _, _ in layers if p != "mid"})
    scale: dict = {}
    for part, block in r.sample(blocks, k=min(len(blocks), 2)):
        n = len({i for p, b, i, _ in layers if (p, b) == (part, block)})
        value = [round(r.uniform(0, 1.2), 2) for _ in range(n)] if r.random() < 0.6 else round(r.uniform(0, 1.2), 2)
        scale.setdefault(part, {})[f"block_{block}"] = value
    if r.random() < 0.5:
        scale["mid"] = 0.7
    return scale


def check_unet(pipe, ours, inp: ImagePromptInput, r: random.Random, where: str) -> None:
    """The UNet with the adapter, guidance batch [negative, prompt], against diffusers' at several scales."""
    unet = ours.model.unet
    embeds = pipe.prepare_ip_adapter_image_embeds([inp.images[0]], None, "cpu", 1, True)
    g = torch.Generator().manual_seed(0)
    side = 2 * unet.config.downsample_factor
    x = torch.randn(2, 4, side, side + unet.config.downsample_factor, generator=g)
    ctx = torch.randn(2, 5, unet.config.context_dim, generator=g)
    t = torch.tensor([11, 700])
    extra, y = {}, None
    if unet.config.addition_time_embed_dim:  # SDXL: the pooled vector and micro-conditioning
        d = unet.config.addition_time_embed_dim
        pooled = torch.randn(2, unet.config.adm_in_channels - 6 * d, generator=g)
        times = torch.tensor([[64.0, 48, 0, 8, 64, 48], [32, 32, 4, 0, 40, 40]])
        extra = dict(text_embeds=pooled, time_ids=times)
        y = torch.cat([pooled, size_embedding(times, d)], dim=-1)
    with torch.no_grad():
        plain = unet(x, t, ctx, y=y)
        prompt = inp.prompt(1, True, "cpu")
        scales = [0.0, 0.5, 1.0] + [s for s in [scale_dict(r, unet, pipe.unet)] if s]
        for scale in scales:
            set_reference_scale(pipe, scale)
            attach(unet, [(inp.adapter, scale)])
            with bound(unet, [prompt], 0, 1):
                out = unet(x, t, with_image_tokens(ctx, [prompt], True), y=y)
            detach(unet)
            ref = pipe.unet(x, t, ctx, added_cond_kwargs={"image_embeds": embeds, **extra}).sample
            assert close(out, ref), f"{where}: scale {scale}: {(out - ref).abs().max():.2e}"
            if scale == 0.0:
                assert torch.equal(out, plain), f"{where}: scale 0 is not the UNet without the adapter"
            else:
                assert (out - plain).abs().max() > 1e-4, f"{where}: scale {scale} changes nothing"


def check_generation(
    pipe, folder, ours, inp: ImagePromptInput, size: tuple[int, int], where: str, sampler: str
) -> None:
    import diffusers

    s = get_sampler(sampler)  # the scheduler from the folder's file, as tests/test_random_configs.py explains
    saved = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    pipe.scheduler = getattr(diffusers, s.diffusers_class).from_config(saved, **s.identity)
    width, height = size
    scale = inp.scale
    set_reference_scale(pipe, scale)
    kw = dict(steps=4, cfg=4.0, sampler=sampler, seed=7, width=width, height=height, prompt_mode="truncate")
    image = ours(PROMPT, image_prompts=[inp], **kw).images[0]
    ref = pipe(
        PROMPT,
        ip_adapter_image=inp.images[0],
        num_inference_steps=4,
        guidance_scale=4.0,
        width=width,
        height=height,
        generator=generators_for(7, 1),
    ).images[0]
    diff = np.abs(np.asarray(image, dtype=np.float64) - np.asarray(ref, dtype=np.float64))
    assert diff.mean() <= 1.0, f"{where}: generation differs by {diff.mean():.2f}/255 on average"
    plain = ours(PROMPT, **kw).images[0]  # the image prompt is in the path (its size is the UNet check's)
    assert not np.array_equal(np.asarray(plain), np.asarray(image)), f"{where}: the image prompt changes nothing"


def has_cross_attention(unet: dict) -> bool:
    return "CrossAttnDownBlock2D" in unet["down_block_types"] or unet["mid_block_type"] == "UNetMidBlock2DCrossAttn"


def set_reference_scale(pipe, scale) -> None:
    """diffusers' set_ip_adapter_scale fails on a UNet with per-level residual block counts, even for a
    number (it adds 1 to the list): there, a number is set on its processors as that method would."""
    if isinstance(pipe.unet.config.layers_per_block, int):
        pipe.set_ip_adapter_scale(scale)
        return
    for proc in pipe.unet.attn_processors.values():
        if hasattr(proc, "to_k_ip"):
            proc.scale = [float(scale)]


def load_into_diffusers(pipe, path) -> None:
    pipe.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder="image_encoder")


def run(seed: int, tmp_path, family: str) -> None:
    r = random.Random(seed)
    torch.manual_seed(seed)
    if family == "sdxl":
        spec = next(d for d in (xl.draw(seed + 1000 * k) for k in range(20)) if not d["refiner"])
        pipe = xl.build(spec, tmp_path / "pipe", seed)
        native = spec["unet"]["sample_size"] * 2 ** (spec["vae_levels"] - 1)
    else:  # a UNet with cross-attention somewhere: the first such draw from the seed
        spec = next(d for d in (sd.draw(seed + 1000 * k) for k in range(20)) if has_cross_attention(d["unet"]))
        spec["unet"].pop("only_cross_attention", None)
        pipe = sd.build(spec, tmp_path / "pipe", seed)
        native = spec["unet"]["sample_size"] * 2 ** (len(spec["vae"]["block_out_channels"]) - 1)
    ours = Pipeline.load(tmp_path / "pipe", precision="fp32")
    a = draw_adapter(r)
    where = f"seed {seed} ({family}, adapter {a})"
    encoder = write_tower(a, tmp_path / "adapter" / "image_encoder", seed + 5)
    adapter = make_adapter(a, ours.model.unet, encoder, seed + 6)
    path = tmp_path / "adapter" / ("ip-adapter.bin" if r.random() < 0.3 else "ip-adapter.safetensors")
    save_adapter(adapter, path)
    read = read_ip_adapter(path)
    assert read.config == adapter.config, where
    load_into_diffusers(pipe, path)
    inp = ImagePromptInput(
        read.adapter, load_image_encoder(tmp_path / "adapter" / "image_encoder"), [prompt_image(seed)]
    )
    check_unet(pipe, ours, inp, r, where)
    inp.scale = round(r.uniform(0.4, 1.2), 2)
    width = max(8, 2 * native) + (-max(8, 2 * native) % 8)
    sampler = r.choice(["euler", "euler_a", "dpmpp_2m"])
    check_generation(pipe, tmp_path / "pipe", ours, inp, (width, width + 8), where, sampler)


@pytest.mark.parametrize(
    "seed,family", [(1, "sd"), (2, "sd"), (3, "sdxl")], ids=lambda v: f"seed-{v}" if isinstance(v, int) else v
)
def test_random_ip_adapters_equal_diffusers(seed, family, tmp_path):
    run(seed, tmp_path, family)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 124), ids=lambda v: f"seed-{v}")
def test_many_random_ip_adapters_equal_diffusers(seed, tmp_path):
    run(seed, tmp_path, "sdxl" if seed % 3 == 0 else "sd")
