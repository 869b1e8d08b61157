"""ControlNet: parity with diffusers' ControlNetModel on random weights (residuals and the controlled
UNet's output), every file layout, the zero-convolution property, guess mode's formula."""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import randomize, tiny_diffusers_unet
from ldmkit.checkpoints.components import strict_load
from ldmkit.checkpoints.controlnet_files import load_controlnet, save_controlnet, save_controlnet_diffusers
from ldmkit.checkpoints.diffusers_folder import unet_config_from_diffusers
from ldmkit.checkpoints.keymaps import rename, unet_to_diffusers
from ldmkit.errors import CheckpointError, ConfigError
from ldmkit.models.controlnet import ControlNet, guess_mode_scales
from ldmkit.models.unet import UNetModel


def reference(hint_channels=(16, 32, 96, 256), **unet_overrides):
    from diffusers import ControlNetModel

    unet = tiny_diffusers_unet(**unet_overrides)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint_channels)
    return unet, randomize(cn, seed=5)


def ours_unet(ref, tmp_path):
    ref.save_pretrained(str(tmp_path / "unet"))
    import json

    config = unet_config_from_diffusers(json.loads((tmp_path / "unet" / "config.json").read_text()), "unet")
    unet = UNetModel(config)
    state = load_file(str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    strict_load(unet, rename(state, unet_to_diffusers(config), reverse=True), "UNet", "test")
    return unet.eval()


def inputs(f: int, hw: int = 8, batch: int = 2):
    g = torch.Generator().manual_seed(hw)
    x = torch.randn(batch, 4, hw, hw, generator=g)
    t = torch.tensor([999, 3][:batch])
    ctx = torch.randn(batch, 7, 32, generator=g)
    hint = torch.rand(batch, 3, hw * f, hw * f, generator=g)
    return x, t, ctx, hint


@pytest.mark.parametrize("hint_channels", [(16, 32, 96, 256), (8, 16)])
def test_residuals_and_controlled_unet_equal_diffusers(tmp_path, hint_channels):
    ref_unet, ref = reference(hint_channels)
    ref.save_pretrained(str(tmp_path / "cn"))
    unet = ours_unet(ref_unet, tmp_path)
    net = load_controlnet(tmp_path / "cn", base=unet.config)
    f = 2 ** (len(hint_channels) - 1)
    assert net.control_config.downsample_factor == f
    x, t, ctx, hint = inputs(f)
    with torch.no_grad():
        down, mid = ref(x, t, ctx, controlnet_cond=hint, conditioning_scale=1.0, return_dict=False)
        theirs = ref_unet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        res = net(x, hint, t, ctx)
        mine = unet(x, t, ctx, control=res)
    assert len(res) == len(down) + 1
    for a, b in zip([*down, mid], res):
        assert a.abs().mean() > 1e-3 and (a - b).abs().max() <= 1e-4
    assert (theirs - ref_unet(x, t, ctx).sample).abs().mean() > 1e-2  # control changes the output
    assert (theirs - mine).abs().max() <= 1e-4


def test_every_file_layout_loads_the_same_weights(tmp_path):
    ref_unet, ref = reference()
    ref.save_pretrained(str(tmp_path / "cn"))
    base = ours_unet(ref_unet, tmp_path).config
    net = load_controlnet(tmp_path / "cn", base=base)
    want = net.state_dict()

    def same(other):
        got = other.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    save_controlnet(net, tmp_path / "ours.safetensors")  # original layout + our header
    same(load_controlnet(tmp_path / "ours.safetensors"))
    original = load_file(str(tmp_path / "ours.safetensors"))
    assert all(k.startswith("control_model.") for k in original)
    save_file(original, str(tmp_path / "original.safetensors"))  # no header: read off the weights
    same(load_controlnet(tmp_path / "original.safetensors", base=base))
    save_file({k[len("control_model.") :]: v for k, v in original.items()}, str(tmp_path / "bare.safetensors"))
    same(load_controlnet(tmp_path / "bare.safetensors", base=base))
    # a diffusers-layout single file, without its config.json
    diffusers_state = load_file(str(tmp_path / "cn" / "diffusion_pytorch_model.safetensors"))
    save_file(diffusers_state, str(tmp_path / "diffusers-single.safetensors"))
    same(load_controlnet(tmp_path / "diffusers-single.safetensors", base=base))
    save_controlnet_diffusers(net, tmp_path / "back")
    same(load_controlnet(tmp_path / "back", base=base))
    from diffusers import ControlNetModel

    again = ControlNetModel.from_pretrained(str(tmp_path / "back"))  # diffusers reads what we write
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ref.state_dict().items())


