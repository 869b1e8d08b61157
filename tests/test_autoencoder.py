"""Autoencoder parity with diffusers' AutoencoderKL (random weights), posterior maths from the paper."""

import json

import pytest
import torch

from conftest import randomize, tiny_diffusers_vae
from ldmkit.checkpoints.diffusers_folder import load_diffusers_vae
from ldmkit.models.autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussian


@pytest.mark.parametrize("channels,factor", [((16, 32, 32), 4), ((16, 16, 32, 32), 8), ((16, 16, 32, 32, 32), 16)])
def test_parity_for_f4_f8_f16(tmp_path, channels, factor):
    ref = tiny_diffusers_vae(block_out_channels=channels)
    ref.save_pretrained(str(tmp_path / "vae"))
    ours = load_diffusers_vae(tmp_path / "vae")
    assert ours.config.downsample_factor == factor
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pa, pb = ref.encode(x).latent_dist, ours.encode(x)
        assert pb.mean.shape == (1, 4, 64 // factor, 64 // factor)
        assert (pa.mean - pb.mean).abs().max() <= 1e-4
        assert (pa.logvar - pb.logvar).abs().max() <= 1e-4
        z = torch.randn(1, 4, 64 // factor, 64 // factor, generator=torch.Generator().manual_seed(1))
        a, b = ref.decode(z).sample, ours.decode(z)
    assert a.abs().mean() > 0.05
    assert (a - b).abs().max() <= 1e-4


def test_72x72_image(tmp_path):
    ref = tiny_diffusers_vae(block_out_channels=(16, 16, 32, 32))
    ref.save_pretrained(str(tmp_path / "vae"))
    ours = load_diffusers_vae(tmp_path / "vae")
    x = torch.randn(1, 3, 72, 72)
    with torch.no_grad():
        assert (ref.encode(x).latent_dist.mean - ours.encode(x).mean).abs().max() <= 1e-4
        z = torch.randn(1, 4, 9, 9)
        assert (ref.decode(z).sample - ours.decode(z)).abs().max() <= 1e-4


def test_scale_factor_travels_with_the_model(tmp_path):
    ref = tiny_diffusers_vae(scaling_factor=0.13025)
    ref.save_pretrained(str(tmp_path / "vae"))
    assert json.loads((tmp_path / "vae" / "config.json").read_text())["scaling_factor"] == 0.13025
    ours = load_diffusers_vae(tmp_path / "vae")
    z = torch.randn(1, 4, 8, 8)
    assert torch.allclose(ours.scale(z), z * 0.13025)
    assert torch.allclose(ours.unscale(ours.scale(z)), z, atol=1e-6)


def test_posterior_follows_the_papers_code():
    moments = torch.cat([torch.randn(2, 4, 3, 3), torch.full((2, 4, 3, 3), 50.0)], dim=1)
    post = DiagonalGaussian(moments)
    assert torch.all(post.logvar == 20.0)  # clamped to [-30, 20]
    mean, logvar = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)
    post = DiagonalGaussian(torch.cat([mean, logvar], 1))
    expected = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum()
    assert torch.allclose(post.kl(), expected.reshape(1))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    eps = torch.randn(1, 4, 3, 3, generator=g2)
    assert torch.allclose(post.sample(g1), mean + torch.exp(0.5 * logvar) * eps)


def test_diffusers_posterior_sample_equals_ours_with_same_generator(tmp_path):
    ref = tiny_diffusers_vae()
    ref.save_pretrained(str(tmp_path / "vae"))
    ours = load_diffusers_vae(tmp_path / "vae")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a = ref.encode(x).latent_dist.sample(torch.Generator().manual_seed(7))
        b = ours.encode(x).sample(torch.Generator().manual_seed(7))
    assert (a - b).abs().max() <= 1e-4


def test_roundtrip_ours_to_diffusers_keys(tmp_path):
    from ldmkit.checkpoints.keymaps import vae_from_diffusers, vae_to_diffusers_state

    c = AutoencoderConfig(channels=(16, 32), num_res_blocks=1, norm_groups=8)
    vae = AutoencoderKL(c)
    there = vae_to_diffusers_state(vae.state_dict(), c)
    ref = tiny_diffusers_vae(block_out_channels=(16, 32))
    assert set(there) == set(ref.state_dict())
    back = vae_from_diffusers(there, c)
    assert all(torch.equal(back[k], v) for k, v in vae.state_dict().items())


def test_measured_memory_format_keeps_outputs():
    from conftest import randomize
    from ldmkit.models.ldm import LatentDiffusion
    from ldmkit.models.presets import tiny

    model = randomize(LatentDiffusion(tiny()))
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        before = model.vae.decode(z)
        model.use_measured_memory_format()
        after = model.vae.decode(z)
    assert model.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert (before - after).abs().max() <= 1e-5


def test_tiled_encode_equals_diffusers_tiling_and_banded_decode_equals_the_whole(tmp_path):
    ref = tiny_diffusers_vae(block_out_channels=(16, 32), sample_size=32)  # f = 2: 16-pixel latent tiles
    ref.save_pretrained(str(tmp_path / "vae"))
    ours = load_diffusers_vae(tmp_path / "vae")
    ref.enable_tiling()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 88, 72, generator=g)  # tiles of 32 px every 24: ragged edges on both axes
    z = torch.randn(2, 4, 44, 36, generator=g)
    with torch.no_grad():
        a, b = ref.encode(x).latent_dist.mean, ours.encode(x, tile=16).mean
        assert a.shape == b.shape == (1, 4, 44, 36) and (a - b).abs().max() <= 1e-4
        whole = ours.decode(z)
        for rows in (1, 5, 16):  # bands of one row upward: every margin is exercised
            banded = ours.decode(z, tile=rows)
            assert banded.shape == (2, 3, 88, 72) and (banded - whole).abs().max() <= 1e-5 * whole.abs().max()
        # independent tiles (diffusers') normalise each tile alone: far from the whole decode
        assert (ref.decode(z).sample - whole).abs().max() > 1e-2
        # small inputs are not tiled at all
        assert torch.equal(ours.decode(z[:, :, :16, :16], tile=16), ours.decode(z[:, :, :16, :16]))


@pytest.mark.parametrize("seed", range(4))
def test_banded_decode_equals_the_whole_on_random_autoencoders(seed):
    """Widths, depths, groups, middle attention and latent sizes drawn at random (seed printed)."""
    import random

    r = random.Random(seed)
    groups = r.choice([4, 8])
    config = AutoencoderConfig(
        channels=tuple(groups * r.randint(1, 4) for _ in range(r.randint(1, 4))),
        num_res_blocks=r.randint(1, 2),
        norm_groups=groups,
        mid_attention=r.random() < 0.5,
    )
    vae = randomize(AutoencoderKL(config), seed=seed)
    z = torch.randn(1, 4, r.randint(3, 12), r.randint(3, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        whole = vae.decode(z)
        banded = vae.decode(z, tile=r.randint(1, 4))
    assert (banded - whole).abs().max() <= 1e-5 * max(1.0, whole.abs().max()), f"seed {seed}: {config}"
