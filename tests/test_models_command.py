"""Finding models: `ldmkit models` (the bundled ones, what each file in a folder is for, where real
checkpoints come from), `ldmkit --version`, bundled names in every command that takes a model, and a
suggestion for a mistyped one."""

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import write_sd_file
from ldmkit import __version__, bundled
from ldmkit.checkpoints import files
from ldmkit.checkpoints.families import FAMILIES
from ldmkit.cli import main


def run(capsys, *argv, code=0):
    got = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert got == code, err
    return out, err


def one_line_error(capsys, *argv) -> str:
    _, err = run(capsys, *argv, code=2)
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f"ldmkit {__version__}"


def test_models_lists_the_bundled_models_with_their_chosen_settings(capsys):
    report = json.loads(run(capsys, "models", "--json")[0])
    listed = {m["name"]: m for m in report["bundled"]}
    assert list(listed) == list(bundled.BUNDLED)
    for name, entry in bundled.BUNDLED.items():
        m = listed[name]
        assert m["family"] == "ldmkit" and m["image_size"] == 64 and m["defaults"] == entry.defaults
        assert m["size_bytes"] == (bundled.HERE / entry.file).stat().st_size
    assert listed["shapes"]["controlnet"] == "shapes-canny" and listed["shapes"]["fast"] == "shapes-fast"
    assert listed["shapes-fast"]["fast_of"] == "shapes" and listed["emoji"]["controlnet"] is None
    loads = [f.title for f in FAMILIES.values() if f.supported and f.name != "ldmkit"]
    assert report["loads"] == loads
    assert report["recognised_not_supported"] == [f.title for f in FAMILIES.values() if not f.supported]

    text = run(capsys, "models")[0]
    rows = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    for name, entry in bundled.BUNDLED.items():
        assert {str(entry.defaults["steps"]), str(entry.defaults["cfg"]), entry.defaults["sampler"]} <= set(
            rows[name].split()
        )
    assert "shapes-canny" in rows["shapes"]
    last = text.strip().splitlines()[-1]
    assert all(title in last for title in loads) and "Hugging Face" in last and "Civitai" in last
    assert all(f.title in last for f in FAMILIES.values() if not f.supported)


def _diffusers_folder(folder, unet_extra=None):
    """A diffusers pipeline folder's configs (a listing reads nothing else): SD 1.x shapes."""
    configs = {
        "model_index.json": {"_class_name": "StableDiffusionPipeline"},
        "unet/config.json": {"_class_name": "UNet2DConditionModel", "sample_size": 64, **(unet_extra or {})},
        "vae/config.json": {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512]},
        "text_encoder/config.json": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "hidden_act": "quick_gelu",
        },
        "scheduler/scheduler_config.json": {"prediction_type": "epsilon"},
    }
    for name, data in configs.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(data))


