"""SDXL ControlNets against diffusers 0.42.1 on random weights.

A tiny SDXL base pipeline is built by diffusers (tests/test_sdxl.py's `draw` and `build`, drawn with
no attention at the first level and a transformer depth per level), and a random `ControlNetModel`
made from its UNet (`from_unet`: the `text_time` addition embedding, randomised so that its zero
convolutions are not zero). ldmkit reads it as a folder, as a diffusers-layout single file and in the
original layout (`control_model.*`, `label_emb.0.0/0.2`), and must compute what diffusers computes:
the residuals of one call with the addition embedding's inputs, and a whole guided generation of
`StableDiffusionXLControlNetPipeline` on the same seed, the ControlNet given the same y as the UNet (the
unconditional half the negative prompt's). ControlNets for another base are refused in one line."""

import copy
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_sdxl import build, draw

from conftest import randomize, tiny_diffusers_unet
from ldmkit.checkpoints.controlnet_files import load_controlnet, save_controlnet, save_controlnet_diffusers
from ldmkit.diffusion.sampling import generators_for
from ldmkit.errors import ConfigError
from ldmkit.nn.embedding import size_embedding
from ldmkit.pipelines import Pipeline
from ldmkit.pipelines.control import ControlInput

WIDTH, HEIGHT = 24, 32


def spec_without_first_level_attention() -> dict:
    spec = copy.deepcopy(draw(2))  # a base model, two levels of widths 8 and 16, VAE factor 2
    u = spec["unet"]
    u["down_block_types"] = ["DownBlock2D", "CrossAttnDownBlock2D"]
    u["up_block_types"] = ["CrossAttnUpBlock2D", "UpBlock2D"]
    u["transformer_layers_per_block"] = [1, 2]
    return spec


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    from diffusers import ControlNetModel

    root = tmp_path_factory.mktemp("sdxl-cn")
    spec = spec_without_first_level_attention()
    pipe = build(spec, root / "pipe", 2)
    cn = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32))  # hint factor 2
    cn = randomize(cn, seed=7)
    assert cn.config.addition_embed_type == "text_time"
    cn.save_pretrained(str(root / "cn"))
    save_file(load_file(str(root / "cn" / "diffusion_pytorch_model.safetensors")), str(root / "cn.safetensors"))
    ours = Pipeline.load(root / "pipe", precision="fp32")
    return pipe, cn, ours, spec, root


