"""The SD3 / SD3.5 MMDiT against diffusers' SD3Transformer2DModel, on configurations drawn at random.

Each seed draws a transformer from diffusers' space (depth, heads and head width, patch size, qk norm,
dual-attention blocks, position table side, native size, text and pooled widths, channels), builds it with
diffusers and random weights, and requires ours, loaded through the diffusers -> original key conversion,
to compute the same at latent sizes below and above native. Our weights, prefixed as in a single file,
must also pass through diffusers' own single-file converter into a strictly loaded diffusers model that
computes the same: proof that our names are the original file's. Replay a failure with its printed seed:
`python -m pytest tests/test_mmdit.py -m slow -k "seed-117]"`."""

import random

import pytest
import torch

from conftest import randomize
from ldmkit.checkpoints.mmdit_keys import (
    PREFIX,
    config_from_diffusers,
    config_from_weights,
    config_to_diffusers,
    diffusers_to_ours,
    ours_to_diffusers,
)
from ldmkit.errors import CheckpointError, ConfigError
from ldmkit.models.mmdit import MMDiT, MMDiTConfig


def draw(seed: int) -> dict:
    """A diffusers SD3Transformer2DModel config (its __init__ arguments)."""
    r = random.Random(seed)
    depth, heads, patch = r.randint(1, 4), r.randint(1, 4), r.choice([1, 2])
    # The sinusoidal table gives a quarter of the width to sin and cos of each axis: a multiple of 4.
    head_dim = r.choice([d for d in range(8, 17) if heads * d % 4 == 0])
    table = r.randint(4, 9)
    native = r.randint(2, table - 1)  # in patches, so that sizes above and below it fit the table
    return dict(
        sample_size=native * patch,
        patch_size=patch,
        in_channels=r.choice([4, 16]),
        out_channels=r.choice([4, 16]),
        num_layers=depth,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=r.randint(8, 40),
        caption_projection_dim=heads * head_dim,  # diffusers' blocks need the two widths equal
        pooled_projection_dim=r.randint(8, 40),
        pos_embed_max_size=table,
        dual_attention_layers=tuple(i for i in range(depth) if r.random() < 0.5) if r.random() < 0.5 else (),
        qk_norm=r.choice([None, "rms_norm"]),
    )


def reference(spec: dict, seed: int):
    from diffusers import SD3Transformer2DModel

    model = randomize(SD3Transformer2DModel(**spec), seed=seed, std=0.05)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm_" in name:  # q/k RMS norm scales near 1, as trained; randomize leaves them near 0
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        # The table is a weight of the file: noise makes a wrongly placed crop visible.
        model.pos_embed.pos_embed += 0.5 * torch.randn(model.pos_embed.pos_embed.shape, generator=g)
    return model


def inputs(spec: dict, h: int, w: int, seed: int):
    g = torch.Generator().manual_seed(seed + 2)
    p = spec["patch_size"]
    x = torch.randn(2, spec["in_channels"], h * p, w * p, generator=g)
    t = torch.rand(2, generator=g) * 1000
    context = torch.randn(2, 7, spec["joint_attention_dim"], generator=g)
    y = torch.randn(2, spec["pooled_projection_dim"], generator=g)
    return x, t, context, y


def close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(theirs.shape)}"
    err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert err < 1e-5, f"{what}: relative error {err:.2e}"


def run(seed: int) -> None:
    torch.manual_seed(seed)
    spec = draw(seed)
    where = f"seed {seed} ({spec})"
    theirs = reference(spec, seed)
    config = config_from_diffusers(dict(theirs.config))
    ours = MMDiT(config).eval()
    ours.load_state_dict(diffusers_to_ours(theirs.state_dict(), config), strict=True)

    # The original layout, through diffusers' own single-file converter, into a strictly loaded model.
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    single_file = {PREFIX + k: v.clone() for k, v in ours.state_dict().items()}
    converted = convert_sd3_transformer_checkpoint_to_diffusers(single_file)
    again = SD3Transformer2DModel(**spec).eval()
    again.load_state_dict(converted, strict=True)

    back = ours_to_diffusers(ours.state_dict(), config)
    assert back.keys() == theirs.state_dict().keys(), where
    assert all(torch.equal(back[k], v) for k, v in theirs.state_dict().items()), f"{where}: ours -> diffusers"
    assert config_from_weights(ours.state_dict(), spec["attention_head_dim"], spec["sample_size"]) == config, where
    assert config_from_diffusers(config_to_diffusers(config)) == config, where

    native, table = spec["sample_size"] // spec["patch_size"], spec["pos_embed_max_size"]
    r = random.Random(seed)
    sizes = [(r.randint(1, native - 1), r.randint(1, native)), (r.randint(native + 1, table), table)]
    for h, w in sizes:
        x, t, context, y = inputs(spec, h, w, seed)
        with torch.no_grad():
            want = theirs(x, context, y, t).sample
            close(ours(x, t, context, y), want, f"{where}, {h}x{w} patches")
            close(again(x, context, y, t).sample, want, f"{where}, {h}x{w} patches, via the original layout")


