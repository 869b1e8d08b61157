"""SD3 / SD3.5 single files, read and written, on tiny random pipelines made by diffusers
(tests/test_sd3.py's build). A folder converted to a single file generates what the folder does; the
file's tensors, run through diffusers' own single-file converters into diffusers models, give diffusers'
pipeline ours (so the file is the original layout, not a private one). A file as Stability ships it --
no header, all, some or none of its towers -- is read by the family's rules, the towers it lacks taken
from a folder of ComfyUI-style standalone files or a diffusers folder, and equals diffusers (without T5
too). Refusals are one line. Replay a failure with its printed seed:
`python -m pytest tests/test_sd3_files.py -m slow -k "seed-103]"`."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_models_command import one_line_error, run
from test_sd3 import PROMPTS, build, draw, side_of
from test_sd3_text import t5_tokenizer  # noqa: F401  (a fixture)

from ldmkit.checkpoints.sd3_files import sd3_state
from ldmkit.checkpoints.single_file import load_model, save_single_file
from ldmkit.diffusion.sampling import generators_for
from ldmkit.errors import CheckpointError
from ldmkit.models.tokenizers import bundled_t5_folder
from ldmkit.pipelines import Pipeline

KW = dict(negative_prompt="blurry", steps=4, cfg=5.0, sampler="euler", seed=3)


def test_the_shipped_t5_tokenizer_is_t5_v1_1s():
    """32,000 SentencePiece pieces and 100 sentinels; <pad> 0, </s> 1, <unk> 2; T5's known ids."""
    from ldmkit.models.tokenizers import T5Tokenizer

    t = T5Tokenizer()
    assert len(t) == 32100 and (t.hf.pad_token_id, t.hf.eos_token_id, t.hf.unk_token_id) == (0, 1, 2)
    assert [t.hf.convert_tokens_to_ids(f"<extra_id_{i}>") for i in (0, 99)] == [32099, 32000]
    assert t.hf("Hello world").input_ids == [8774, 296, 1]
    assert t(["a photo of a cat"], 10).tolist() == [[3, 9, 1202, 13, 3, 9, 1712, 1, 0, 0]]
    assert t.is_bundled() and (bundled_t5_folder() / "NOTICE").is_file()


def reference(pipe, side: int, **components):
    """diffusers' latents for PROMPTS[1] on the seed ldmkit uses (components replaced as given)."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(**{**pipe.components, **components})
    kw = dict(negative_prompt="blurry", num_inference_steps=4, guidance_scale=5.0, width=side, height=side)
    return pipe(PROMPTS[1], generator=generators_for(3, 1), output_type="latent", **kw).images


def ours(path, side: int, **load) -> torch.Tensor:
    return Pipeline.load(path, precision="fp32", **load)(PROMPTS[1], width=side, height=side, **KW).latents


def close(got: torch.Tensor, want: torch.Tensor, where: str, tol: float = 1e-4) -> None:
    scale = float(want.abs().max())
    gap = float((got - want).abs().max())
    assert gap <= tol * max(1.0, scale), f"{where}: latents differ by {gap:.2e} (of {scale:.2f})"


def identity_clip_l(spec: dict) -> dict:
    """CLIP-L with an identity projection: the SD3 reference never projects CLIP-L's pooled vector, and
    diffusers' single-file reader puts the identity there whatever a file holds."""
    t = spec["towers"]
    t["clip_l"]["projection_dim"] = t["clip_l"]["hidden_size"]
    spec["transformer"]["pooled_projection_dim"] = t["clip_l"]["hidden_size"] + t["clip_g"]["projection_dim"]
    return spec


def built(spec: dict, folder, seed: int, t5_tok):
    """The pipeline of `spec`, its CLIP-L projection the identity, saved in `folder`."""
    pipe = build(spec, folder, seed, t5_tok, spec["scheduler"]["t5"])
    with torch.no_grad():
        pipe.text_encoder.text_projection.weight.copy_(torch.eye(spec["towers"]["clip_l"]["hidden_size"]))
    pipe.save_pretrained(str(folder))
    return pipe


