"""SDXL LoRAs and textual-inversion embeddings equal to diffusers, on random tiny SDXL pipelines made by
tests/test_sdxl.py. A kohya / web-UI LoRA (the UNet by the original sgm names, as sd-scripts writes them,
or by diffusers' names; both towers; alphas) and a diffusers / PEFT LoRA (written by diffusers'
save_lora_weights, each network's alpha in its metadata), read by diffusers' load_lora_weights at strength
0.8 and by ldmkit, give the same UNet output, towers' hidden states and pooled vector, and the same
images. An SDXL embedding ({clip_l, clip_g}) gives each tower its own vectors, as diffusers'
load_textual_inversion does once per tower. LoRAs and embeddings for SD 1.x are refused on SDXL (and
SDXL's on SD 1.x) in one line.

Tolerances: 1e-4 of the output's scale for tensors, as tests/test_lora.py: ldmkit merges the update into
the weight (W + s·up·down), PEFT adds it beside the layer (x·W + s·(x·down)·up), so float32 rounding
differs (measured here: at most 6e-6 on outputs of scale 6); 1/255 mean for images, as test_sdxl.py
(measured here: identical 8-bit images)."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_sdxl import build, draw

from conftest import tiny_pipeline
from ldmkit.checkpoints.lora_files import read_lora
from ldmkit.diffusion.sampling import generators_for
from ldmkit.errors import CheckpointError, ConfigError
from ldmkit.models.prompts import encode_prompts
from ldmkit.nn.embedding import size_embedding
from ldmkit.pipelines import Pipeline

BASE, REFINER = 9, 3  # draw(9): 3 levels, the first without attention, 2 resnets a level; draw(3): a refiner
RANK, STRENGTH = 4, 0.8
PROMPT = "an astronaut riding a horse, oil painting"
RESNET = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3"}
RESNET["conv_shortcut"] = "skip_connection"
FIXED = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def sgm_name(name: str, unet: dict) -> str:
    """A diffusers UNet module's name in the original (sgm) UNet, as sd-scripts names SDXL's modules."""
    if name in FIXED:
        return FIXED[name]
    n, parts = unet["layers_per_block"], name.split(".")
    attention = ["CrossAttn" in t for t in unet["down_block_types"]]
    if parts[0] == "mid_block":
        head = {"resnets.0": "middle_block.0", "attentions.0": "middle_block.1", "resnets.1": "middle_block.2"}
        return ".".join([head[f"{parts[1]}.{parts[2]}"], *_inner(parts[1], parts[3:])])
    block, kind = int(parts[1]), parts[2]
    if parts[0] == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{(block + 1) * (n + 1)}.0.op"
        index = 1 + block * (n + 1) + int(parts[3])
        return ".".join([f"input_blocks.{index}.{int(kind == 'attentions')}", *_inner(kind, parts[4:])])
    if kind == "upsamplers":  # up block u is level levels - 1 - u
        return f"output_blocks.{block * (n + 1) + n}.{2 if attention[-1 - block] else 1}.conv"
    index = block * (n + 1) + int(parts[3])
    return ".".join([f"output_blocks.{index}.{int(kind == 'attentions')}", *_inner(kind, parts[4:])])


def _inner(kind: str, rest: list[str]) -> list[str]:
    return RESNET[rest[0]].split(".") if kind == "resnets" else rest


def layers(module, wanted=lambda n: True):
    kinds = (torch.nn.Linear, torch.nn.Conv2d)
    return [(n, m) for n, m in module.named_modules() if isinstance(m, kinds) and wanted(n)]


def text_layers(module):
    return layers(module, lambda n: "layers." in n and n.endswith(("_proj", "fc1", "fc2")))


def random_pair(weight: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    conv = weight.ndim == 4
    down = torch.randn((RANK, *weight.shape[1:]) if conv else (RANK, weight.shape[1]), generator=g) * 0.2
    up = torch.randn((weight.shape[0], RANK, 1, 1) if conv else (weight.shape[0], RANK), generator=g) * 0.2
    return down, up


def kohya_lora(ref, spec: dict, seed: int = 0, sgm: bool = True) -> dict[str, torch.Tensor]:
    """Every UNet layer (attention, feed-forward, projections, resnets, down/upsamplers, conv_in/out,
    time and addition embeddings) by its sgm name, both towers' layers by transformers' names (with
    the `text_model` level sd-scripts writes); alpha half the rank. (One alpha for all layers: diffusers
    0.42 drops per-layer alphas that differ, its alpha_pattern keys naming no module.)"""
    g = torch.Generator().manual_seed(seed)
    if sgm:
        named = [("lora_unet_" + sgm_name(n, spec["unet"]), m) for n, m in layers(ref.unet)]
    else:  # diffusers' names, as kohya writes SD 1.x's (diffusers 0.42 reads no add_embedding by them)
        named = [("lora_unet_" + n, m) for n, m in layers(ref.unet, lambda n: not n.startswith("add_embedding"))]
    for prefix, tower in (("lora_te1_", ref.text_encoder), ("lora_te2_", ref.text_encoder_2)):
        if tower is not None:
            named += [
                (prefix + ("" if n.startswith("text_model.") else "text_model.") + n, m) for n, m in text_layers(tower)
            ]
    out = {}
    for name, m in named:
        key = name.replace(".", "_")
        down, up = random_pair(m.weight, g)
        out.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up})
        out[f"{key}.alpha"] = torch.tensor(RANK / 2)
    return out


def peft_lora(ref, path, seed: int = 1) -> None:
    """PEFT adapters on the UNet (attention, feed-forward, projections, resnets) and both towers, random,
    saved by diffusers' save_lora_weights with each network's config: alphas 2 (one layer kind 6 by
    alpha_pattern), 8, and 3 with rsLoRA (scale alpha / sqrt(rank))."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
    unet += ["conv1", "conv2", "conv_shortcut", "time_emb_proj"]
    text = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    configs = {
        "unet": LoraConfig(r=RANK, lora_alpha=2, target_modules=unet, alpha_pattern={"attn2.to_k": 6}),
        "text_encoder": LoraConfig(r=RANK, lora_alpha=8, target_modules=text),
        "text_encoder_2": LoraConfig(r=RANK, lora_alpha=3, target_modules=text, use_rslora=True),
    }
    g = torch.Generator().manual_seed(seed)
    saved = {}
    for name, config in configs.items():
        net = getattr(ref, name)
        net.add_adapter(config)
        with torch.no_grad():
            for key, p in net.named_parameters():
                if "lora_" in key:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        saved[f"{name}_lora_layers"] = get_peft_model_state_dict(net)
        saved[f"{name}_lora_adapter_metadata"] = config.to_dict()
    StableDiffusionXLPipeline.save_lora_weights(str(path.parent), weight_name=path.name, **saved)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random tiny SDXL base model and LoRA files for it in both layouts."""
    root = tmp_path_factory.mktemp("sdxl")
    spec = draw(BASE)
    assert not spec["refiner"] and len(spec["towers"]) == 2
    ref = build(spec, root / "pipe", BASE)
    save_file(kohya_lora(ref, spec), str(root / "kohya.safetensors"))
    save_file(kohya_lora(ref, spec, sgm=False), str(root / "kohya-diffusers-names.safetensors"))
    peft_lora(ref, root / "peft.safetensors")
    return spec, root


def unet_inputs(spec: dict):
    g = torch.Generator().manual_seed(0)
    u = spec["unet"]
    x = torch.randn(2, 4, u["sample_size"] * 2, u["sample_size"] * 2 + 2, generator=g)
    ctx = torch.randn(2, 5, u["cross_attention_dim"], generator=g)
    text_embeds = torch.randn(2, spec["towers"][-1]["projection_dim"], generator=g)
    time_ids = torch.tensor([[64.0, 48, 0, 8, 64, 48], [32, 32, 4, 0, 40, 40]])[:, : 5 if spec["refiner"] else 6]
    return x, torch.tensor([3, 901]), ctx, text_embeds, time_ids


PROMPTS = [PROMPT, "a red circle above a blue square"]


@torch.no_grad()
def theirs(ref, spec: dict) -> tuple[torch.Tensor, ...]:
    """diffusers' UNet output, both towers' hidden states (side by side) and the pooled vector."""
    x, t, ctx, text_embeds, time_ids = unet_inputs(spec)
    out = ref.unet(x, t, ctx, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
    hidden, _, pooled, _ = ref.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    return out, hidden, pooled


@torch.no_grad()
def ours_of(pipe, spec: dict) -> tuple[torch.Tensor, ...]:
    x, t, ctx, text_embeds, time_ids = unet_inputs(spec)
    y = torch.cat([text_embeds, size_embedding(time_ids, spec["unet"]["addition_time_embed_dim"])], dim=-1)
    return (pipe.model.unet(x, t, ctx, y=y), *pipe.model.text_encoder.encode_texts(PROMPTS))


def close(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    return bool((ours - ref).abs().max() <= 1e-4 * max(1.0, float(ref.abs().max())))


def check_lora(spec: dict, folder, path, where: str):
    """diffusers (load_lora_weights, set_adapters at STRENGTH) and ldmkit (read_lora, merged at STRENGTH)."""
    from diffusers import StableDiffusionXLPipeline

    ours = Pipeline.load(folder, precision="fp32")
    plain = ours_of(ours, spec)
    ref = StableDiffusionXLPipeline.from_pretrained(str(folder))
    ref.load_lora_weights(str(path), adapter_name="x")
    ref.set_adapters(["x"], adapter_weights=[STRENGTH])
    want = theirs(ref, spec)
    lora = read_lora(path, ours.model)
    ours.loras.apply([(lora, STRENGTH)])
    got = ours_of(ours, spec)
    for a, b, before, what in zip(want, got, plain, ("UNet", "towers' hidden states", "pooled vector")):
        assert (a - before).abs().mean() > 1e-3, f"{where}: the LoRA changes nothing in the {what}"
        assert close(b, a), f"{where}: {what} differ by {(a - b).abs().max():.2e}"
    return ref, ours, lora


def check_image(ref, ours, spec: dict, ours_prompt: str, ref_prompt: str, mode: str, where: str) -> np.ndarray:
    """One whole generation (not square, guided, a negative prompt) by each; 1/255 mean. Ours is returned."""
    native = spec["unet"]["sample_size"] * 2 ** (spec["vae_levels"] - 1)
    width = 2 * native + (-2 * native % 8)
    kw = dict(negative_prompt="blurry", width=width, height=width + 8)
    image = ours(ours_prompt, steps=4, cfg=5.0, sampler="euler", seed=3, prompt_mode=mode, **kw).images[0]
    want = ref(ref_prompt, generator=generators_for(3, 1), num_inference_steps=4, guidance_scale=5.0, **kw).images[0]
    image = np.asarray(image, dtype=np.float64)
    diff = np.abs(image - np.asarray(want, dtype=np.float64))
    assert diff.mean() <= 1.0, f"{where}: images differ by {diff.mean():.2f}/255"
    return image


@pytest.mark.parametrize("layout", ["kohya", "kohya-diffusers-names", "peft"])
def test_sdxl_lora_equals_diffusers(base, layout):
    spec, root = base
    path = root / f"{layout}.safetensors"
    ref, ours, lora = check_lora(spec, root / "pipe", path, f"{layout} LoRA")
    towers = {p.module.split(".")[1] for p in lora.patches if p.target == "text"}
    assert towers == {"0", "1"}  # both towers' layers, each on its own tower
    ours.lora_dir = root  # and through the prompt's tag, in a whole generation
    tagged = check_image(ref, ours, spec, f"{PROMPT} <lora:{layout}:{STRENGTH}>", PROMPT, "truncate", layout)
    ref.disable_lora()  # the same call without the LoRA, by both: the image check is not blind to it
    plain = check_image(ref, ours, spec, PROMPT, PROMPT, "truncate", f"{layout}, LoRA off")
    assert np.abs(tagged - plain).mean() > 5, f"{layout}: the LoRA hardly changes the image"
    result = ours(f"a cat <lora:{layout}:{STRENGTH}>", steps=1, width=16, height=16)
    assert f"{layout}: {lora.hash}" in result.infotexts[0]


def test_refiner_lora_reads_lora_te2_as_its_only_tower(tmp_path):
    spec = draw(REFINER)
    assert spec["refiner"] and len(spec["towers"]) == 1
    ref = build(spec, tmp_path / "pipe", REFINER)
    save_file(kohya_lora(ref, spec), str(tmp_path / "refiner.safetensors"))
    *_, lora = check_lora(spec, tmp_path / "pipe", tmp_path / "refiner.safetensors", "refiner LoRA")
    assert {p.module.split(".")[1] for p in lora.patches if p.target == "text"} == {"0"}


def test_sdxl_embedding_gives_each_tower_its_vectors_as_diffusers(base, tmp_path):
    """{clip_l, clip_g} vectors, loaded by diffusers once per tower with its tokenizer and by ldmkit by the
    file's name: the same hidden states and pooled vector for a prompt using the word (the webui prompt
    mode; for a short prompt with no emphasis it tokenizes as diffusers does), and the same image."""
    from diffusers import StableDiffusionXLPipeline

    spec, root = base
    g = torch.Generator().manual_seed(5)
    widths = [t["hidden_size"] for t in spec["towers"]]
    vectors = {
        "clip_l": torch.randn(2, widths[0], generator=g) * 0.1,
        "clip_g": torch.randn(2, widths[1], generator=g) * 0.1,
    }
    save_file(vectors, str(tmp_path / "mystyle.safetensors"))
    ref = StableDiffusionXLPipeline.from_pretrained(str(root / "pipe"))
    for key, encoder, tokenizer in (
        ("clip_l", ref.text_encoder, ref.tokenizer),
        ("clip_g", ref.text_encoder_2, ref.tokenizer_2),
    ):
        ref.load_textual_inversion(vectors[key], token="mystyle", text_encoder=encoder, tokenizer=tokenizer)
    ours = Pipeline.load(root / "pipe", precision="fp32")
    te = ours.model.text_encoder
    for tower in te.embedders:  # as SDXL's published configs say: pooling at the largest id, unless fixed
        tower.hf_model.eos_token_id = 2
    assert ours.embeddings.load_folder(tmp_path) == ["mystyle"]
    prompt = "a mystyle cat on a mat"
    with torch.no_grad():
        want, _, want_pooled, _ = ref.encode_prompt([prompt], device="cpu", do_classifier_free_guidance=False)
        got = encode_prompts(te, [prompt], mode="webui", embeddings=ours.embeddings)
        plain = encode_prompts(te, [prompt], mode="webui")  # the word as text, not the embedding
    assert (got.context - plain.context).abs().mean() > 1e-3 and (got.pooled - plain.pooled).abs().mean() > 1e-3
    assert close(got.context, want), f"hidden states differ by {(got.context - want).abs().max():.2e}"
    assert close(got.pooled, want_pooled), f"pooled vectors differ by {(got.pooled - want_pooled).abs().max():.2e}"
    check_image(ref, ours, spec, prompt, prompt, "webui", "SDXL embedding")
    with pytest.raises(ConfigError, match="webui prompt mode"):
        ours(prompt, prompt_mode="truncate", steps=1, width=16, height=16)


def test_sd1_files_are_refused_on_sdxl_and_sdxl_files_on_sd1(base, tmp_path):
    """A LoRA or an embedding made for SD 1.x, used on SDXL (and SDXL's on SD 1.x): one line, before any work."""
    from test_lora import random_lora

    spec, root = base
    sd1_ref = tiny_pipeline(tmp_path / "sd1")
    sd1 = Pipeline.load(tmp_path / "sd1", precision="fp32")
    sdxl = Pipeline.load(root / "pipe", precision="fp32")
    (tmp_path / "loras").mkdir()
    for layout in ("kohya", "peft"):
        save_file(random_lora(sd1_ref, layout), str(tmp_path / "loras" / f"sd1-{layout}.safetensors"))
    sdxl.lora_dir = tmp_path / "loras"
    cases = [(sdxl, tmp_path / "loras" / f"sd1-{layout}.safetensors") for layout in ("kohya", "peft")]
    cases += [(sd1, root / f"{layout}.safetensors") for layout in ("kohya", "peft")]
    for pipe, path in cases:
        with pytest.raises(CheckpointError, match="a LoRA for another architecture: .* match nothing") as e:
            read_lora(path, pipe.model)
        assert "\n" not in str(e.value)
    steps = []
    with pytest.raises(CheckpointError, match="another architecture"):
        sdxl("a cat <lora:sd1-kohya:1>", steps=2, width=16, height=16, callback=steps.append)
    assert steps == []
    save_file({"emb_params": torch.randn(2, 768)}, str(tmp_path / "sd15.safetensors"))
    clip_l, clip_g = (t["hidden_size"] for t in spec["towers"])
    sizes = f"clip_l {clip_l} \\+ clip_g {clip_g}"
    with pytest.raises(CheckpointError, match=f"vectors of size 768, but this model's text towers use {sizes} "):
        sdxl.embeddings.load(tmp_path / "sd15.safetensors")
    save_file({"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 48)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"vectors of size clip_l 32 \+ clip_g 48, but this model's text tower uses"
    ):
        sd1.embeddings.load(tmp_path / "xl.safetensors")
    save_file({"clip_l": torch.randn(2, clip_l), "clip_g": torch.randn(3, clip_g)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(CheckpointError, match=r"differ in number \(clip_l 2, clip_g 3\)"):
        sdxl.embeddings.load(tmp_path / "odd.safetensors")
    assert sdxl.embeddings.vectors == {} and sd1.embeddings.vectors == {}