def test_original_files_without_a_base_take_the_sd_family_heads(tmp_path):
    ref_unet, ref = reference(cross_attention_dim=768, attention_head_dim=8)
    ref.save_pretrained(str(tmp_path / "cn"))
    net = load_controlnet(tmp_path / "cn")
    save_file(load_file(str(tmp_path / "cn" / "diffusion_pytorch_model.safetensors")), str(tmp_path / "d.safetensors"))
    alone = load_controlnet(tmp_path / "d.safetensors")
    assert alone.config.context_dim == 768 and alone.config.num_heads == 8 and alone.config.num_head_channels == -1
    assert alone.config.norm_groups == 32  # the SD rule; not in the weights
    assert replace(alone.config, norm_groups=8) == net.config


def test_a_fresh_controlnet_changes_nothing_and_then_learns():
    torch.manual_seed(0)
    unet = randomize(UNetModel(tiny_unet_config()), std=0.05)
    net = ControlNet.from_unet(unet, hint_block_channels=(8, 16))
    assert all(torch.equal(net.state_dict()[k], v) for k, v in unet.state_dict().items() if k in net.state_dict())
    x, t, ctx, hint = inputs(2)
    with torch.no_grad():
        plain = unet(x, t, ctx)
        res = net(x, hint, t, ctx)
        assert all(r.abs().max() == 0 for r in res)
        assert torch.equal(unet(x, t, ctx, control=res), plain)
    unet.requires_grad_(False)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    hint_first = net.input_hint_block[0].weight
    hint_last = net.input_hint_block[-1].weight
    copied = net.input_blocks[1][0].in_layers[2].weight

    def step():
        opt.zero_grad()
        unet(x, t, ctx, control=net(x, hint, t, ctx)).square().mean().backward()
        grads = {
            name: p.grad.abs().max().item()
            for name, p in [("first", hint_first), ("last", hint_last), ("copied", copied)]
        }
        opt.step()
        return grads

    g = step()  # zero convolutions: only they get gradients at first
    assert net.zero_convs[1][0].weight.grad.abs().max() > 0
    assert g == {"first": 0.0, "last": 0.0, "copied": 0.0}
    g = step()  # once they are not zero, gradients reach the copied blocks and the hint's last layer
    assert g["copied"] > 0 and g["last"] > 0 and g["first"] == 0.0
    g = step()  # and then the whole hint encoder
    assert g["first"] > 0


def tiny_unet_config():
    from ldmkit.models.unet import UNetConfig

    return UNetConfig(
        channels=(32, 64),
        num_res_blocks=1,
        attention_resolutions=(1, 2),
        num_heads=2,
        context_dim=32,
        norm_groups=8,
    )


def test_guess_mode_scales_are_the_original_formula():
    scales = guess_mode_scales(13)
    assert scales == [0.825 ** (12 - i) for i in range(13)]
    assert scales[-1] == 1.0 and abs(scales[0] - 0.09941) < 1e-5


def test_a_controlnet_for_another_base_is_refused(tmp_path):
    ref_unet, ref = reference()
    ref.save_pretrained(str(tmp_path / "cn"))
    other = tiny_unet_config()
    with pytest.raises(ConfigError, match="ControlNet does not fit this model"):
        load_controlnet(tmp_path / "cn", base=other)


def test_files_that_are_not_controlnets_are_refused(tmp_path):
    save_file({"a": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match="not a ControlNet"):
        load_controlnet(tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        load_controlnet(tmp_path / "missing.safetensors")


@pytest.fixture(scope="module")
def controlled_folders(tmp_path_factory):
    """A tiny diffusers SD pipeline folder and a random ControlNet folder for its UNet."""
    from diffusers import ControlNetModel

    from conftest import tiny_pipeline

    root = tmp_path_factory.mktemp("cn-e2e")
    pipe = tiny_pipeline(root / "pipe")
    cn = randomize(ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32)), seed=7)
    cn.save_pretrained(str(root / "cn"))
    return pipe, cn, root