# Chosen to cover patch sizes 1 and 2, qk norm, dual attention (in the last block too), in != out channels.
@pytest.mark.parametrize("seed", [5, 7, 11], ids=lambda v: f"seed-{v}")
def test_random_mmdit_configs_equal_diffusers(seed):
    run(seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 130), ids=lambda v: f"seed-{v}")
def test_many_random_mmdit_configs_equal_diffusers(seed):
    run(seed)


def test_a_fresh_position_table_is_diffusers():
    from diffusers import SD3Transformer2DModel

    spec = dict(draw(5), sample_size=12, patch_size=2, pos_embed_max_size=9)
    ours = MMDiT(config_from_diffusers(spec))
    close(ours.pos_embed, SD3Transformer2DModel(**spec).pos_embed.pos_embed, "fresh position table")


def test_the_sd3_releases_are_the_family_defaults():
    """The architectures of the three releases, as config_from_weights derives them from shapes alone."""
    large = MMDiTConfig(depth=38, hidden_size=2432, qk_norm="rms_norm")
    medium_35 = MMDiTConfig(pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))
    for config in (MMDiTConfig(), large, medium_35):
        assert config.num_heads == config.depth
        with torch.device("meta"):
            state = MMDiT(config).state_dict()
        assert config_from_weights(state) == config


def tiny() -> MMDiTConfig:
    return MMDiTConfig(in_channels=4, out_channels=4, depth=1, hidden_size=16, head_dim=8, context_dim=8,
                       pooled_dim=8, pos_embed_max_size=4, sample_size=6)  # fmt: skip


def test_a_transformer_without_a_pooled_vector_takes_no_y():
    """ldmkit's own models (one text tower that pools nothing) condition through joint attention alone."""
    config = tiny()
    config.pooled_dim = 0
    model = MMDiT(config)
    assert not any(k.startswith("y_embedder") for k in model.state_dict())
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0]), torch.randn(2, 3, 8))
    assert out.shape == (2, 4, 8, 8)
    with pytest.raises(ConfigError, match="this transformer takes no y"):
        model(torch.zeros(1, 4, 8, 8), torch.zeros(1), torch.zeros(1, 3, 8), y=torch.zeros(1, 8))
    state = {k: v for k, v in model.state_dict().items()}
    from ldmkit.checkpoints.mmdit_keys import config_from_weights

    assert config_from_weights(state, head_dim=8, sample_size=6) == config


@pytest.mark.parametrize(
    "size,kwargs,message",
    [
        ((8, 8), dict(control=[torch.zeros(1)]), "control, cache and timestep_cond are not supported"),
        ((8, 8), dict(timestep_cond=torch.zeros(1, 4)), "control, cache and timestep_cond are not supported"),
        ((8, 8), dict(y=None), "this transformer takes y, the pooled text vector [B, 8]"),
        ((7, 8), {}, "latent size 7x8; allowed: multiples of the patch size 2"),
        ((8, 10), {}, "latent size 8x10; allowed: at most 8"),
    ],
)
def test_forward_refuses_in_one_line(size, kwargs, message):
    model = MMDiT(tiny())
    args = dict(y=torch.zeros(1, 8)) | kwargs
    with pytest.raises(ConfigError) as e:
        model(torch.zeros(1, 4, *size), torch.zeros(1), torch.zeros(1, 3, 8), **args)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(qk_norm="layer_norm"), "qk_norm='layer_norm' is not supported"),
        (dict(caption_projection_dim=32), "caption_projection_dim=32; allowed: num_attention_heads"),
        (dict(pos_embed_max_size=None), "pos_embed_max_size=None"),
        (dict(dual_attention_layers=(0, 1)), "dual_attention_layers=(0, 1)"),
        (dict(attention_head_dim="8"), "attention_head_dim='8'"),
        (dict(use_rope=True), "use_rope=True is not a field"),
    ],
)
def test_diffusers_configs_we_cannot_run_are_refused_in_one_line(change, message):
    cfg = config_to_diffusers(tiny()) | change
    with pytest.raises(CheckpointError) as e:
        config_from_diffusers(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_weights_we_cannot_place_are_refused_in_one_line():
    config = tiny()
    state = ours_to_diffusers(MMDiT(config).state_dict(), config)
    with pytest.raises(CheckpointError, match="no place for, e.g. image_proj.weight"):
        diffusers_to_ours(state | {"image_proj.weight": torch.zeros(1)}, config)
    ours = MMDiT(config).state_dict()
    with pytest.raises(CheckpointError, match=r"unexpected weight joint_blocks.0.x_block.mlp.w1.weight"):
        config_from_weights(ours | {"joint_blocks.0.x_block.mlp.w1.weight": torch.zeros(1)}, head_dim=8)
    with pytest.raises(CheckpointError, match=r"hidden_size 16 is no multiple of head_dim 64"):
        config_from_weights(ours)
    with pytest.raises(CheckpointError, match="not an SD3 transformer"):
        config_from_weights({"input_blocks.0.0.weight": torch.zeros(1)})
