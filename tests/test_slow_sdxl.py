"""The real SDXL base architecture (random weights) against diffusers, through the paths a user's files
take: a diffusers folder, and an original-layout single file with no ldmkit header (built from the same
weights by the original conversion rules, tests/test_sdxl_files.py) read by family rules and shapes.
Marked slow: ~14 GB of fp32 weights, one model in memory at a time; run with `pytest -m slow`."""

import gc

import pytest
import torch
from safetensors.torch import save_file
from test_sdxl_files import sgm_state

from conftest import randomize

pytestmark = pytest.mark.slow

UNET = dict(
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)
VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=1024,
    scaling_factor=0.13025,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
BIG_G = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=1280,
    pad_token_id=0,
)
PROMPTS = ["a photo of an astronaut riding a horse"]


def build(folder):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from ldmkit.models.tokenizers import clip_vocab_and_merges

    vocab, merges = clip_vocab_and_merges()

    def tokenizer(pad):
        return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad, model_max_length=77)

    text = dict(vocab_size=49408, max_position_embeddings=77)
    pipe = StableDiffusionXLPipeline(
        unet=randomize(UNet2DConditionModel(**UNET), 0, 0.02),
        vae=randomize(AutoencoderKL(**VAE), 1, 0.02),
        text_encoder=randomize(CLIPTextModel(CLIPTextConfig(**text, **CLIP_L)), 2, 0.02),
        text_encoder_2=randomize(CLIPTextModelWithProjection(CLIPTextConfig(**text, **BIG_G)), 3, 0.02),
        tokenizer=tokenizer("<|endoftext|>"),
        tokenizer_2=tokenizer("!"),
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    )
    pipe.save_pretrained(str(folder))
    return pipe


def reference_outputs(pipe):
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, 2048, generator=g)
    pooled = torch.randn(2, 1280, generator=g)
    ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1344, 16, 0, 1024, 1024]])
    with torch.no_grad():
        unet = pipe.unet(x, torch.tensor([999, 10]), ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids})
        hidden, _, text_pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    return (x, ctx, pooled, ids), (unet.sample, hidden, text_pooled)


def our_outputs(model, inputs):
    from ldmkit.nn.embedding import size_embedding

    x, ctx, pooled, ids = inputs
    with torch.no_grad():
        y = torch.cat([pooled, size_embedding(ids, 256)], dim=-1)
        hidden, text_pooled = model.text_encoder.encode_texts(PROMPTS)
        return model.unet(x, torch.tensor([999, 10]), ctx, y=y), hidden, text_pooled


def test_real_sdxl_architecture_parity(tmp_path):
    from ldmkit.checkpoints.single_file import load_model

    pipe = build(tmp_path / "diffusers")
    inputs, expected = reference_outputs(pipe)
    spec = {"unet": UNET, "refiner": False, "vae_levels": 4}
    save_file(sgm_state(pipe, spec), str(tmp_path / "wild.safetensors"))  # no ldmkit header
    del pipe
    gc.collect()
    for source in ("diffusers", "wild.safetensors"):
        model = load_model(tmp_path / source)
        assert model.config.family == "sdxl", source
        assert model.parameter_counts()["unet"] == 2567463684, source
        for ours, ref in zip(our_outputs(model, inputs), expected):
            assert ref.abs().mean() > 0.01
            assert (ours - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item()), source
        del model
        gc.collect()
