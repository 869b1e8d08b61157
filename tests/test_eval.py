"""`ldmkit eval` and `ldmkit shapes` end to end on a random-weight model (numbers near zero)."""

import json

from ldmkit.cli import main
from ldmkit.data.shapes import sample_scene


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
            "5",
            "--feature-cache",
            "1,2",
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
    assert [s.get("feature_cache", 1) for s in report["settings"]] == [1, 2, 1, 2]
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
        (["eval", "--model", "x", "--feature-cache", "0,2"], "--feature-cache 0,2: allowed: integers of 1 or more"),
        (["eval", "--model", "x", "--word", "red"], "expected OLD=NEW"),
        (["eval", "--model", "x", "--word", "red=dark red"], "expected OLD=NEW"),
        (["eval", "--model", "x", "--word", "the=dax"], "OLD must be a colour or shape"),
        (["shapes", "--out", str(tmp_path), "--n", "0"], "n: 0"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and len(err.splitlines()) == 1


def test_shapes_command_writes_a_folder(tmp_path, capsys):
    assert main(["shapes", "--out", str(tmp_path / "d"), "--n", "12", "--split", "val"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n"] == 12 and len(list((tmp_path / "d").glob("*.png"))) == 12


def test_eval_measures_with_a_lora_and_an_embedding(tmp_path, base_model, capsys):
    """The personalisation numbers in docs/personalisation.md come from `eval --lora` / `--embedding`: the
    images measured must be the adapted model's (weight 0 is the base model, weight 1 is not)."""
    import torch
    import yaml
    from safetensors.torch import save_file

    from conftest import ROOT
    from ldmkit.config import from_dict
    from ldmkit.models.embeddings import token_embedding
    from ldmkit.training.lora import LoraTask, LoraTrainConfig

    data = yaml.safe_load((ROOT / "configs" / "test-lora.yaml").read_text())
    data.update(base=str(base_model))
    data["run"]["dir"] = str(tmp_path / "lora-run")
    task = LoraTask(from_dict(LoraTrainConfig, data))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in task.adapters.parameters():
            p.normal_(0, 0.2)
    save_file(task.lora_files()[0], str(tmp_path / "pink.safetensors"))
    width = token_embedding(task.model.text_encoder).embedding_dim
    save_file({"emb_params": torch.randn(2, width)}, str(tmp_path / "dax.safetensors"))

    def run(*extra):
        argv = ["eval", "--model", str(base_model), "--n", "2", "--steps", "2", "--cfg", "3", "--seeds", "2", "-q"]
        assert main(argv + list(extra)) == 0
        out, err = capsys.readouterr()
        report = json.loads(out)
        return report, report["settings"][0]["diversity"], err

    # the model knows its captions' words: measuring it warns of none (its warm-up included)
    assert "does not know" not in run("--split", "val")[2]
    _, plain, _ = run("--split", "pink")
    zero_report, zero, _ = run("--split", "pink", "--lora", f"{tmp_path / 'pink.safetensors'}:0")
    one_report, one, _ = run("--split", "pink", "--lora", f"{tmp_path / 'pink.safetensors'}:1")
    assert zero == plain and one != plain
    assert one_report["loras"] == [[str(tmp_path / "pink.safetensors"), 1.0]]
    # A new word for red: prompts say "dax" where captions say "red"; the judge still checks red.
    word_report, without, _ = run("--split", "val", "--word", "red=dax")
    with_report, with_embedding, _ = run(
        "--split", "val", "--word", "red=dax", "--embedding", str(tmp_path / "dax.safetensors")
    )
    assert with_embedding != without
    assert with_report["embeddings"] == ["dax"] and word_report["words"] == {"red": "dax"}
    # only prompts that say the word are measured
    assert all("red" in sample_scene("val", i).caption.split() for i in word_report["scenes"])