def diffusers_from_file(path, folder, pipe):
    """The components diffusers' own single-file converters make of our file's tensors, each strictly
    loaded (configs from the folder the file was converted from, as from_single_file(config=...) takes)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_vae_checkpoint,
        convert_sd3_t5_checkpoint_to_diffusers,
        convert_sd3_transformer_checkpoint_to_diffusers,
        create_diffusers_clip_model_from_ldm,
    )
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    state = load_file(str(path))

    def part(prefix):
        return {k: v for k, v in state.items() if k.startswith(prefix)}

    transformer = SD3Transformer2DModel.from_config(pipe.transformer.config)
    transformer.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(part("model.diffusion_model.")))
    vae = AutoencoderKL.from_config(pipe.vae.config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(part("first_stage_model."), dict(pipe.vae.config)))
    towers = {}
    for name, sub in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
        towers[sub] = create_diffusers_clip_model_from_ldm(
            CLIPTextModelWithProjection, part(f"text_encoders.{name}."), sub, str(folder), local_files_only=True
        )
    if pipe.text_encoder_3 is not None:
        t5 = T5EncoderModel(pipe.text_encoder_3.config)
        converted = convert_sd3_t5_checkpoint_to_diffusers(part("text_encoders.t5xxl."))
        missing, unexpected = t5.load_state_dict(converted, strict=False)
        assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight"}, (missing, unexpected)
        assert torch.equal(t5.encoder.embed_tokens.weight, t5.shared.weight)  # tied: one tensor in the file
        towers["text_encoder_3"] = t5.eval()
    return dict(transformer=transformer.eval(), vae=vae.eval(), **towers)


def round_trip(seed: int, t5_tok, tmp_path, capsys=None) -> None:
    """Folder -> single file (by `ldmkit convert` given capsys) -> the same model, generation and, through
    diffusers' converters, diffusers' generation; stored as fp16, the same weights rounded."""
    spec = identity_clip_l(draw(seed))
    folder, file = tmp_path / "sd3", tmp_path / "sd3.safetensors"
    pipe = built(spec, folder, seed, t5_tok)
    where = f"seed {seed}: {spec}"
    if capsys is not None:
        assert json.loads(run(capsys, "convert", folder, file, "--to", "single-file")[0])["family"] == "sd3"
    else:
        save_single_file(load_model(folder), file)
    keys = load_file(str(file)).keys()
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "text_encoders.")) for k in keys)
    a, b = load_model(folder), load_model(file)
    assert a.config.to_dict() == b.config.to_dict(), where
    sa, sb = sd3_state(a), sd3_state(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), where
    if spec["scheduler"]["t5"]:  # the folder's own T5 vocabulary, carried in the header
        assert b.text_encoders.t5xxl.tokenizer.hf.get_vocab() == t5_tok.get_vocab()
    save_single_file(a, tmp_path / "fp16.safetensors", torch.float16)
    half = sd3_state(load_model(tmp_path / "fp16.safetensors"))
    assert all(torch.equal(half[k], v.half().float()) for k, v in sa.items()), where

    side = side_of(spec)
    from_folder = ours(folder, side)
    close(ours(file, side), from_folder, f"{where}: file against folder", tol=1e-5)
    close(from_folder, reference(pipe, side), f"{where}: folder against diffusers")
    close(from_folder, reference(pipe, side, **diffusers_from_file(file, folder, pipe)), f"{where}: via the file")


def test_a_folder_as_a_single_file_generates_the_same_and_is_the_original_layout(t5_tokenizer, tmp_path, capsys):  # noqa: F811
    round_trip(1, t5_tokenizer, tmp_path, capsys)  # T5, a dual-attention block, shift 1 (not the family's 3)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 115), ids=lambda v: f"seed-{v}")
def test_many_folders_as_single_files(seed, t5_tokenizer, tmp_path):  # noqa: F811
    round_trip(seed, t5_tokenizer, tmp_path)


# --- files as Stability ships them -----------------------------------------------------------------


def stability_like(seed: int) -> dict:
    """A pipeline the family's rules describe, as a file without our header is read: 64 channels per head
    in the transformer and both CLIP towers, T5 v1.1's reach, shift 3."""
    spec = identity_clip_l(draw(seed))
    t = spec["towers"]
    t["clip_l"].update(hidden_size=64, num_attention_heads=1, projection_dim=64)
    t["clip_g"].update(hidden_size=128, num_attention_heads=2, projection_dim=128)
    t["t5"].update(d_model=200, relative_attention_max_distance=128)
    spec["transformer"].update(
        attention_head_dim=64, num_attention_heads=2, caption_projection_dim=128, joint_attention_dim=200
    )
    spec["transformer"]["pooled_projection_dim"] = 192
    spec["scheduler"].update(shift=3.0, t5=True)
    return spec