def control_image(size=32):
    import numpy as np
    from PIL import Image

    a = np.zeros((size, size, 3), dtype=np.uint8)
    a[8:24, 10:14] = 255
    a[20:24, 4:28] = 200
    return Image.fromarray(a)


def test_controlled_generation_equals_diffusers_pipeline(controlled_folders):
    import numpy as np
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionControlNetPipeline

    from ldmkit.diffusion.registry import get_sampler
    from ldmkit.diffusion.sampling import generators_for
    from ldmkit.pipelines import Pipeline
    from ldmkit.pipelines.control import ControlInput

    pipe, cn, root = controlled_folders
    spec = get_sampler("dpmpp_2m_karras")
    ref_pipe = StableDiffusionControlNetPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        controlnet=cn,
        scheduler=DPMSolverMultistepScheduler(**spec.diffusers_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    image = control_image()
    settings = dict(num_inference_steps=6, guidance_scale=5.0, height=32, width=32)
    # control on for steps 2 and 3 of 6 only (diffusers' rule for start / end)
    ref = ref_pipe(
        "a red circle",
        image=image,
        generator=generators_for(5, 1),
        controlnet_conditioning_scale=0.8,
        control_guidance_start=0.2,
        control_guidance_end=0.8,
        output_type="np",
        **settings,
    ).images[0]
    plain = ref_pipe(
        "a red circle",
        image=image,
        generator=generators_for(5, 1),
        controlnet_conditioning_scale=0.0,
        output_type="np",
        **settings,
    ).images[0]
    ours_pipe = Pipeline.load(root / "pipe")
    net = load_controlnet(root / "cn", base=ours_pipe.model.unet.config)
    control = [ControlInput(net, image, "none", strength=0.8, start=0.2, end=0.8, name="cn")]
    result = ours_pipe(
        "a red circle",
        steps=6,
        cfg=5.0,
        sampler="dpmpp_2m_karras",
        seed=5,
        width=32,
        height=32,
        prompt_mode="truncate",
        control=control,
    )
    ours = np.asarray(result.images[0], dtype=np.float64) / 255
    assert np.abs(ref - plain).mean() > 0.01  # the ControlNet changed the picture
    assert np.abs(ours - ref).mean() <= 1 / 255
    assert 'ControlNet 0: "Module: none, Model: cn, Weight: 0.8, Guidance Start: 0.2' in result.infotexts[0]
    assert result.control_images[0].size == (32, 32)


def test_guess_mode_follows_its_formula():
    from ldmkit.diffusion.denoiser import Conditioning, Control, Denoiser
    from ldmkit.diffusion.schedule import NoiseSchedule, SamplingSchedule
    from ldmkit.models.ldm import ScheduleConfig

    torch.manual_seed(0)
    unet = randomize(UNetModel(tiny_unet_config()), std=0.05)
    net = randomize(ControlNet.from_unet(unet, hint_block_channels=(8, 16)), seed=3, std=0.05)
    x, _, ctx, hint = inputs(2, batch=1)
    uncond = torch.randn_like(ctx)
    schedule = NoiseSchedule.from_config(ScheduleConfig())
    sigma = 3.0
    walk = SamplingSchedule(torch.tensor([sigma, 1.0, 0.0]), torch.tensor([]), 1.0)  # timesteps from the sigmas
    denoiser = Denoiser(unet, schedule, "epsilon", walk)
    cond = Conditioning(ctx, uncond, cfg_scale=4.0, control=[Control(net, hint, 0.7, guess_mode=True)])
    x0 = denoiser(x, sigma, cond)
    with torch.no_grad():
        x_in = x / (sigma**2 + 1) ** 0.5
        t = torch.full((1,), denoiser.timestep(sigma))
        res = net(x_in, hint, t, ctx)
        scaled = [r * 0.7 * 0.825 ** (len(res) - 1 - i) for i, r in enumerate(res)]
        e_cond = unet(x_in, t, ctx, control=scaled)
        e_uncond = unet(x_in, t, uncond)  # no control on the unconditional branch
        want = x - sigma * (e_uncond + 4.0 * (e_cond - e_uncond))
    # fp32 noise of batch-2 vs batch-1 evaluation, amplified by sigma * cfg = 12; a wrong scale or branch is >= 1e-2
    assert (x0 - want).abs().max() <= 1e-4
    # outside [start, end) the ControlNet is not run at all
    cond.control[0] = Control(net, hint, 0.7, start=0.5, end=1.0)
    with torch.no_grad():
        plain = x - sigma * (e_uncond + 4.0 * (unet(x_in, t, ctx) - e_uncond))
    assert (denoiser(x, sigma, cond) - plain).abs().max() <= 1e-4


def test_generate_with_control_from_the_command_line(controlled_folders, tmp_path, capsys):
    import json

    from PIL import Image

    from ldmkit.cli import main

    _, _, root = controlled_folders
    control_image(48).save(tmp_path / "edges.png")  # another size: resized to the output's
    common = [
        "generate",
        "a red circle",
        "--model",
        str(root / "pipe"),
        "--steps",
        "3",
        "--seed",
        "1",
        "--width",
        "32",
        "--height",
        "32",
        "-q",
    ]
    out = tmp_path / "c.png"
    code = main(
        [
            *common,
            "--controlnet",
            str(root / "cn"),
            "--control",
            f"canny:{tmp_path / 'edges.png'}:0.5",
            "--control-end",
            "0.5",
            "-o",
            str(out),
        ]
    )
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(stdout)["written"] == [str(out)]
    expected = 'ControlNet 0: "Module: canny, Model: cn, Weight: 0.5, Guidance Start: 0, Guidance End: 0.5'
    assert expected in Image.open(out).info["parameters"]
    (tmp_path / "bad.png").write_bytes(b"not an image")
    other = tmp_path / "other-cn"
    from diffusers import ControlNetModel

    ControlNetModel.from_unet(tiny_diffusers_unet(cross_attention_dim=48)).save_pretrained(str(other))
    for extra, needle in [
        (["--control", "blur:x.png"], "--control type 'blur'; allowed: canny, scribble, threshold, none"),
        (["--control", "canny"], "expected TYPE:IMAGE[:STRENGTH]"),
        (["--controlnet", str(root / "cn"), "--control", f"none:{tmp_path / 'bad.png'}"], "not a readable image"),
        (["--controlnet", str(other), "--control", f"none:{tmp_path / 'edges.png'}"], "does not fit this model"),
        (["--control", f"none:{tmp_path / 'edges.png'}"], "needs --controlnet FILE"),
        (
            [
                "--controlnet",
                str(root / "cn"),
                "--control",
                f"none:{tmp_path / 'edges.png'}",
                "--control-start",
                "0.9",
                "--control-end",
                "0.5",
            ],
            "control start 0.9, end 0.5",
        ),
    ]:
        assert main([*common, *extra, "-o", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and "Traceback" not in err, err
        assert err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def test_inspect_and_convert_controlnet_files(tmp_path, capsys):
    import json

    from ldmkit.cli import main

    ref_unet, ref = reference(cross_attention_dim=768, attention_head_dim=8)
    ref.save_pretrained(str(tmp_path / "cn"))
    assert main(["inspect", str(tmp_path / "cn")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "sd1-controlnet" and info["hint_downsample_factor"] == 8
    assert info["parameters"]["controlnet"] == sum(p.numel() for p in ref.parameters())
    assert (
        main(
            [
                "convert",
                str(tmp_path / "cn"),
                str(tmp_path / "cn.safetensors"),
                "--to",
                "single-file",
                "--dtype",
                "fp16",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["family"] == "sd1-controlnet"
    assert main(["inspect", str(tmp_path / "cn.safetensors")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dtype"] == ["float16"] and info["family"] == "sd1-controlnet"
    assert main(["convert", str(tmp_path / "cn.safetensors"), str(tmp_path / "back"), "--to", "diffusers"]) == 0
    capsys.readouterr()
    back = load_controlnet(tmp_path / "back")
    want = load_controlnet(tmp_path / "cn")
    assert all(torch.equal(v, want.state_dict()[k].half().float()) for k, v in back.state_dict().items())
    # a ControlNet given where a model is expected: one clear line
    assert main(["generate", "x", "--model", str(tmp_path / "cn.safetensors"), "-q"]) == 2
    assert "a ControlNet, not a model; pass it with --controlnet" in capsys.readouterr().err


def test_edge_fscore_tolerates_two_pixels_and_no_more():
    import numpy as np

    from ldmkit.evaluation.metrics import edge_fscore

    ref = np.zeros((32, 32), bool)
    ref[8:24, 10] = True
    assert edge_fscore(ref, ref)["f"] == 1.0
    assert edge_fscore(np.roll(ref, 2, axis=1), ref)["f"] == 1.0  # 2 pixels off: matched
    assert edge_fscore(np.roll(ref, 3, axis=1), ref)["f"] == 0.0  # 3 pixels off: not
    half = ref.copy()
    half[16:] = False
    s = edge_fscore(half, ref)
    assert s["precision"] == 1.0 and 0.5 <= s["recall"] <= 0.7  # 2-pixel tolerance reaches a little past the end
    assert edge_fscore(np.zeros_like(ref), ref)["f"] == 0.0
    assert edge_fscore(np.zeros_like(ref), np.zeros_like(ref))["f"] == 1.0


def test_eval_control_reports_with_without_and_ceiling(controlled_folders, tmp_path, capsys):
    import json

    from PIL import Image

    from ldmkit.cli import main

    _, _, root = controlled_folders
    argv = [
        "eval",
        "--model",
        str(root / "pipe"),
        "--control",
        "canny",
        "--controlnet",
        str(root / "cn"),
        "--n",
        "2",
        "--steps",
        "2",
        "--grid",
        str(tmp_path / "grid.png"),
        "-q",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert set(report["edge_f"]) == {"with", "without", "ceiling"}
    assert all(0 <= v["f"] <= 1 for v in report["edge_f"].values())
    assert set(report["judge"]) == {"with", "without"} and report["prompts"] == 2
    assert Image.open(tmp_path / "grid.png").size[1] > 0
    assert main(argv[:3] + ["--control", "depth", "--controlnet", str(root / "cn")]) == 2
    assert "allowed: canny" in capsys.readouterr().err


def test_several_controlnets_are_summed_each_with_its_strength():
    from ldmkit.diffusion.denoiser import Conditioning, Control, Denoiser
    from ldmkit.diffusion.schedule import NoiseSchedule, SamplingSchedule
    from ldmkit.models.ldm import ScheduleConfig

    torch.manual_seed(0)
    unet = randomize(UNetModel(tiny_unet_config()), std=0.05)
    nets = [randomize(ControlNet.from_unet(unet, hint_block_channels=(8, 16)), seed=s, std=0.05) for s in (3, 4)]
    x, _, ctx, hint = inputs(2, batch=1)
    hint2 = hint.flip(-1)
    sigma = 2.0
    walk = SamplingSchedule(torch.tensor([sigma, 0.0]), torch.tensor([]), 1.0)  # timesteps from the sigmas
    denoiser = Denoiser(unet, NoiseSchedule.from_config(ScheduleConfig()), "epsilon", walk)
    cond = Conditioning(ctx, None, cfg_scale=1.0, control=[Control(nets[0], hint, 0.5), Control(nets[1], hint2, 1.5)])
    with torch.no_grad():
        x0 = denoiser(x, sigma, cond)
        x_in = x / (sigma**2 + 1) ** 0.5
        t = torch.full((1,), denoiser.timestep(sigma))
        r1, r2 = nets[0](x_in, hint, t, ctx), nets[1](x_in, hint2, t, ctx)
        summed = [0.5 * a + 1.5 * b for a, b in zip(r1, r2)]
        want = x - sigma * unet(x_in, t, ctx, control=summed)
        alone = x - sigma * unet(x_in, t, ctx, control=[0.5 * a for a in r1])
    assert (x0 - want).abs().max() <= 1e-5 and (x0 - alone).abs().max() > 1e-3
