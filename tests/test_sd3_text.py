"""SD3's three text towers read from a diffusers StableDiffusion3Pipeline folder give what the pipeline's
own encode_prompt gives (prompt, negative and both pooled vectors, within 1e-5): with and without T5,
at a clip skip, at other max_sequence_lengths, for prompts longer than CLIP and T5 read. Tower sizes are
drawn at random (the seed is in every failure message).

T5's tokenizer: no T5 SentencePiece model is installed here (nor sentencepiece), so a tiny Unigram
vocabulary is trained with the `tokenizers` library on a few sentences and saved through transformers'
T5TokenizerFast -- the class diffusers' pipeline and ldmkit both read tokenizer_3/ with."""

import json
import logging
import random
import string

import pytest
import torch

from conftest import randomize
from ldmkit.errors import CheckpointError, ConfigError

SENTENCES = [
    "a photo of a cat holding a sign that says hello world",
    "an astronaut riding a horse on the moon, highly detailed, 4k",
    "a red square and a blue circle on a white background",
    "portrait of an old man with a beard, oil painting by a master",
    "blurry, low quality, watermark, text, extra fingers",
]
LONG = ", ".join(SENTENCES * 3)  # > 77 CLIP tokens, > 100 T5 tokens
PROMPTS = [SENTENCES[0], LONG]
NEGATIVES = ["", SENTENCES[4]]


@pytest.fixture(scope="session")
def t5_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    alphabet = list(string.ascii_letters + string.digits + ",.!?-'")
    trainer = trainers.UnigramTrainer(
        vocab_size=150, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", initial_alphabet=alphabet
    )
    tok.train_from_iterator(SENTENCES, trainer)
    vocab = [tuple(v) for v in json.loads(tok.to_str())["model"]["vocab"]]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def clip_tokenizer(pad: str):
    from transformers import CLIPTokenizer

    from ldmkit.models.tokenizers import clip_vocab_and_merges

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad, model_max_length=77)


def draw(seed: int) -> dict:
    """Tower sizes from the reference's space, small: CLIP-L (quick_gelu) and bigG (gelu) with their
    projections, T5 (gated-gelu as v1.1, or relu as the first T5) at least as wide as both CLIPs."""
    rng = random.Random(seed)

    def clip(act):
        heads = rng.choice([2, 4])
        hidden = heads * rng.choice([4, 8])
        return dict(
            hidden_size=hidden,
            intermediate_size=rng.choice([24, 40]),
            num_hidden_layers=rng.randint(3, 5),
            num_attention_heads=heads,
            projection_dim=rng.choice([hidden, 8, 24]),
            hidden_act=act,
        )

    clip_l, clip_g = clip("quick_gelu"), clip("gelu")
    d_model = clip_l["hidden_size"] + clip_g["hidden_size"] + rng.choice([0, 8, 24])
    t5 = dict(
        d_model=d_model,
        d_kv=rng.choice([4, 8]),
        d_ff=rng.choice([32, 48]),
        num_layers=rng.randint(1, 3),
        num_heads=rng.choice([2, 4]),
        relative_attention_num_buckets=rng.choice([8, 32]),
        relative_attention_max_distance=rng.choice([16, 128]),
        feed_forward_proj=rng.choice(["gated-gelu", "relu"]),
    )
    clip_skip = rng.randint(1, min(clip_l["num_hidden_layers"], clip_g["num_hidden_layers"]) - 2)
    return dict(clip_l=clip_l, clip_g=clip_g, t5=t5, clip_skip=clip_skip, msl=rng.choice([16, 77, 120, 300, 512]))