def standalone_towers(pipe, folder, t5_name="t5xxl.safetensors") -> None:
    """ComfyUI-style tower files: transformers' state dicts as they are (T5's tied embedding once). CLIP-L's
    with a projection of its own, as OpenAI's CLIP-L files have, which SD3 does not use."""
    folder.mkdir()
    for module, name in ((pipe.text_encoder, "clip_l"), (pipe.text_encoder_2, "clip_g")):
        state = {k: v.contiguous() for k, v in module.state_dict().items()}
        if name == "clip_l":
            state["text_projection.weight"] = torch.randn(state["text_projection.weight"].shape)
        save_file(state, str(folder / f"{name}.safetensors"))
    t5 = {k: v.contiguous() for k, v in pipe.text_encoder_3.state_dict().items() if "embed_tokens" not in k}
    save_file(t5, str(folder / t5_name))


def make_shipped(root, seed: int):
    """A Stability-like pipeline (with the shipped T5 tokenizer) and its single files without our header:
    whole, without T5, without towers; and the towers as standalone files."""
    from transformers import T5TokenizerFast

    spec = stability_like(seed)
    tokenizer = T5TokenizerFast.from_pretrained(str(bundled_t5_folder()), local_files_only=True)
    pipe = built(spec, root / "sd3", seed, tokenizer)
    save_single_file(load_model(root / "sd3"), root / "ours.safetensors")
    state = load_file(str(root / "ours.safetensors"))  # no header below: only the family's rules
    files = {
        "full": state,
        "clips": {k: v for k, v in state.items() if not k.startswith("text_encoders.t5xxl.")},
        "bare": {k: v for k, v in state.items() if not k.startswith("text_encoders.")},
    }
    for name, tensors in files.items():
        save_file(tensors, str(root / f"{name}.safetensors"))
    standalone_towers(pipe, root / "towers")
    return root, spec, pipe


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    return make_shipped(tmp_path_factory.mktemp("sd3-files"), 7)  # qk norm, dual attention in every block


def check_shipped(root, spec, pipe, caplog, seed: int) -> None:
    """The whole file equals diffusers; its towers from standalone files or a diffusers folder change
    nothing; without T5 it equals diffusers without T5."""
    side, where = side_of(spec), f"seed {seed}: {spec}"
    full = ours(root / "full.safetensors", side)
    close(full, reference(pipe, side), f"{where}: the whole file")
    for source in ("towers", "sd3"):  # standalone files, a diffusers folder
        got = ours(root / "bare.safetensors", side, text_encoders=root / source)
        close(got, full, f"{where}: towers from {source}/", tol=1e-5)
    got = ours(root / "clips.safetensors", side, text_encoders=root / "towers")
    close(got, full, f"{where}: T5 from towers/", tol=1e-5)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldmkit"):
        without_t5 = ours(root / "clips.safetensors", side)
    assert any("no T5 text encoder" in r.getMessage() for r in caplog.records)
    close(without_t5, reference(pipe, side, text_encoder_3=None, tokenizer_3=None), f"{where}: without T5")


def test_a_file_as_stability_ships_it_equals_diffusers_with_its_towers_from_anywhere(shipped, caplog):
    check_shipped(*shipped, caplog, 7)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(200, 210), ids=lambda v: f"seed-{v}")
def test_many_files_as_stability_ships_them(seed, tmp_path, caplog):
    check_shipped(*make_shipped(tmp_path, seed), caplog, seed)


def test_inspect_the_listing_and_generate_take_a_file_and_its_towers(shipped, tmp_path, capsys):
    root, spec, _ = shipped
    for name, towers in [("full", (True, True, True)), ("clips", (True, True, False)), ("bare", (False,) * 3)]:
        info = json.loads(run(capsys, "inspect", root / f"{name}.safetensors")[0])
        assert info["family"] == "sd3" and info["supported"], info
        assert tuple(info["text_encoders"][n]["present"] for n in ("clip_l", "clip_g", "t5xxl")) == towers, info
    info = json.loads(run(capsys, "inspect", root / "bare.safetensors", "--text-encoders", root / "towers")[0])
    t5 = spec["towers"]["t5"]
    assert info["text_encoders"]["t5xxl"] == dict(
        present=True, layers=t5["num_layers"], width=200, heads=t5["num_heads"], in_file=False
    )
    report = json.loads(run(capsys, "models", root, "--json")[0])
    got = {e["name"]: e for e in report["folders"][0]["entries"]}
    assert got["bare.safetensors"]["supported"] and got["bare.safetensors"]["text_encoders"] == []
    assert got["clips.safetensors"]["text_encoders"] == ["clip_l", "clip_g"]
    assert (got["sd3"]["family"], got["sd3"]["kind"]) == ("sd3", "model")
    info = json.loads(run(capsys, "inspect", root / "sd3")[0])  # a diffusers folder
    assert info["family"] == "sd3" and all(t["present"] for t in info["text_encoders"].values())
    out, side = tmp_path / "cat.png", side_of(spec)
    args = ["--text-encoders", root / "towers", "--steps", 2, "--width", side, "--height", side, "-o", out, "-q"]
    run(capsys, "generate", "a cat", "--model", root / "bare.safetensors", *args)
    assert out.is_file()