def call_inputs(spec, batch: int = 2):
    g = torch.Generator().manual_seed(0)
    u = spec["unet"]
    x = torch.randn(batch, 4, HEIGHT // 2, WIDTH // 2, generator=g)
    ctx = torch.randn(batch, 5, u["cross_attention_dim"], generator=g)
    text_embeds = torch.randn(batch, spec["towers"][-1]["projection_dim"], generator=g)
    time_ids = torch.tensor([[64.0, 48, 0, 8, 64, 48], [32, 32, 4, 0, 40, 40]])[:batch]
    hint = torch.rand(batch, 3, HEIGHT, WIDTH, generator=g)
    y = torch.cat([text_embeds, size_embedding(time_ids, u["addition_time_embed_dim"])], dim=-1)
    return x, ctx, hint, {"text_embeds": text_embeds, "time_ids": time_ids}, y


def close(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    return bool((ours - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max())))


@pytest.mark.parametrize("layout", ["cn", "cn.safetensors"])
def test_residuals_and_the_controlled_unet_equal_diffusers(made, layout):
    pipe, cn, ours, spec, root = made
    net = load_controlnet(root / layout, base=ours.model.unet.config)
    assert net.config.addition_time_embed_dim == spec["unet"]["addition_time_embed_dim"]
    x, ctx, hint, added, y = call_inputs(spec)
    t = torch.tensor([3, 901])
    with torch.no_grad():
        down, mid = cn(x, t, ctx, controlnet_cond=hint, added_cond_kwargs=added, return_dict=False)
        res = net(x, hint, t, ctx, y=y)
        theirs = pipe.unet(
            x, t, ctx, added_cond_kwargs=added, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
        mine = ours.model.unet(x, t, ctx, y=y, control=res)
        plain = pipe.unet(x, t, ctx, added_cond_kwargs=added).sample
        # the addition embedding reaches the residuals: other micro-conditioning, other residuals
        other = net(x, hint, t, ctx, y=torch.cat([y[:, :16], y[:, 16:].flip(0)], dim=-1))
    assert len(res) == len(down) + 1
    for i, (a, b) in enumerate(zip([*down, mid], res)):
        assert a.abs().mean() > 1e-3 and close(b, a), f"residual {i}"
    assert max((a - b).abs().max() for a, b in zip(res, other)) > 1e-3
    assert (theirs - plain).abs().mean() > 1e-2  # control changes the output
    assert close(mine, theirs)


@pytest.mark.parametrize("layout", ["cn", "cn.safetensors"])
def test_a_controlnet_with_fewer_transformer_layers_than_its_base(made, tmp_path, layout):
    """Smaller SDXL ControlNets keep the base's skips but drop transformer layers (here all of them:
    no cross-attention weights, so a single file takes the base's context width)."""
    from diffusers import ControlNetModel

    pipe, _, ours, spec, _ = made
    cn = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32))
    cn = randomize(ControlNetModel.from_config({**cn.config, "transformer_layers_per_block": [0, 0]}), seed=8)
    cn.save_pretrained(str(tmp_path / "cn"))
    save_file(cn.state_dict(), str(tmp_path / "cn.safetensors"))
    net = load_controlnet(tmp_path / layout, base=ours.model.unet.config)
    x, ctx, hint, added, y = call_inputs(spec)
    t = torch.tensor([3, 901])
    with torch.no_grad():
        down, mid = cn(x, t, ctx, controlnet_cond=hint, added_cond_kwargs=added, return_dict=False)
        res = net(x, hint, t, ctx, y=y)
    assert all(close(b, a) for a, b in zip([*down, mid], res))


def reference_pipeline(made):
    from diffusers import StableDiffusionXLControlNetPipeline

    pipe, cn, *_ = made
    return StableDiffusionXLControlNetPipeline(**pipe.components, controlnet=cn)


def control_image():
    from PIL import Image

    a = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    a[6:26, 8:12] = 255
    a[20:24, 2:22] = 200
    return Image.fromarray(a)  # at the output size: neither side resizes it


@pytest.mark.parametrize("start,end", [(0.0, 1.0), (0.25, 0.75)])
def test_controlled_generation_equals_diffusers_pipeline(made, start, end):
    _, _, ours, _, root = made
    ref_pipe = reference_pipeline(made)
    image = control_image()
    common = dict(negative_prompt="blurry", image=image, num_inference_steps=4, guidance_scale=5.0)
    # micro-conditioning of the negative prompt's own: its half's y differs from the prompt's
    micro = dict(original_size=(64, 48), crops_coords_top_left=(4, 12), target_size=(HEIGHT + 8, WIDTH))
    micro.update(negative_original_size=(HEIGHT, HEIGHT), negative_crops_coords_top_left=(0, 8))
    micro.update(negative_target_size=(WIDTH, HEIGHT))
    common.update(height=HEIGHT, width=WIDTH, output_type="np", **micro)
    ref = ref_pipe(
        "a red circle",
        generator=generators_for(3, 1),
        controlnet_conditioning_scale=0.8,
        control_guidance_start=start,
        control_guidance_end=end,
        **common,
    ).images[0]
    plain = ref_pipe("a red circle", generator=generators_for(3, 1), controlnet_conditioning_scale=0.0, **common)
    net = load_controlnet(root / "cn", base=ours.model.unet.config)
    control = [ControlInput(net, image, "none", strength=0.8, start=start, end=end, name="cn")]
    result = ours(
        "a red circle",
        negative_prompt="blurry",
        steps=4,
        cfg=5.0,
        sampler="euler",
        seed=3,
        width=WIDTH,
        height=HEIGHT,
        prompt_mode="truncate",
        control=control,
        **micro,
    )
    got = np.asarray(result.images[0], dtype=np.float64) / 255
    assert np.abs(ref - plain.images[0]).mean() > 2 / 255  # the ControlNet changed the picture
    assert np.abs(got - ref).mean() <= 1 / 255
    assert f'ControlNet 0: "Module: none, Model: cn, Weight: 0.8, Guidance Start: {start:g}' in result.infotexts[0]


