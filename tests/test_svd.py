"""Stable Video Diffusion against diffusers 0.42.1, on configurations drawn at random from its space: the
spatio-temporal UNet (levels, widths, which levels attend, heads, residual blocks and transformer depth per
level, context and conditioning widths, clip length), the temporal autoencoder (levels, widths), the CLIP
vision tower, sizes, frame counts and every call parameter. diffusers builds each pipeline, its weights are
perturbed (mixing factors too) and saved with `save_pretrained`; ldmkit loads the folder and must compute what
diffusers computes, and the folder and single file ldmkit writes must load back to the same model (diffusers
reads the folder). Replay a failure with its seed: `python -m pytest tests/test_svd.py -m slow -k "seed-7]"`."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import randomize
from ldmkit.checkpoints.families import FAMILIES
from ldmkit.checkpoints.svd_configs import ATTENTION_DOWN, ATTENTION_UP, PLAIN_DOWN, PLAIN_UP
from ldmkit.checkpoints.svd_file import load_svd_file, save_svd_file
from ldmkit.checkpoints.svd_folder import save_svd_folder
from ldmkit.checkpoints.video_files import load_video_model
from ldmkit.nn.temporal import Frames
from ldmkit.pipelines.video import VideoPipeline


def draw(seed: int) -> dict:
    r = random.Random(seed)
    levels = r.randint(1, 3)
    widths = [32 * r.randint(1, 3) for _ in range(levels)]
    attention = [r.random() < 0.7 for _ in range(levels)]
    per_level = r.random() < 0.5
    context = r.choice([16, 32, 48])
    added = r.choice([4, 8, 16])
    unet = dict(
        block_out_channels=widths,
        down_block_types=[ATTENTION_DOWN if a else PLAIN_DOWN for a in attention],
        up_block_types=[ATTENTION_UP if a else PLAIN_UP for a in reversed(attention)],
        num_attention_heads=[r.choice([h for h in (1, 2, 4) if w % h == 0]) for w in widths],
        layers_per_block=[r.randint(1, 2) for _ in widths] if per_level else r.randint(1, 2),
        transformer_layers_per_block=[r.randint(1, 2) for _ in widths] if r.random() < 0.5 else r.randint(1, 2),
        cross_attention_dim=context,
        addition_time_embed_dim=added,
        projection_class_embeddings_input_dim=3 * added,
        in_channels=8,
        out_channels=4,
        num_frames=r.randint(2, 6),
        sample_size=8,
    )
    vae_levels = r.randint(1, 3)
    vae = dict(
        block_out_channels=[32 * r.randint(1, 2) for _ in range(vae_levels)],
        down_block_types=["DownEncoderBlock2D"] * vae_levels,
        layers_per_block=2,
        latent_channels=4,
        scaling_factor=round(r.uniform(0.1, 1.5), 5),
    )
    hidden = r.choice([32, 64])
    tower = dict(
        hidden_size=hidden,
        intermediate_size=r.randint(32, 80),
        projection_dim=context,
        num_hidden_layers=r.randint(1, 2),
        num_attention_heads=r.choice([2, 4]),
        image_size=224,
        patch_size=r.choice([32, 56]),
        hidden_act=r.choice(["gelu", "quick_gelu"]),
    )
    # pixel sides of multiples of 8 (diffusers' rule) at which the deepest UNet level is at least 2 x 2 (a
    # GroupNorm over one pixel of a few channels amplifies fp32 rounding past any fixed tolerance)
    f = 2 ** (vae_levels - 1)
    sides = [8 * k for k in range(1, 9) if 8 * k // f >= 2**levels]
    side = [r.choice(sides) for _ in range(2)]
    call = dict(
        height=side[0],
        width=side[1],
        num_frames=r.randint(2, 5),
        num_inference_steps=r.randint(2, 4),
        fps=r.randint(3, 30),
        motion_bucket_id=r.randint(1, 255),
        noise_aug_strength=round(r.uniform(0.0, 0.1), 3),
        min_guidance_scale=round(r.uniform(0.5, 2.0), 2),
    )
    # a ramp up (diffusers decides on guidance by the largest scale before sampling and by the ramp's largest
    # during it: a ramp down to a scale at most 1 crashes its pipeline, so the draws keep max >= min)
    call["max_guidance_scale"] = round(r.uniform(call["min_guidance_scale"], 4.0), 2)
    call["decode_chunk_size"] = r.choice([d for d in range(1, call["num_frames"] + 1) if call["num_frames"] % d == 0])
    image_size = (r.randint(40, 300), r.randint(40, 300))
    return dict(unet=unet, vae=vae, tower=tower, call=call, image_size=image_size, seed=seed)


def build(spec: dict, folder):
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    seed = spec["seed"]
    unet = randomize(UNetSpatioTemporalConditionModel(**spec["unet"]), seed)
    vae = randomize(AutoencoderKLTemporalDecoder(**spec["vae"]), seed + 1, std=0.15)
    tower = randomize(CLIPVisionModelWithProjection(CLIPVisionConfig(**spec["tower"])), seed + 2)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the mixing factors away from their initial values
        for module in (unet, vae):
            for name, p in module.named_parameters():
                if name.endswith("mix_factor"):
                    p.copy_(torch.randn(1, generator=g))
    scheduler = EulerDiscreteScheduler.from_config(
        {k: v for k, v in FAMILIES["svd"].scheduler.items() if k != "_class_name"}
    )
    pipe = StableVideoDiffusionPipeline(
        vae=vae, image_encoder=tower, unet=unet, scheduler=scheduler, feature_extractor=CLIPImageProcessor()
    )
    pipe.save_pretrained(folder)
    return pipe


def close(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    return bool((ours - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max())))


def check_components(pipe, model, spec, where: str) -> None:
    g = torch.Generator().manual_seed(spec["seed"])
    u = spec["unet"]
    b, f, h, w = 2, u["num_frames"], 2 ** len(u["block_out_channels"]), 2 ** len(u["block_out_channels"]) + 2
    x = torch.randn(b, f, 8, h, w, generator=g)
    t = torch.tensor([0.4, -1.3])
    context = torch.randn(b, 1, u["cross_attention_dim"], generator=g)
    added = torch.tensor([[6.0, 127.0, 0.02], [20.0, 30.0, 0.1]])
    with torch.no_grad():
        ref = pipe.unet(x, t, context, added, return_dict=False)[0]
        ours = model.unet(x, t, context, added)
        assert close(ours, ref), f"{where}: UNet differs by {(ours - ref).abs().max():.3g}"
        z = torch.randn(f, 4, 6, 5, generator=g)
        ref = pipe.vae.decode(z, num_frames=f).sample
        ours = model.vae.decode(z, f)
        assert close(ours, ref), f"{where}: decoder differs by {(ours - ref).abs().max():.3g}"


def frames_of(result) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float32) for im in result])


def check_generation(pipe, ours: VideoPipeline, spec, where: str) -> None:
    c = spec["call"]
    image = Image.fromarray(
        np.random.RandomState(spec["seed"]).randint(0, 256, (*spec["image_size"], 3), dtype=np.uint8)
    )
    ref = pipe(image, generator=[torch.Generator().manual_seed(spec["seed"])], **c).frames[0]
    result = ours(
        image=image,
        width=c["width"],
        height=c["height"],
        frames=c["num_frames"],
        steps=c["num_inference_steps"],
        fps=c["fps"],
        motion_bucket=c["motion_bucket_id"],
        noise_aug=c["noise_aug_strength"],
        min_cfg=c["min_guidance_scale"],
        max_cfg=c["max_guidance_scale"],
        decode_chunk=c["decode_chunk_size"],
        seed=spec["seed"],
    )
    a, b = frames_of(ref), frames_of(result.videos[0])
    assert a.shape == b.shape, f"{where}: {b.shape} frames, diffusers {a.shape}"
    per_frame = np.abs(a - b).mean(axis=(1, 2, 3))
    assert per_frame.max() <= 1.0, f"{where}: frames differ by {per_frame.max():.3f}/255 on average"
    assert a.std() > 5, f"{where}: a flat reference tells nothing ({a.std():.2f})"
    return result


def run(seed: int, tmp_path) -> None:
    spec = draw(seed)
    where = f"seed {seed} ({spec})"
    pipe = build(spec, tmp_path / "svd")
    model = load_video_model(tmp_path / "svd")
    check_components(pipe, model, spec, where)
    check_generation(pipe, VideoPipeline(model), spec, where)
    # written back: a folder diffusers reads (same generation) and a single file that reads back the same
    from diffusers import StableVideoDiffusionPipeline

    save_svd_folder(model, tmp_path / "written")
    check_generation(
        StableVideoDiffusionPipeline.from_pretrained(tmp_path / "written"), VideoPipeline(model), spec, where
    )
    save_svd_file(model, tmp_path / "svd.safetensors")
    again = load_svd_file(tmp_path / "svd.safetensors")
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b), f"{where}: the single file does not read back"
    e1 = model.image_encoder.model.state_dict()
    assert all(torch.equal(v, again.image_encoder.model.state_dict()[k]) for k, v in e1.items())


@pytest.mark.parametrize("seed", [0, 1], ids=lambda v: f"seed-{v}")
def test_random_svd_configs_equal_diffusers(seed, tmp_path):
    run(seed, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 116), ids=lambda v: f"seed-{v}")
def test_many_random_svd_configs_equal_diffusers(seed, tmp_path):
    run(seed, tmp_path)


def test_image_only_frames_skip_the_temporal_path(tmp_path):
    """A frame marked as a still image gets alpha = 1: the spatial path alone (the blend's third strategy)."""
    from ldmkit.nn.temporal import AlphaBlender

    blend = AlphaBlender(0.3, "learned_with_images")
    spatial, temporal = torch.randn(2, 4, 3, 5, 5), torch.randn(2, 4, 3, 5, 5)
    marks = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    out = blend(spatial, temporal, Frames(3, marks))
    alpha = torch.sigmoid(torch.tensor(0.3))
    assert torch.equal(out[0, :, 0], spatial[0, :, 0]) and torch.equal(out[1, :, 2], spatial[1, :, 2])
    assert torch.allclose(out[0, :, 1], alpha * spatial[0, :, 1] + (1 - alpha) * temporal[0, :, 1])


def test_a_single_file_without_our_header_reads_by_the_family_rules(tmp_path):
    """An original-layout file (no ldmkit header): the architecture from the weights, heads (64 channels each)
    and the latent scale from the family row, the original code's GroupNorm epsilons."""
    from safetensors.torch import load_file, save_file

    from ldmkit.models.autoencoder import AutoencoderConfig
    from ldmkit.models.video_ldm import VideoDiffusion, VideoModelConfig
    from ldmkit.models.video_unet import VideoUNetConfig

    unet = VideoUNetConfig(
        channels=(64, 128),
        attention_resolutions=(1, 2),
        num_res_blocks=1,
        context_dim=32,
        adm_in_channels=48,
        addition_time_embed_dim=16,
    )
    config = VideoModelConfig(
        "svd", unet, AutoencoderConfig(channels=(32, 32), use_quant_conv=False), width=64, height=64
    )
    model = randomize(VideoDiffusion(config), 3)
    save_svd_file(model, tmp_path / "ours.safetensors")
    save_file(load_file(tmp_path / "ours.safetensors"), tmp_path / "plain.safetensors")  # the header dropped
    again = load_svd_file(tmp_path / "plain.safetensors")
    assert again.config.unet.heads_at(1, 128) == (2, 64) and again.config.vae.scale_factor == 0.18215
    assert again.config.unet.eps_layout == "original" and again.image_encoder is None
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 3, 8, 8, 8, generator=g), torch.randn(1, 1, 32, generator=g)
    added = torch.tensor([[6.0, 127.0, 0.02]])
    with torch.no_grad():
        assert torch.equal(
            model.unet(x, torch.tensor([0.5]), context, added), again.unet(x, torch.tensor([0.5]), context, added)
        )
        z = torch.randn(3, 4, 8, 8, generator=g)
        assert torch.equal(model.vae.decode(z, 3), again.vae.decode(z, 3))