class _Hostile:
    """Pickled, it would create a file when unpickled: what a hostile .ckpt does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _tiny_sd3_file(path):
    """An SD3 file as Stability ships sd3_medium.safetensors (transformer and autoencoder, no text towers),
    tiny and random."""
    from ldmkit.models.autoencoder import AutoencoderConfig, AutoencoderKL
    from ldmkit.models.mmdit import MMDiT, MMDiTConfig

    unet = MMDiT(MMDiTConfig(depth=1, hidden_size=64, context_dim=16, pooled_dim=8, pos_embed_max_size=4))
    vae = AutoencoderKL(AutoencoderConfig(channels=(8,), num_res_blocks=1, z_channels=16, embed_dim=16, norm_groups=8))
    state = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    save_file(state | {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}, path)


def _folder_of_everything(root):
    """One file of each kind a models folder holds, a broken one, and one that is not a checkpoint."""
    write_sd_file(root / "sd1.safetensors", kind="clip")
    (root / "sub").mkdir()
    write_sd_file(root / "sub" / "sd2.ckpt", kind="openclip", fmt="ckpt")
    xl = {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(4)}
    save_file({**xl, "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}, root / "xl.safetensors")
    _tiny_sd3_file(root / "sd3.safetensors")
    sd3 = {"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": torch.zeros(8)}
    save_file(sd3, root / "sd3-cut.safetensors")
    save_file({"encoder.down.0.block.0.conv1.weight": torch.zeros(8, 3, 3, 3)}, root / "vae.safetensors")
    save_file(
        {
            "control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3),
            "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 768),
        },
        root / "canny.safetensors",
    )
    down = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file(
        {f"{down}.lora_down.weight": torch.zeros(4, 1024), f"{down}.lora_up.weight": torch.zeros(320, 4)},
        root / "style.safetensors",
    )
    save_file({"hada_w1_a": torch.zeros(2, 2)}, root / "loha.safetensors")
    save_file({"emb_params": torch.zeros(2, 768)}, root / "dax.safetensors")
    (root / "broken.safetensors").write_bytes((root / "sd1.safetensors").read_bytes()[:100])
    (root / "notes.ckpt").write_text("not a checkpoint")
    torch.save({"state_dict": {"a": torch.zeros(1)}, "x": _Hostile(root.parent / "ran")}, root / "hostile.ckpt")
    (root / "README.txt").write_text("skipped: not a weights file")
    _diffusers_folder(root / "pipe")
    xl_unet = {"addition_embed_type": "text_time", "addition_time_embed_dim": 256, "sample_size": 128}
    _diffusers_folder(root / "xl-pipe", {**xl_unet, "projection_class_embeddings_input_dim": 2816})
    (root / "xl-pipe" / "text_encoder_2").mkdir()
    (root / "xl-pipe" / "text_encoder_2" / "config.json").write_text(
        json.dumps({"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20})
    )
    _diffusers_folder(root / "odd-pipe", {"addition_embed_type": "image"})


def test_models_says_what_each_file_in_a_folder_is_from_headers_alone(tmp_path, capsys, monkeypatch):
    root = tmp_path / "models"
    root.mkdir()
    _folder_of_everything(root)

    def no_weights(*args, **kwargs):
        raise AssertionError("a listing reads headers, never weights")

    for name in ("load_file", "_read_safetensors_as", "safe_torch_load"):
        monkeypatch.setattr(files, name, no_weights)
    report = json.loads(run(capsys, "models", root, "--json")[0])
    (folder,) = report["folders"]
    assert folder["path"] == str(root)
    got = {e["name"]: e for e in folder["entries"]}
    assert "README.txt" not in got
    assert (got["sd1.safetensors"]["kind"], got["sd1.safetensors"]["family"]) == ("model", "sd1")
    assert got["sd1.safetensors"]["image_size"] == 512 and got["sd1.safetensors"]["supported"]
    assert (got["sub/sd2.ckpt"]["kind"], got["sub/sd2.ckpt"]["family"]) == ("model", "sd2-v")
    sd3 = got["sd3.safetensors"]
    assert (sd3["family"], sd3["supported"], sd3["image_size"], sd3["text_encoders"]) == ("sd3", True, 1024, [])
    assert (got["pipe"]["kind"], got["pipe"]["family"], got["pipe"]["image_size"]) == ("model", "sd1", 512)
    assert (got["xl-pipe"]["family"], got["xl-pipe"]["image_size"], got["xl-pipe"]["supported"]) == ("sdxl", 1024, True)
    assert got["vae.safetensors"]["kind"] == "vae"
    assert got["canny.safetensors"]["kind"] == "controlnet" and "sd1" in got["canny.safetensors"]["fits"]
    assert got["style.safetensors"]["kind"] == "lora" and "sd2-v" in got["style.safetensors"]["fits"]
    assert got["dax.safetensors"]["kind"] == "embedding" and "sd1" in got["dax.safetensors"]["fits"]
    for name, reason in [
        ("broken.safetensors", "truncated"),
        ("notes.ckpt", "not a checkpoint"),
        ("loha.safetensors", "LoHa"),
        ("odd-pipe", "addition_embed_type"),
        ("xl.safetensors", "conditioner.embedders.0"),  # an SDXL file whose text tower is cut short
        ("sd3-cut.safetensors", "SD3 / SD3.5 file, not loadable"),  # a transformer key alone
        ("hostile.ckpt", "refused"),
    ]:
        assert got[name]["kind"] == "unknown" and reason in got[name]["note"], got[name]

    assert not (tmp_path / "ran").exists()
    text = run(capsys, "models", root)[0]
    rows = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    assert "not recognised: " in rows["broken.safetensors"] and "truncated" in rows["broken.safetensors"]
    assert "Stable Diffusion 1.x" in rows["sd1.safetensors"] and "--model" in rows["sd1.safetensors"]
    assert "--controlnet" in rows["canny.safetensors"] and "--vae" in rows["vae.safetensors"]
    assert "SD3" in rows["sd3.safetensors"] and "--model" in rows["sd3.safetensors"]
    assert "text encoders: none (--text-encoders DIR)" in rows["sd3.safetensors"]
    for name in got:
        assert name in rows, name


def test_models_identifies_a_single_file_and_refuses_a_missing_path(tmp_path, capsys):
    report = json.loads(run(capsys, "models", bundled.HERE / "shapes-canny.safetensors", "--json")[0])
    assert [(e["name"], e["kind"]) for e in report["folders"][0]["entries"]] == [
        ("shapes-canny.safetensors", "controlnet")
    ]
    err = one_line_error(capsys, "models", tmp_path / "nowhere")
    assert "nowhere" in err and "no such file or folder" in err


def test_inspect_and_convert_take_bundled_names(tmp_path, capsys):
    info = json.loads(run(capsys, "inspect", "shapes")[0])
    assert info["family"] == "ldmkit" and info["path"] == str(bundled.HERE / "shapes.safetensors")
    assert json.loads(run(capsys, "inspect", "bundled:emoji")[0])["path"] == str(bundled.HERE / "emoji.safetensors")
    out = tmp_path / "shapes-copy.safetensors"
    assert json.loads(run(capsys, "convert", "shapes", out, "--to", "single-file")[0])["family"] == "ldmkit"
    assert json.loads(run(capsys, "inspect", out)[0])["parameters"] == info["parameters"]


def test_bundled_prefix_and_paths_pick_either_when_a_local_folder_has_a_bundled_name(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "emoji").mkdir()
    path, defaults = bundled.resolve("bundled:emoji")
    assert path == bundled.HERE / "emoji.safetensors" and defaults == bundled.BUNDLED["emoji"].defaults
    assert bundled.resolve("./emoji") == (bundled.Path("./emoji"), {})
    assert bundled.resolve(str(tmp_path / "emoji")) == (tmp_path / "emoji", {})
    with caplog.at_level(logging.WARNING, logger="ldmkit"):
        bundled.resolve("emoji")  # which one a bare name means: test_bundled.py's rule
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "bundled:emoji" in warning and "./emoji" in warning and "\n" not in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldmkit"):
        bundled.resolve("shapes")  # no such folder here: the bundled one, nothing to warn about
    assert not caplog.records


def test_a_mistyped_model_name_suggests_the_bundled_one(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, "generate", "a dog face", "--model", "emoj", "-q")
    assert err == "error: no model 'emoj': not a file, folder or bundled model; did you mean 'emoji'?"
    err = one_line_error(capsys, "inspect", "shapez")
    assert err.endswith("did you mean 'shapes'?")
    err = one_line_error(capsys, "inspect", "bundled:emoj")
    assert "did you mean 'emoji'?" in err
    err = one_line_error(capsys, "inspect", "qwerty")
    assert "no model 'qwerty'" in err and all(name in err for name in bundled.BUNDLED) and "ldmkit models" in err
    err = one_line_error(capsys, "inspect", tmp_path / "missing.safetensors")  # a path: the reader says why
    assert "no such file" in err


def test_models_names_tiny_autoencoders_and_the_family_they_decode_for(tmp_path, capsys):
    """Ours (the family in the header), a decoder in the original repository's layout named as published
    (its family from the name), and the same weights under another name (family unknown)."""
    from ldmkit.checkpoints.taesd_files import write_tiny_autoencoder
    from ldmkit.models.tiny_autoencoder import TinyAutoencoder, TinyAutoencoderConfig

    config = TinyAutoencoderConfig(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 2),
        num_decoder_blocks=(2, 1),
    )
    tiny = TinyAutoencoder(config)
    write_tiny_autoencoder(tiny, tmp_path / "ours.safetensors", family="sd1")
    save_file(
        {f"taesd_decoder.{k}": v for k, v in tiny.decoder.state_dict().items()},
        tmp_path / "taesdxl_decoder.safetensors",
    )
    save_file({f"taesd_decoder.{k}": v for k, v in tiny.decoder.state_dict().items()}, tmp_path / "mystery.safetensors")
    report = json.loads(run(capsys, "models", tmp_path, "--json")[0])
    got = {e["name"]: e for e in report["folders"][0]["entries"]}
    assert {k: got["ours.safetensors"][k] for k in ("kind", "for", "parts")} == {
        "kind": "tiny-autoencoder",
        "for": "sd1",
        "parts": ["decoder", "encoder"],
    }
    xl = got["taesdxl_decoder.safetensors"]
    assert (xl["kind"], xl["for"], xl["parts"]) == ("tiny-autoencoder", "SDXL", ["decoder"])
    assert got["mystery.safetensors"]["kind"] == "tiny-autoencoder" and got["mystery.safetensors"]["for"] == ""
    rows = {line.split()[0]: line for line in run(capsys, "models", tmp_path)[0].splitlines() if line.strip()}
    assert "tiny autoencoder (TAESD) decoder for SDXL" in rows["taesdxl_decoder.safetensors"]
    assert "--tiny-decoder" in rows["taesdxl_decoder.safetensors"] and "unknown" in rows["mystery.safetensors"]
