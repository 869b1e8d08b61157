"""The `ldmkit` command end to end: init-model, inspect (JSON, what was guessed), convert."""

import json

from conftest import write_sd_file
from ldmkit.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_inspect_reports_family_counts_and_guesses(tmp_path, capsys):
    write_sd_file(tmp_path / "sd2.safetensors", kind="openclip")
    info = json.loads(run(capsys, "inspect", tmp_path / "sd2.safetensors"))
    assert info["family"] == "sd2-v" and info["format"] == "safetensors"
    assert info["prediction_type"] == "v_prediction" and info["latent_channels"] == 4
    assert info["guessed"]["schedule.prediction_type"] == "v_prediction"
    assert info["guessed"]["unet.num_head_channels"] == 64
    assert set(info["parameters"]) == {"unet", "vae", "text_encoder"} and all(info["parameters"].values())
    info = json.loads(run(capsys, "inspect", tmp_path / "sd2.safetensors", "--prediction-type", "epsilon"))
    assert info["family"] == "sd2-eps" and "schedule.prediction_type" not in info["guessed"]


def test_init_convert_and_inspect_both_layouts(tmp_path, capsys):
    run(capsys, "init-model", tmp_path / "tiny.safetensors", "--preset", "tiny")
    first = json.loads(run(capsys, "inspect", tmp_path / "tiny.safetensors"))
    assert first["family"] == "ldmkit" and first["guessed"] == {}
    run(capsys, "convert", tmp_path / "tiny.safetensors", tmp_path / "tiny-diffusers", "--to", "diffusers")
    assert (tmp_path / "tiny-diffusers" / "model_index.json").exists()
    second = json.loads(run(capsys, "inspect", tmp_path / "tiny-diffusers"))
    assert second["parameters"] == first["parameters"]
    run(
        capsys,
        "convert",
        tmp_path / "tiny-diffusers",
        tmp_path / "back.safetensors",
        "--to",
        "single-file",
        "--dtype",
        "fp16",
    )
    third = json.loads(run(capsys, "inspect", tmp_path / "back.safetensors"))
    assert third["dtype"] == ["float16"] and third["parameters"] == first["parameters"]