@pytest.mark.parametrize("guess_mode", [False, True])
def test_the_controlnet_gets_each_halfs_y(made, guess_mode):
    """Guided: the ControlNet sees [negative y, y] as the UNet does; in guess mode the prompt's half
    alone, with y, its residuals scaled by the original work's formula."""
    from ldmkit.diffusion.denoiser import Conditioning, Control, Denoiser
    from ldmkit.diffusion.schedule import NoiseSchedule
    from ldmkit.models.controlnet import guess_mode_scales

    _, _, ours, spec, root = made
    unet = ours.model.unet
    net = load_controlnet(root / "cn", base=unet.config)
    x, ctx, hint, _, y = call_inputs(spec)
    x, hint, ctx, uncond, y, uncond_y = x[:1], hint[:1], ctx[:1], ctx[1:], y[:1], y[1:]
    sigma = 3.0
    schedule = NoiseSchedule.from_config(ours.model.config.schedule, ours.model.alphas_cumprod)
    denoiser = Denoiser(unet, schedule, "epsilon")
    cond = Conditioning(ctx, uncond, cfg_scale=4.0, y=y, uncond_y=uncond_y)
    cond.control = [Control(net, hint, 0.7, guess_mode=guess_mode)]
    x0 = denoiser(x, sigma, cond)
    with torch.no_grad():
        x_in = x / (sigma**2 + 1) ** 0.5
        t = torch.full((1,), denoiser.timestep(sigma))
        res_cond = net(x_in, hint, t, ctx, y=y)
        scales = guess_mode_scales(len(res_cond)) if guess_mode else [1.0] * len(res_cond)
        res_cond = [r * 0.7 * s for r, s in zip(res_cond, scales)]
        res_uncond = None if guess_mode else [r * 0.7 for r in net(x_in, hint, t, uncond, y=uncond_y)]
        e_cond = unet(x_in, t, ctx, y=y, control=res_cond)
        e_uncond = unet(x_in, t, uncond, y=uncond_y, control=res_uncond)
        want = x - sigma * (e_uncond + 4.0 * (e_cond - e_uncond))
        # the prompt's y given to the ControlNet's unconditional half instead: measurably different
        wrong = unet(x_in, t, uncond, y=uncond_y, control=[r * 0.7 for r in net(x_in, hint, t, uncond, y=y)])
        off = x - sigma * (wrong + 4.0 * (e_cond - wrong))
    assert (x0 - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))
    if not guess_mode:
        assert (off - want).abs().max() > 1e-2


# --- the original layout ------------------------------------------------------------------------

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1"}
RESNET.update({"norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"})
FIXED = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "controlnet_mid_block": "middle_block_out.0",
    "controlnet_cond_embedding.conv_in": "input_hint_block.0",
}


def original_key(k: str, n: int, stages: int) -> str:
    """The original ControlNet's name of a diffusers ControlNetModel key, by the original code's
    numbering (n: a level's residual blocks plus its downsampler)."""
    resnet = lambda rest: RESNET[rest.split(".")[0]] + rest[len(rest.split(".")[0]) :]  # noqa: E731
    for a, b in FIXED.items():
        if k.startswith(a + "."):
            return b + k[len(a) :]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", k):
        block = f"input_blocks.{int(m[1]) * n + int(m[3]) + 1}"
        return f"{block}.0.{resnet(m[4])}" if m[2] == "resnets" else f"{block}.1.{m[4]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", k):
        return f"input_blocks.{(int(m[1]) + 1) * n}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", k):
        return f"middle_block.{2 * int(m[2])}.{resnet(m[3])}" if m[1] == "resnets" else f"middle_block.1.{m[3]}"
    if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(.+)", k):
        return f"zero_convs.{m[1]}.0.{m[2]}"
    if m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.+)", k):
        return f"input_hint_block.{2 * int(m[1]) + 2}.{m[2]}"
    if m := re.fullmatch(r"controlnet_cond_embedding\.conv_out\.(.+)", k):
        return f"input_hint_block.{4 * stages + 2}.{m[1]}"
    raise KeyError(k)


