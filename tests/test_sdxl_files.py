"""SDXL single files in the original layout (Stability's `sgm` code: `model.diffusion_model.*`,
`first_stage_model.*`, the text towers as `conditioner.embedders.N`), read and written.

Random tiny SDXL pipelines are built by diffusers (tests/test_sdxl.py's `draw` and `build`). A folder
written out by ldmkit as a single file must load back tensor for tensor. A file in the original layout
that ldmkit did not write -- made here from the diffusers pipeline's own state dicts by the rules of
diffusers' scripts/convert_diffusers_to_original_sdxl.py (written out anew below, for any number of
levels), with bigG's `text_projection` in the original's x @ P orientation and its `logit_scale` as
the released files have them -- has no header: ldmkit must read its architecture and family off the
weights and compute what diffusers computes. Such a file cannot say the attention heads, which the
family rules give (64 channels per head, UNet and towers), so its tiny pipeline is drawn with heads
that follow them (`family_spec`); every other size is as small as in test_sdxl.py."""

import re
import types

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_sdxl import build, check_components, draw

from ldmkit.checkpoints.inspect import inspect_path
from ldmkit.checkpoints.single_file import load_model, save_single_file
from ldmkit.errors import CheckpointError

# --- the original layout, from diffusers' names ----------------------------------------------------

UNET_FIXED = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
BIGG_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def _resnet(rest: str) -> str:
    first, _, tail = rest.partition(".")
    return f"{RESNET[first]}.{tail}"


def unet_key(k: str, n: int, up_attention: list[bool]) -> str:
    """n: a level's blocks plus its down- or upsampler (SDXL: 3)."""
    for a, b in UNET_FIXED.items():
        if k.startswith(a + "."):
            return b + k[len(a) :]
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", k):
        side, i, part, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        block = f"input_blocks.{i * n + j + 1}" if side == "down" else f"output_blocks.{i * n + j}"
        return f"{block}.0.{_resnet(rest)}" if part == "resnets" else f"{block}.1.{rest}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", k):
        return f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}" if m[1] == "resnets" else f"middle_block.1.{m[3]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", k):
        return f"input_blocks.{(int(m[1]) + 1) * n}.0.op.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", k):
        i = int(m[1])
        return f"output_blocks.{i * n + n - 1}.{2 if up_attention[i] else 1}.conv.{m[2]}"
    raise KeyError(k)


def vae_key(k: str, levels: int) -> str:
    k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
    k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
    k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", k)
    up = r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\."
    k = re.sub(up, lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", k)
    k = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k)
    if "mid_block.attentions.0." in k:
        module, _, param = k.replace("mid_block.attentions.0.", "mid.attn_1.").rpartition(".")
        head, _, inner = module.partition("mid.attn_1.")
        k = f"{head}mid.attn_1.{VAE_ATTENTION[inner]}.{param}"
    return k