def test_refusals_are_one_line(shipped, tmp_path, capsys):
    root, _, _ = shipped
    bare = root / "bare.safetensors"
    with pytest.raises(CheckpointError, match=r"without its clip_l and clip_g text encoder.*--text-encoders DIR"):
        load_model(bare)
    err = one_line_error(capsys, "generate", "a cat", "--model", bare, "-q", "-o", tmp_path / "x.png")
    assert "--text-encoders DIR" in err and "clip_l.safetensors" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    clip_l = load_file(str(root / "towers" / "clip_l.safetensors"))
    save_file({k: v for k, v in clip_l.items() if "layers.1.mlp.fc2" not in k}, str(broken / "clip_l.safetensors"))
    (broken / "clip_g.safetensors").write_bytes((root / "towers" / "clip_g.safetensors").read_bytes()[:300])
    err = one_line_error(capsys, "generate", "a cat", "--model", bare, "--text-encoders", broken, "-q")
    assert "clip_l.safetensors" in err and "missing weight" in err and "fc2" in err
    (broken / "clip_l.safetensors").unlink()
    (broken / "clip_l.safetensors").symlink_to(root / "towers" / "clip_l.safetensors")
    err = one_line_error(capsys, "generate", "a cat", "--model", bare, "--text-encoders", broken, "-q")
    assert "clip_g.safetensors" in err and "truncated" in err
    err = one_line_error(capsys, "generate", "a cat", "--model", bare, "--text-encoders", tmp_path / "none", "-q")
    assert "no such folder" in err
    scaled = tmp_path / "scaled"
    scaled.mkdir()
    t5 = {k: v.to(torch.float8_e4m3fn) for k, v in load_file(str(root / "towers" / "t5xxl.safetensors")).items()}
    save_file(t5 | {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, str(scaled / "t5xxl.safetensors"))
    with pytest.raises(CheckpointError, match="scaled fp8"):
        load_model(root / "clips.safetensors", text_encoders=scaled)
    down = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    lora = tmp_path / "style.safetensors"
    save_file({f"{down}.lora_down.weight": torch.zeros(4, 64), f"{down}.lora_up.weight": torch.zeros(64, 4)}, str(lora))
    full = root / "full.safetensors"
    err = one_line_error(capsys, "generate", "a cat", "--model", full, "--lora", lora, "--steps", "1", "-q")
    assert "a LoRA for a U-Net model; this model is SD3 / SD3.5 (a transformer)" in err
    err = one_line_error(capsys, "generate", "a cat", "--model", "shapes", "--text-encoders", root / "towers", "-q")
    assert "only SD3 / SD3.5 files take it" in err


def test_a_file_given_its_towers_converts_whole_and_loads_in_other_dtypes(shipped, tmp_path, capsys):
    root, _, _ = shipped
    whole = tmp_path / "whole.safetensors"
    bare, towers = root / "bare.safetensors", root / "towers"
    run(capsys, "convert", bare, whole, "--to", "single-file", "--text-encoders", towers)
    a, b = sd3_state(load_model(root / "full.safetensors")), sd3_state(load_model(whole))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    fp8 = tmp_path / "fp8"  # T5 as ComfyUI's t5xxl_fp8_e4m3fn.safetensors stores it
    fp8.mkdir()
    t5 = load_file(str(towers / "t5xxl.safetensors"))
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in t5.items()}, str(fp8 / "t5xxl_fp8_e4m3fn.safetensors"))
    model = load_model(root / "clips.safetensors", text_encoders=fp8)
    got = model.text_encoders.t5xxl.transformer.shared.weight
    assert got.dtype == torch.float32 and torch.equal(got, t5["shared.weight"].to(torch.float8_e4m3fn).float())

    model = load_model(root / "full.safetensors", dtype_rule=lambda config: torch.bfloat16)
    assert next(model.unet.parameters()).dtype == next(model.vae.parameters()).dtype == torch.bfloat16
    assert model.text_encoders.t5xxl.transformer.shared.weight.dtype == torch.float32  # the towers stay fp32