def original_state(cn) -> dict:
    n = cn.config.layers_per_block + 1
    stages = len(cn.config.conditioning_embedding_out_channels) - 1
    return {"control_model." + original_key(k, n, stages): v.contiguous() for k, v in cn.state_dict().items()}


def test_the_original_layout_loads_to_the_same_tensors(made, tmp_path):
    from diffusers import ControlNetModel

    _, cn, ours, _, root = made
    base = ours.model.unet.config
    net = load_controlnet(root / "cn", base=base)
    want = net.state_dict()

    def same(other):
        got = other.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    save_controlnet(net, tmp_path / "ours.safetensors")  # ldmkit's writer: original layout + its header
    same(load_controlnet(tmp_path / "ours.safetensors", base=base))
    written = load_file(str(tmp_path / "ours.safetensors"))
    assert "control_model.label_emb.0.0.weight" in written and "control_model.label_emb.0.2.bias" in written
    save_file(written, str(tmp_path / "headerless.safetensors"))  # read off the weights
    same(loaded := load_controlnet(tmp_path / "headerless.safetensors", base=base))
    assert loaded.config == net.config
    by_rules = original_state(cn)  # built from diffusers' names by the original naming rules
    assert by_rules.keys() == written.keys()
    save_file(by_rules, str(tmp_path / "by-rules.safetensors"))
    same(load_controlnet(tmp_path / "by-rules.safetensors", base=base))
    save_controlnet_diffusers(net, tmp_path / "back")  # and diffusers reads what ldmkit writes
    again = ControlNetModel.from_pretrained(str(tmp_path / "back"))
    assert again.config.addition_embed_type == "text_time"
    assert all(torch.equal(again.state_dict()[k], v) for k, v in cn.state_dict().items())


def xl_width_controlnet(tmp_path):
    """A ControlNet of SDXL's context width (2048) and addition embedding (a pooled 16 + 6 x 256), in
    the original layout without a header: ldmkit tells its family, heads and split from the weights
    and the SDXL row."""
    from diffusers import ControlNetModel

    unet = tiny_diffusers_unet(
        block_out_channels=(64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2048,
        attention_head_dim=1,
        layers_per_block=1,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=16 + 6 * 256,
    )
    cn = randomize(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)), seed=3)
    save_file(original_state(cn), str(tmp_path / "xl.safetensors"))
    return cn, tmp_path / "xl.safetensors"


def test_an_sdxl_controlnet_file_alone_takes_the_sdxl_rules(tmp_path):
    from diffusers import ControlNetModel

    from ldmkit.checkpoints.inspect import inspect_path

    cn, path = xl_width_controlnet(tmp_path)
    net = load_controlnet(path)
    c = net.config
    assert (c.num_head_channels, c.addition_time_embed_dim, c.adm_in_channels) == (64, 256, 16 + 6 * 256)
    assert inspect_path(path)["family"] == "sdxl-controlnet"
    save_controlnet_diffusers(net, tmp_path / "back")
    again = ControlNetModel.from_pretrained(str(tmp_path / "back"))
    assert again.config.addition_embed_type == "text_time" and again.config.addition_time_embed_dim == 256
    assert all(torch.equal(again.state_dict()[k], v) for k, v in cn.state_dict().items())