def bigg(state: dict) -> dict:
    """transformers' CLIPTextModelWithProjection -> OpenCLIP's own names, q/k/v fused."""
    out, qkv = {}, {}
    for k, v in state.items():
        k = k.removeprefix("text_model.")
        if k == "text_projection.weight":
            out["text_projection"] = v.t().contiguous()  # the original applies it as x @ P
        elif k == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = v
        elif k == "embeddings.position_embedding.weight":
            out["positional_embedding"] = v
        elif k.startswith("final_layer_norm."):
            out["ln_final." + k.split(".", 1)[1]] = v
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", k):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = v
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", k):
            rest = m[2]
            for a, b in BIGG_LAYER.items():
                rest = rest.replace(a, b)
            out[f"transformer.resblocks.{m[1]}.{rest}"] = v
        elif not k.endswith("position_ids"):
            raise KeyError(k)
    for (n, kind), parts in qkv.items():
        out[f"transformer.resblocks.{n}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    out["logit_scale"] = torch.tensor(4.6052)  # ln 100, as trained; never read
    return out


def sgm_state(pipe, spec: dict) -> dict:
    """The pipeline as an SDXL single file in the original layout."""
    u = spec["unet"]
    n = u["layers_per_block"] + 1
    up_attention = [t.startswith("CrossAttn") for t in u["up_block_types"]]
    state = {f"model.diffusion_model.{unet_key(k, n, up_attention)}": v for k, v in pipe.unet.state_dict().items()}
    for k, v in pipe.vae.state_dict().items():
        k = vae_key(k, spec["vae_levels"])
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight", k):
            v = v[:, :, None, None]  # 1x1 convolutions in the original
        state[f"first_stage_model.{k}"] = v
    index = 0
    if not spec["refiner"]:
        clip = {
            ("" if k.startswith("text_model.") else "text_model.") + k: v
            for k, v in pipe.text_encoder.state_dict().items()
        }
        clip["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # released files carry it
        state.update({f"conditioner.embedders.0.transformer.{k}": v for k, v in clip.items()})
        index = 1
    state.update(
        {f"conditioner.embedders.{index}.model.{k}": v for k, v in bigg(pipe.text_encoder_2.state_dict()).items()}
    )
    return {k: v.contiguous() for k, v in state.items()}


def family_spec(refiner: bool) -> dict:
    """A tiny SDXL whose heads follow the family rules: 64 channels per head in the UNet (one head at
    its width-64 levels) and in the towers (build gives them 4 heads: 256 wide). SDXL's 3 levels of 2
    blocks, attention below the first, a deeper last level; 8-channel micro-conditioning numbers (the
    file says their width: SDXL's is 256)."""
    towers = [] if refiner else [dict(hidden_size=256, act="quick_gelu")]
    towers.append(dict(hidden_size=256, act="gelu", projection_dim=32))
    unet = dict(
        block_out_channels=[32, 64, 64],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        layers_per_block=2,
        transformer_layers_per_block=[1, 1, 2],
        attention_head_dim=[1, 1, 1],
        use_linear_projection=True,
        norm_num_groups=32,
        cross_attention_dim=sum(t["hidden_size"] for t in towers),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + (5 if refiner else 6) * 8,
        sample_size=8,
    )
    return dict(unet=unet, towers=towers, refiner=refiner, vae_levels=2, zeros=not refiner)


def as_pipeline(model):
    return types.SimpleNamespace(model=model)


def file_keys(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def same_tensors(a, b, skip: str = "\0") -> bool:
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if not k.endswith(skip))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(spec, diffusers pipeline, its folder, its original-layout state) of family_spec, built once."""
    cache = {}

    def make(refiner: bool):
        if refiner not in cache:
            spec = family_spec(refiner)
            folder = tmp_path_factory.mktemp("refiner" if refiner else "base") / "pipe"
            pipe = build(spec, folder, seed=21 if refiner else 20)
            cache[refiner] = spec, pipe, folder, sgm_state(pipe, spec)
        return cache[refiner]

    return make


# --- written by ldmkit ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2], ids=["seed-1-refiner", "seed-2-base"])
def test_a_folder_written_as_a_single_file_loads_back_unchanged(seed, tmp_path):
    spec = draw(seed)
    assert spec["refiner"] == (seed == 1)
    pipe = build(spec, tmp_path / "pipe", seed)
    folder = load_model(tmp_path / "pipe")
    save_single_file(folder, tmp_path / "x.safetensors")
    back = load_model(tmp_path / "x.safetensors")
    assert back.config.to_dict() == folder.config.to_dict()
    assert same_tensors(back, folder)
    bigg_at = 0 if spec["refiner"] else 1
    keys = file_keys(tmp_path / "x.safetensors")
    assert f"conditioner.embedders.{bigg_at}.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert f"conditioner.embedders.{bigg_at}.model.text_projection" in keys
    assert not any(k.startswith("cond_stage_model.") for k in keys)
    g = torch.Generator().manual_seed(0)
    u = spec["unet"]
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 3, u["cross_attention_dim"], generator=g)
    y = torch.randn(1, u["projection_class_embeddings_input_dim"], generator=g)
    # Loaded weights are views into the file's buffer at whatever byte offset it gave them; on some CPUs
    # (AVX2) a kernel's rounding depends on that alignment, so both models get freshly allocated copies of
    # their (equal) weights: the same function must then give the same bits.
    for module in (back.unet, folder.unet):
        for t in [*module.parameters(), *module.buffers()]:
            t.data = t.data.clone()
    with torch.no_grad():
        assert torch.equal(back.unet(x, torch.tensor([500]), ctx, y=y), folder.unet(x, torch.tensor([500]), ctx, y=y))
    check_components(pipe, as_pipeline(back), spec, f"seed {seed}")


def test_a_second_towers_own_tokenizer_travels_in_the_header(made, tmp_path):
    from ldmkit.models.tokenizers import ClipTokenizer

    model = load_model(made(False)[2])
    own = ClipTokenizer(77, "!")
    own.is_bundled = lambda: False  # as a folder's own vocabulary would be
    model.conditioner.embedders[1].use_tokenizer(own, "test")
    save_single_file(model, tmp_path / "x.safetensors")
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert set(f.metadata()) >= {"ldmkit", "ldmkit_tokenizer_2"} and "ldmkit_tokenizer" not in f.metadata()
    back = load_model(tmp_path / "x.safetensors")
    assert back.conditioner.embedders[1]._tokenizer is not None and back.conditioner.embedders[0]._tokenizer is None
    assert back.conditioner.embedders[1].tokenizer.special_ids == own.special_ids


# --- in the original layout, not written by ldmkit -----------------------------------------------


@pytest.mark.parametrize("refiner", [False, True], ids=["base", "refiner"])
def test_an_original_layout_file_loads_from_its_weights_alone(refiner, made, tmp_path):
    spec, pipe, folder, state = made(refiner)
    path = tmp_path / "sgm.safetensors"
    save_file(state, str(path))  # no ldmkit header
    model = load_model(path)
    c = model.config
    family = "sdxl-refiner" if refiner else "sdxl"
    info = inspect_path(path)
    assert c.family == family and info["family"] == family and ("text_encoder_2" in info) == (not refiner)
    assert (c.zero_empty_negative, c.image_size, c.vae.scale_factor) == (not refiner, 1024, 0.13025)
    assert c.unet.addition_time_embed_dim == 8 and c.unet.num_head_channels == 64
    assert [t.kind for t in c.text_configs] == (["openclip"] if refiner else ["clip", "openclip"])
    assert c.text_configs[-1].projection_dim == 32 and c.text.hidden_act == ("gelu" if refiner else "quick_gelu")
    check_components(pipe, as_pipeline(model), spec, family)
    v = load_model(path, overrides={"prediction_type": "v_prediction", "clip_skip": 2}).config
    assert v.family == family and v.schedule.prediction_type == "v_prediction"
    assert [t.clip_skip for t in v.text_configs] == [2] * len(v.text_configs)
    # The model the folder gives, tensor for tensor (bigG's logit_scale: diffusers drops it).
    from_folder = load_model(folder)
    assert same_tensors(model, from_folder, skip="logit_scale")
    # What ldmkit writes is this layout, key for key.
    save_single_file(from_folder, tmp_path / "ours.safetensors")
    assert file_keys(tmp_path / "ours.safetensors") == {k for k in state if not k.endswith("position_ids")}


def test_files_converted_by_diffusers_script_load_too(made, tmp_path):
    """diffusers' script leaves bigG's projection a Linear (`text_projection.weight`, [P, hidden]) and
    drops `logit_scale`; older tools drop CLIP's `text_model.` level; some files carry `denoiser.sigmas`."""
    spec, pipe, _, state = made(False)
    variant = {}
    for k, v in state.items():
        if k.endswith("model.text_projection"):
            k, v = k + ".weight", v.t().contiguous()
        elif k.endswith("logit_scale"):
            continue
        variant[k.replace("transformer.text_model.", "transformer.")] = v
    variant["denoiser.sigmas"] = torch.linspace(0.03, 14.6, 1000)
    save_file(variant, str(tmp_path / "variant.safetensors"))
    save_file(state, str(tmp_path / "sgm.safetensors"))
    model = load_model(tmp_path / "variant.safetensors")
    assert model.config.family == "sdxl"
    assert same_tensors(model, load_model(tmp_path / "sgm.safetensors"), skip="logit_scale")


def _drop(prefix):
    return lambda s: {k: v for k, v in s.items() if not k.startswith(prefix)}


def _rename(old, new):
    return lambda s: {k.replace(old, new): v for k, v in s.items()}


def _resize_label_emb(s):
    w = s["model.diffusion_model.label_emb.0.0.weight"]
    return {**s, "model.diffusion_model.label_emb.0.0.weight": torch.zeros(w.shape[0], w.shape[1] + 3)}


BAD = {
    "no bigG": (_drop("conditioner.embedders.1."), r"conditioner\.embedders\.1 is missing"),
    "no CLIP-L": (_drop("conditioner.embedders.0."), r"conditioner\.embedders\.0 is missing"),
    "bigG truncated": (
        _drop("conditioner.embedders.1.model.token_embedding."),
        r"embedders\.1 \(OpenCLIP ViT-bigG\) lacks model\.token_embedding\.weight",
    ),
    "bigG without projection": (
        _drop("conditioner.embedders.1.model.text_projection"),
        r"embedders\.1 \(OpenCLIP ViT-bigG\) lacks model\.text_projection",
    ),
    "unknown tower layout": (
        _rename("conditioner.embedders.1.model.", "conditioner.embedders.1.encoder."),
        r"conditioner\.embedders\.1: unknown text tower layout \(encoder\.",
    ),
    "a layer's attention missing": (
        _drop("conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"),
        r"text towers: missing weight\(s\) embedders\.1\.transformer\.text_model\.encoder\.layers\.1\.self_attn\.",
    ),
    "refiner towers on a base UNet": (
        lambda s: _rename("embedders.1.", "embedders.0.")(_drop("conditioner.embedders.0.")(s)),
        r"UNet cross-attention expects context 512 but the text towers give 256",
    ),
    "addition embedding of another size": (_resize_label_emb, r"addition embedding takes 83 values"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_broken_sdxl_files_are_refused_in_one_line(case, made, tmp_path):
    mutate, message = BAD[case]
    save_file(mutate(made(False)[3]), str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=message) as e:
        load_model(tmp_path / "bad.safetensors")
    assert "\n" not in str(e.value)
