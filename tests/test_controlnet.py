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
        model_channels=32,
        channel_mult=(1, 2),
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
