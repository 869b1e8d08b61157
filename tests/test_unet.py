"""UNet parity with diffusers' UNet2DConditionModel on random weights, through the same loading
path a user's diffusers folder takes (config.json + safetensors -> key map -> strict load)."""

import pytest
import torch

from conftest import tiny_diffusers_unet
from ldmkit.checkpoints.components import strict_load
from ldmkit.checkpoints.diffusers_folder import unet_config_from_diffusers
from ldmkit.checkpoints.keymaps import rename, unet_to_diffusers
from ldmkit.models.unet import UNetConfig, UNetModel
from ldmkit.nn.embedding import guidance_scale_embedding


def ours_from(ref, tmp_path):
    ref.save_pretrained(str(tmp_path / "unet"))
    import json

    from safetensors.torch import load_file

    cfg = json.loads((tmp_path / "unet" / "config.json").read_text())
    config = unet_config_from_diffusers(cfg, "unet")
    unet = UNetModel(config)
    state = load_file(str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    strict_load(unet, rename(state, unet_to_diffusers(config), reverse=True), "UNet", "test")
    return unet.eval()


def compare(ref, ours, hw, ctx_dim=32, batch=2, **kwargs):
    g = torch.Generator().manual_seed(hw)
    x = torch.randn(batch, ref.config.in_channels, hw, hw, generator=g)
    t = torch.tensor([999, 3][:batch])
    ctx = torch.randn(batch, 7, ctx_dim, generator=g)
    with torch.no_grad():
        a = ref(x, t, ctx, **kwargs).sample
        b = ours(x, t, ctx, **{("y" if k == "class_labels" else k): v for k, v in kwargs.items()})
    assert a.shape == b.shape
    assert a.abs().mean() > 0.05  # outputs of order 1, not a vacuous match
    return (a - b).abs().max().item()


@pytest.mark.parametrize("hw", [16, 9, 13])
def test_sd1_style_conv_projection(tmp_path, hw):
    ref = tiny_diffusers_unet()
    assert compare(ref, ours_from(ref, tmp_path), hw) <= 1e-4


def test_sd2_style_linear_projection_heads_by_channels(tmp_path):
    ref = tiny_diffusers_unet(
        use_linear_projection=True,
        attention_head_dim=(2, 4),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    ours = ours_from(ref, tmp_path)
    # (2, 4) heads over (32, 64) channels = 16 channels per head: stored as channels per head.
    assert ours.config.num_head_channels == 16
    assert ours.config.use_linear_in_transformer
    assert compare(ref, ours, 16) <= 1e-4


def test_72x72_latent_three_levels_transformer_depth_2(tmp_path):
    ref = tiny_diffusers_unet(
        block_out_channels=(32, 32, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2,
        attention_head_dim=2,
        transformer_layers_per_block=2,
        layers_per_block=1,
    )
    ours = ours_from(ref, tmp_path)
    assert ours.config.transformer_depth == 2
    assert compare(ref, ours, 72, batch=1) <= 1e-4


def test_inpainting_nine_channels(tmp_path):
    ref = tiny_diffusers_unet(in_channels=9)
    assert compare(ref, ours_from(ref, tmp_path), 16) <= 1e-4


def test_class_embedding_table(tmp_path):
    ref = tiny_diffusers_unet(num_class_embeds=10)
    ours = ours_from(ref, tmp_path)
    assert compare(ref, ours, 16, class_labels=torch.tensor([3, 7])) <= 1e-4


def test_vector_conditioning(tmp_path):
    ref = tiny_diffusers_unet(class_embed_type="projection", projection_class_embeddings_input_dim=12)
    ours = ours_from(ref, tmp_path)
    assert ours.config.num_classes == "sequential"
    y = torch.randn(2, 12, generator=torch.Generator().manual_seed(5))
    assert compare(ref, ours, 16, class_labels=y) <= 1e-4


def test_guidance_embedding_matches_diffusers_lcm(tmp_path):
    from diffusers import LatentConsistencyModelPipeline

    ref = tiny_diffusers_unet(time_cond_proj_dim=16)
    ours = ours_from(ref, tmp_path)
    w = torch.tensor([8.0, 2.5])
    # diffusers' LCM pipeline embeds (w - 1) itself; ours takes the guidance scale.
    expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w - 1, embedding_dim=16)
    emb = guidance_scale_embedding(w, 16)
    assert torch.allclose(emb, expected, atol=1e-6)
    assert compare(ref, ours, 16, timestep_cond=emb) <= 1e-4


def test_channels_last_gives_the_same_output(tmp_path):
    ref = tiny_diffusers_unet()
    ours = ours_from(ref, tmp_path)
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([10, 500])
    ctx = torch.randn(2, 7, 32)
    with torch.no_grad():
        a = ours(x, t, ctx)
        b = ours.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t, ctx)
    assert (a - b).abs().max() <= 1e-5


def test_config_roundtrip_to_diffusers():
    from ldmkit.checkpoints.diffusers_folder import unet_config_to_diffusers

    c = UNetConfig(
        channels=(32, 64, 64),
        attention_resolutions=(2, 4),
        num_head_channels=16,
        context_dim=24,
        use_linear_in_transformer=True,
        transformer_depth=(1, 2, 3),
    )
    assert unet_config_from_diffusers(unet_config_to_diffusers(c, 16), "x") == c


def test_class_conditional_model_without_labels_is_a_clear_error():
    from ldmkit.errors import ConfigError

    unet = UNetModel(
        UNetConfig(
            channels=(32,),
            attention_resolutions=(),
            num_heads=2,
            context_dim=8,
            norm_groups=8,
            num_classes=3,
        )
    )
    with pytest.raises(ConfigError, match="class-conditional"):
        unet(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.randn(1, 2, 8))


@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_group_norm_on_cpu_equals_the_fp32_round_trip(channels_last):
    """bf16 activations go to the kernel directly (it accumulates in fp32): the same result as the
    upcast path to one bf16 rounding step, in either memory layout; fp16 still goes through fp32."""
    import torch.nn.functional as F

    from ldmkit.nn.resnet import GroupNorm32

    g = torch.Generator().manual_seed(0)
    norm = GroupNorm32(8, 64)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=g))
        norm.bias.copy_(torch.randn(64, generator=g))
    x = (torch.randn(2, 64, 12, 12, generator=g) * 5 + 3).bfloat16()
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    for weights in (torch.float32, torch.bfloat16):
        norm.to(weights)
        w, b = norm.weight.float(), norm.bias.float()
        ref = F.group_norm(x.float(), 8, w, b, norm.eps)
        out = norm(x)
        assert out.dtype == torch.bfloat16 and out.shape == x.shape
        # one bf16 step of the value itself (8 mantissa bits), not of the tensor's largest value
        assert ((out.float() - ref).abs() <= ref.abs() * 2**-8 + 1e-6).all()
    half = norm.to(torch.float32)(x.half())
    assert half.dtype == torch.float16
    ref = F.group_norm(x.float(), 8, norm.weight, norm.bias, norm.eps)
    assert ((half.float() - ref).abs() <= ref.abs() * 2**-10 + 1e-3).all()


