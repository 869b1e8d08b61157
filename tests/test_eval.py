"""`ldmkit eval` and `ldmkit shapes` end to end on a random-weight model (numbers near zero)."""

import json

from ldmkit.cli import main


def test_eval_reports_every_setting_and_the_ceiling(tmp_path, capsys):
    assert main(["init-model", str(tmp_path / "tiny.safetensors")]) == 0
    capsys.readouterr()
    code = main(
        [
            "eval",
            "--model",
            str(tmp_path / "tiny.safetensors"),
            "--n",
            "3",
            "--steps",
            "2,3",
            "--cfg",
            "1,5",
            "--samplers",
            "euler_a",
            "--split",
            "heldout",
            "--seeds",
            "2",
            "-q",
            "--out",
            str(tmp_path / "r.json"),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert report == json.loads((tmp_path / "r.json").read_text())
    assert len(report["settings"]) == 4 and report["split"] == "heldout"
    for s in report["settings"]:
        assert s["images"] == 6 and 0 <= s["fully_correct"] <= 1 and s["seconds_per_image"] > 0
        assert 0 <= s["colour"] <= 1 and s["diversity"] > 0
        assert sum(k["images"] for k in s["by_kind"].values()) == 6
        assert 0 < s["unet_seconds_per_image"] < s["seconds_per_image"]
        assert set(s["by_kind"]) <= {"single", "relation", "pair", "count"}
    assert report["judge_on_renders"]["fully_correct"] == 1.0
    assert all(k["fully_correct"] == 1.0 for k in report["judge_on_renders"]["by_kind"].values())
    assert set(report["ceiling"]) == {"reconstructions", "misses", "psnr", "ssim"}


def test_eval_and_shapes_bad_arguments(tmp_path, capsys):
    for argv, needle in [
        (["eval", "--model", "x", "--samplers", "nope"], "unknown sampler"),
        (["eval", "--model", "x", "--steps", "a,b"], "comma-separated list of int"),
        (["eval", "--model", "x", "--split", "test"], "--split test"),
        (["shapes", "--out", str(tmp_path), "--n", "0"], "n: 0"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and len(err.splitlines()) == 1


def test_shapes_command_writes_a_folder(tmp_path, capsys):
    assert main(["shapes", "--out", str(tmp_path / "d"), "--n", "12", "--split", "val"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n"] == 12 and len(list((tmp_path / "d").glob("*.png"))) == 12