def test_a_controlnet_for_the_other_family_is_refused_in_one_line(tmp_path):
    from diffusers import ControlNetModel

    from ldmkit.checkpoints.diffusers_folder import unet_config_from_diffusers

    xl, xl_path = xl_width_controlnet(tmp_path)
    sd1_unet = tiny_diffusers_unet(cross_attention_dim=768, attention_head_dim=8)
    ControlNetModel.from_unet(sd1_unet).save_pretrained(str(tmp_path / "sd1-cn"))
    sd1_base = unet_config_from_diffusers(dict(sd1_unet.config), "sd1")
    xl_base = unet_config_from_diffusers({**xl.config, "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}, "xl")
    for path, base, needle in [
        (
            tmp_path / "sd1-cn",
            xl_base,
            "a ControlNet for Stable Diffusion 1.x (text context 768) does not fit this SDXL",
        ),
        (xl_path, sd1_base, "a ControlNet for SDXL (text context 2048) does not fit this Stable Diffusion 1.x model"),
    ]:
        with pytest.raises(ConfigError) as e:
            load_controlnet(path, base=base)
        assert str(e.value).startswith(str(path)) and needle in str(e.value) and "\n" not in str(e.value)
    assert load_controlnet(xl_path, base=xl_base).config.addition_time_embed_dim == 256


def test_generate_with_control_from_the_command_line_and_refusals(made, tmp_path, capsys):
    import json

    from diffusers import ControlNetModel
    from PIL import Image

    from conftest import tiny_pipeline
    from ldmkit.cli import main

    _, _, _, _, root = made
    control_image().save(tmp_path / "edges.png")
    common = ["generate", "a red circle", "--steps", "2", "--seed", "1", "--width", str(WIDTH), "--height"]
    common += [str(HEIGHT), "-q", "--control", f"canny:{tmp_path / 'edges.png'}:0.5"]
    out = tmp_path / "c.png"
    code = main([*common, "--model", str(root / "pipe"), "--controlnet", str(root / "cn.safetensors"), "-o", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(stdout)["written"] == [str(out)]
    assert 'ControlNet 0: "Module: canny, Model: cn, Weight: 0.5' in Image.open(out).info["parameters"]
    sd1 = tiny_pipeline(tmp_path / "sd1")  # an SD 1.x-style model and a ControlNet of its own
    ControlNetModel.from_unet(sd1.unet).save_pretrained(str(tmp_path / "sd1-cn"))
    capsys.readouterr()
    for model, net in [(root / "pipe", tmp_path / "sd1-cn"), (tmp_path / "sd1", root / "cn")]:
        assert main([*common, "--model", str(model), "--controlnet", str(net), "-o", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "ControlNet does not fit this model" in err and err.count("\n") == 1, err
        assert "context size, addition embedding input" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_controlnet_units_of_the_web_ui_api(made, tmp_path):
    import base64
    import io
    import json

    from fastapi.testclient import TestClient
    from PIL import Image

    from ldmkit.server.app import ServeConfig, create_app

    _, _, ours, _, root = made
    buf = io.BytesIO()
    control_image().save(buf, format="PNG")
    unit = {"enabled": True, "image": base64.b64encode(buf.getvalue()).decode(), "module": "none", "model": "cn"}
    unit.update(weight=0.8, guidance_start=0.0, guidance_end=1.0, control_mode="Balanced")
    body = {"prompt": "a red circle", "negative_prompt": "blurry", "width": WIDTH, "height": HEIGHT, "steps": 3}
    body.update(cfg_scale=5, seed=4, sampler_name="Euler", alwayson_scripts={"ControlNet": {"args": [unit]}})
    config = ServeConfig(str(root / "pipe"), outputs=str(tmp_path / "out"), controlnets=[str(root / "cn")])
    with TestClient(create_app(config), raise_server_exceptions=False) as c:
        r = c.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    assert 'ControlNet 0: "Module: none, Model: cn, Weight: 0.8' in json.loads(r.json()["info"])["infotexts"][0]
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))), dtype=np.float64)
    net = load_controlnet(root / "cn", base=ours.model.unet.config)
    direct = ours(
        "a red circle",
        negative_prompt="blurry",
        steps=3,
        cfg=5.0,
        sampler="euler",
        seed=4,
        width=WIDTH,
        height=HEIGHT,
        control=[ControlInput(net, control_image(), "none", strength=0.8, name="cn")],
    ).images[0]
    assert np.array_equal(got, np.asarray(direct, dtype=np.float64))  # the same code path