def _tiny_unet():
    from conftest import randomize
    from ldmkit.models.presets import tiny

    return randomize(UNetModel(tiny().unet)).eval()


@pytest.mark.parametrize("branch", [0, 1, 2])
def test_feature_cache_reuses_the_deep_features_and_only_them(branch):
    """DeepCache (FeatureCache): a full call every `interval` calls keeps the features entering the
    shallowest branch + 1 output blocks; a reuse call runs only the shallowest branch + 1 input and
    output blocks. With the same inputs a reuse call must equal the full one exactly (the kept features
    are what the full call would compute), and it must skip the middle and deep blocks."""
    from ldmkit.models.unet import FeatureCache

    unet = _tiny_unet()
    n = len(unet.output_blocks)
    runs = {"middle": 0, "input": [0] * n, "output": [0] * n}
    unet.middle_block.register_forward_hook(lambda *a: runs.__setitem__("middle", runs["middle"] + 1))
    for i in range(n):
        unet.input_blocks[i].register_forward_hook(lambda *a, i=i: runs["input"].__setitem__(i, runs["input"][i] + 1))
        unet.output_blocks[i].register_forward_hook(
            lambda *a, i=i: runs["output"].__setitem__(i, runs["output"][i] + 1)
        )
    g = torch.Generator().manual_seed(branch)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, unet.config.context_dim, generator=g)
    t = torch.tensor([500, 500])
    cache = FeatureCache(interval=3, branch=branch)
    with torch.no_grad():
        plain = unet(x, t, ctx)
        full = unet(x, t, ctx, cache=cache)
        reused = [unet(x, t, ctx, cache=cache) for _ in range(2)]
        again_full = unet(x, t, ctx, cache=cache)  # the 4th call: interval 3 comes round
        moved = unet(x + 0.5, t, ctx, cache=cache)  # a reuse call on new inputs: the shallow path is new
        fresh = unet(x + 0.5, t, ctx)
    assert torch.equal(full, plain) and torch.equal(again_full, plain)
    assert all(torch.equal(r, plain) for r in reused)
    shallow = branch + 1
    assert runs["middle"] == 4  # plain, full, again_full, fresh: never on reuse calls
    assert runs["input"] == [7] * shallow + [4] * (n - shallow)
    assert runs["output"] == [4] * (n - shallow) + [7] * shallow
    assert not torch.equal(moved, fresh) and not torch.equal(moved, plain)


def test_feature_cache_interval_one_is_off_and_bad_settings_are_refused():
    from ldmkit.errors import ConfigError
    from ldmkit.models.unet import FeatureCache

    unet = _tiny_unet()
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 7, unet.config.context_dim)
    cache = FeatureCache(1)
    with torch.no_grad():
        outs = [unet(x + i, t, ctx, cache=cache) for i in range(3)]
        assert all(torch.equal(o, unet(x + i, t, ctx)) for i, o in enumerate(outs))
    for bad in (0, -2, 1.5):
        with pytest.raises(ConfigError, match="feature cache interval"):
            FeatureCache(bad)
    with pytest.raises(ConfigError, match="branch"):
        FeatureCache(2, branch=-1)
