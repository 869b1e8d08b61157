"""The real SD 1.5 and SD 2.1 architectures (random weights) against diffusers, through the paths a
user's files take: diffusers folder -> ours, and ours -> an original-layout file with no metadata ->
family rules and shapes -> ours. Marked slow: ~4 GB of weights per model; run with `pytest -m slow`."""

import gc

import pytest
import torch
from safetensors.torch import save_file

from conftest import randomize

pytestmark = pytest.mark.slow

SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    sample_size=64,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD21_UNET = dict(
    SD15_UNET, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, sample_size=96
)
SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
CLIP_L = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu"
)
OPENCLIP_H = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu"
)


def build_pipeline(folder, unet_cfg, text_cfg, pad, prediction_type):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ldmkit.models.tokenizers import clip_vocab_and_merges

    vocab, merges = clip_vocab_and_merges()
    pipe = StableDiffusionPipeline(
        unet=randomize(UNet2DConditionModel(**unet_cfg), 0, 0.02),
        vae=randomize(AutoencoderKL(**SD_VAE), 1, 0.02),
        text_encoder=randomize(
            CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **text_cfg)), 2, 0.02
        ),
        tokenizer=CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad, model_max_length=77),
        scheduler=PNDMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            skip_prk_steps=True,
            steps_offset=1,
            prediction_type=prediction_type,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder))
    return pipe


def reference_outputs(pipe, ctx_dim):
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, ctx_dim, generator=g)
    z = torch.randn(1, 4, 32, 32, generator=g)
    with torch.no_grad():
        return (x, ctx, z), (
            pipe.unet(x, torch.tensor([999, 10]), ctx).sample,
            pipe.vae.decode(z).sample,
            pipe.encode_prompt(["a photo of an astronaut riding a horse"], "cpu", 1, False)[0],
        )


def our_outputs(model, inputs):
    x, ctx, z = inputs
    with torch.no_grad():
        return (
            model.unet(x, torch.tensor([999, 10]), ctx),
            model.vae.decode(z),
            model.text_encoder(["a photo of an astronaut riding a horse"]),
        )


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_real_architecture_parity(tmp_path, name):
    from ldmkit.checkpoints.single_file import load_model, model_state

    sd2 = name == "sd21"
    pipe = build_pipeline(
        tmp_path / "diffusers",
        SD21_UNET if sd2 else SD15_UNET,
        OPENCLIP_H if sd2 else CLIP_L,
        "!" if sd2 else "<|endoftext|>",
        "v_prediction" if sd2 else "epsilon",
    )
    inputs, expected = reference_outputs(pipe, 1024 if sd2 else 768)
    del pipe
    gc.collect()

    model = load_model(tmp_path / "diffusers")
    assert model.config.family == ("sd2-v" if sd2 else "sd1")
    for ours, ref in zip(our_outputs(model, inputs), expected):
        assert ref.abs().mean() > 0.05
        assert (ours - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())

    # The same weights as a file from the wild: original layout, no ldmkit metadata. Family rules
    # (SD 1: 8 heads; SD 2: 64 channels per head, OpenCLIP, v) must rebuild the same network.
    # A 23-block OpenCLIP tower read at its last block is the 24-block SD 2 file's penultimate layer:
    # pad it with a 24th block, as real SD 2 files have.
    state = model_state(model)
    if sd2:
        last = {k: v for k, v in state.items() if ".resblocks.22." in k}
        state.update({k.replace(".resblocks.22.", ".resblocks.23."): torch.randn_like(v) for k, v in last.items()})
        state["cond_stage_model.model.text_projection"] = torch.randn(1024, 1024)
        state["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "wild.safetensors"))
    del model, state
    gc.collect()
    wild = load_model(tmp_path / "wild.safetensors")
    assert wild.config.family == ("sd2-v" if sd2 else "sd1")
    assert wild.parameter_counts()["unet"] == (865910724 if sd2 else 859520964)
    for ours, ref in zip(our_outputs(wild, inputs), expected):
        assert (ours - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