def random_towers(spec: dict, t5_tokenizer, seed: int, with_t5: bool = True) -> tuple[list, object]:
    """([CLIP-L, bigG], T5 or None) built by transformers from a drawn spec, with random weights."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    towers = [
        randomize(CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, **spec[k])), seed=seed + i, std=0.05)
        for i, k in enumerate(("clip_l", "clip_g"))
    ]
    t5 = None
    if with_t5:
        t5 = randomize(T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer) + 3, **spec["t5"])), seed=seed + 2)
        with torch.no_grad():  # T5's RMS norms near 1, as trained ones are
            for m in t5.modules():
                if type(m).__name__ == "T5LayerNorm":
                    m.weight.add_(1)
    return towers, t5


def diffusers_pipeline(spec: dict, t5_tokenizer, seed: int, with_t5: bool = True):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    towers, t5 = random_towers(spec, t5_tokenizer, seed, with_t5)
    pooled = sum(spec[k]["projection_dim"] for k in ("clip_l", "clip_g"))
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=spec["t5"]["d_model"], caption_projection_dim=16, pooled_projection_dim=pooled,
        out_channels=16, pos_embed_max_size=8,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        latent_channels=16, norm_num_groups=4, layers_per_block=1,
    )  # fmt: skip
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=towers[0],
        tokenizer=clip_tokenizer("<|endoftext|>"),
        text_encoder_2=towers[1],
        tokenizer_2=clip_tokenizer("!"),  # bigG pads with "!" (id 0): the SD3 reference, SDXL
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer if with_t5 else None,
    )


def same(ours, theirs, what: str, where: str) -> None:
    for name, a, b in zip(("context", "uncond", "pooled", "uncond_pooled"), ours, theirs):
        assert a.shape == b.shape, f"{where}, {what}: {name} {tuple(a.shape)} vs diffusers' {tuple(b.shape)}"
        err = (a - b).abs().max().item()
        assert err < 1e-5, f"{where}, {what}: {name} differs from diffusers' by {err:.2e}"


def check_against_diffusers(seed: int, t5_tokenizer, tmp_path) -> None:
    from ldmkit.checkpoints.sd3_text_files import load_sd3_text_folder

    spec = draw(seed)
    where = f"seed {seed}: {spec}"
    pipes = {t5: diffusers_pipeline(spec, t5_tokenizer, seed, with_t5=t5) for t5 in (True, False)}
    # The folder with T5 is written in small shards: text_encoder_3/ has an index, as real XXL weights do.
    pipes[True].save_pretrained(tmp_path / "t5", max_shard_size="20KB" if seed % 2 else None)
    pipes[False].save_pretrained(tmp_path / "no_t5")
    ours = {True: load_sd3_text_folder(tmp_path / "t5"), False: load_sd3_text_folder(tmp_path / "no_t5")}
    cases = [  # (T5?, diffusers' clip_skip, max_sequence_length)
        (True, None, 256),
        (True, spec["clip_skip"], spec["msl"]),
        (True, None, 24),  # the long prompt over T5's limit
        (False, None, 256),
        (False, spec["clip_skip"], spec["msl"]),
    ]
    with torch.no_grad():
        for t5, clip_skip, msl in cases:
            what = f"{'with' if t5 else 'without'} T5, clip_skip {clip_skip}, max_sequence_length {msl}"
            theirs = pipes[t5].encode_prompt(
                PROMPTS, None, None, device="cpu", negative_prompt=NEGATIVES, clip_skip=clip_skip,
                max_sequence_length=msl,
            )  # fmt: skip
            skip = None if clip_skip is None else clip_skip + 1  # the web UI's numbering
            same(ours[t5].encode_prompts(PROMPTS, NEGATIVES, skip, msl), theirs, what, where)
        # A folder with T5 read without it (t5=False) is the folder without it.
        no_t5 = load_sd3_text_folder(tmp_path / "t5", t5=False)
        expected = ours[False].encode_prompts(PROMPTS, NEGATIVES)
        same(no_t5.encode_prompts(PROMPTS, NEGATIVES), expected, "t5=False", where)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sd3_text_equals_diffusers_encode_prompt(seed, t5_tokenizer, tmp_path):
    check_against_diffusers(seed, t5_tokenizer, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3, 15))
def test_sd3_text_equals_diffusers_encode_prompt_more_sizes(seed, t5_tokenizer, tmp_path):
    check_against_diffusers(seed, t5_tokenizer, tmp_path)


@pytest.fixture(scope="module")
def folder(t5_tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("sd3") / "pipe"
    spec = draw(0)
    spec["clip_l"]["projection_dim"] = spec["clip_l"]["hidden_size"]  # as SD3's CLIP-L: a square projection
    diffusers_pipeline(spec, t5_tokenizer, 0).save_pretrained(path)
    return path


def test_a_prompt_over_t5s_limit_is_truncated_with_a_warning_or_refused_in_one_line(folder, caplog):
    from ldmkit.checkpoints.sd3_text_files import load_sd3_text_folder

    encoders = load_sd3_text_folder(folder)
    n = encoders.t5xxl.tokenizer.lengths([LONG])[0]
    with caplog.at_level(logging.WARNING, logger="ldmkit.models.sd3_text"), torch.no_grad():
        context, pooled = encoders.encode_texts([LONG], max_sequence_length=32)
    assert context.shape[1] == 77 + 32
    assert f"prompt 1: T5 reads its first 32 tokens (max_sequence_length); {n - 32} dropped" in caplog.text
    encoders.check_prompt_lengths([LONG], n)  # exactly at the limit: fine
    with pytest.raises(ConfigError, match=rf"^prompt 2: {n} T5 tokens, over max_sequence_length 32 ") as e:
        encoders.encode_texts(["a cat", LONG], max_sequence_length=32, strict=True)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="negative prompt 1"):
        encoders.encode_prompts(["a cat"], [LONG], max_sequence_length=32, strict=True)
    for bad in (0, 513, 25.0, True):
        with pytest.raises(ConfigError, match="max_sequence_length"):
            encoders.encode_texts(["a cat"], max_sequence_length=bad)
    without = load_sd3_text_folder(folder, t5=False)
    without.check_prompt_lengths([SENTENCES[0]], 256)
    with pytest.raises(ConfigError, match="CLIP tokens, over the 77 the CLIP towers read"):
        without.check_prompt_lengths([LONG], 256)


def test_our_names_are_the_sd3_single_file_keys(folder):
    """The keys diffusers' single-file reader detects SD3's towers by, and converts with its own code
    into the diffusers models, are our module's names below `text_encoders.`."""
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    from ldmkit.checkpoints.sd3_text_files import load_sd3_text_folder, load_sd3_text_state
    from ldmkit.models.sd3_text import SD3TextEncoders

    ours = load_sd3_text_folder(folder)
    sd = {"text_encoders." + k: v for k, v in ours.state_dict().items()}
    assert sfu.is_clip_sd3_model(sd) and sfu.is_open_clip_sd3_model(sd) and sfu.is_t5_in_single_file(sd)
    for prefix, sub, cls in (
        ("text_encoders.clip_l.transformer.", "text_encoder", CLIPTextModelWithProjection),
        ("text_encoders.clip_g.transformer.", "text_encoder_2", CLIPTextModelWithProjection),
    ):
        converted = sfu.convert_ldm_clip_checkpoint(sd, prefix)
        reference = cls.from_pretrained(folder / sub)
        assert set(converted) == set(reference.state_dict()), prefix
    converted = sfu.convert_sd3_t5_checkpoint_to_diffusers(sd)
    assert set(converted) == set(T5EncoderModel.from_pretrained(folder / "text_encoder_3").state_dict())

    # As real SD3 files: CLIP-L without its projection (identity then), T5's embedding under one name.
    del sd["text_encoders.clip_l.transformer.text_projection.weight"]
    del sd["text_encoders.t5xxl.transformer.encoder.embed_tokens.weight"]
    fresh = SD3TextEncoders(ours.config)
    load_sd3_text_state(fresh, sd, "file.safetensors")
    proj = fresh.clip_l.transformer.text_projection.weight
    assert torch.equal(proj, torch.eye(proj.shape[0]))
    assert torch.equal(fresh.t5xxl.transformer.shared.weight, ours.t5xxl.transformer.shared.weight)

    sd["text_encoders.clip_g.transformer.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"^file.safetensors: text_encoders.clip_g: clip_g text encoder: unexp"):
        load_sd3_text_state(fresh, sd, "file.safetensors")
    del sd["text_encoders.clip_g.transformer.extra.weight"]
    del sd["text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight"]
    with pytest.raises(CheckpointError, match="missing weight.*final_layer_norm"):
        load_sd3_text_state(fresh, sd, "file.safetensors")


def test_a_broken_folder_is_refused_in_one_line(folder, tmp_path):
    import shutil

    from ldmkit.checkpoints.files import read_tensors, write_safetensors
    from ldmkit.checkpoints.sd3_text_files import load_sd3_text_folder

    broken = tmp_path / "pipe"
    shutil.copytree(folder, broken)
    path = broken / "text_encoder_3" / "model.safetensors"
    state = read_tensors(path)[0]
    state.pop("encoder.final_layer_norm.weight")
    write_safetensors(path, state, {"format": "pt"})
    with pytest.raises(CheckpointError, match=r"t5xxl text encoder: missing weight\(s\) .*final_layer_norm") as e:
        load_sd3_text_folder(broken)
    assert "\n" not in str(e.value)
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(CheckpointError, match="tokenizer_2/ is missing"):
        load_sd3_text_folder(broken)
