"""The emoji data command: captions from the data, RGBA composited onto one background, held-out
(emoji, style) pairs, and no half-written dataset when the registry or an archive fails."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from ldmkit.cli import main
from ldmkit.data import emoji


def fake_archive(path, folder, images: dict[str, Image.Image], meta: list[dict]):
    with tarfile.open(path, "w:gz") as tar:

        def add(name, data: bytes):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("package/emoji.json", json.dumps(meta).encode())
        for name, im in images.items():
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            add(f"package/{folder}/{name}", buf.getvalue())


META = [
    {
        "name": "DOG FACE",
        "short_name": "dog",
        "category": "Animals & Nature",
        "image": "1f436.png",
        "has_img_google": True,
        "has_img_twitter": True,
    },
    {
        "name": None,
        "short_name": "thumbs_up",
        "category": "People & Body",
        "image": "1f44d.png",
        "has_img_google": True,
        "has_img_twitter": False,
        "skin_variations": {"1F3FD": {"image": "1f44d-1f3fd.png", "has_img_google": True, "has_img_twitter": True}},
    },
    {
        "name": "EMOJI MODIFIER FITZPATRICK TYPE-1-2",
        "short_name": "skin-tone-2",
        "category": "Component",
        "image": "1f3fb.png",
        "has_img_google": True,
        "has_img_twitter": True,
    },
]


def rgba():
    im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    im.paste((250, 0, 0, 128), (16, 16, 48, 48))  # half-transparent red square
    return im


def test_prepare_writes_captions_composites_and_holds_out(tmp_path):
    names = ["1f436.png", "1f44d.png", "1f44d-1f3fd.png", "1f3fb.png"]
    archives = {}
    for style, (_, _, folder) in emoji.PACKAGES.items():
        archives[style] = tmp_path / f"{style}.tgz"
        fake_archive(archives[style], folder, {n: rgba() for n in names}, META)
    manifest = emoji.prepare(archives, tmp_path / "set", size=32, heldout_fraction=0.0)
    out = tmp_path / "set"
    captions = sorted((out / "train").glob("*.txt"))
    texts = sorted(p.read_text().strip() for p in captions)
    assert texts == sorted(
        [
            "dog face, animals & nature, noto style",
            "dog face, animals & nature, twemoji style",
            "thumbs up, people & body, noto style",
            "thumbs up, medium skin tone, people & body, noto style",
            "thumbs up, medium skin tone, people & body, twemoji style",
        ]
    )  # components are skipped, and so is an image a style does not have
    assert manifest["images"] == {"train": 5, "heldout": 0}
    im = np.asarray(Image.open(out / "train" / "noto-1f436.png"))
    assert im.shape == (32, 32, 3) and tuple(im[0, 0]) == (255, 255, 255)  # background, not black fringes
    assert abs(int(im[16, 16, 0]) - 252) <= 2 and abs(int(im[16, 16, 1]) - 127) <= 2  # 50% red over white
    assert "CC-BY 4.0" in (out / "NOTICE.txt").read_text() and not (tmp_path / "set.partial").exists()
    all_out = emoji.prepare(archives, tmp_path / "held", size=32, heldout_fraction=0.9999)
    assert all_out["images"]["heldout"] >= 1 and all_out["images"]["train"] >= 1  # one style each is held out


def test_no_registry_or_a_damaged_archive_is_one_line_and_no_dataset(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("npm_config_registry", "http://127.0.0.1:9/")
    monkeypatch.setenv("npm_config_fetch_retries", "0")
    code = main(["emoji-data", "--out", str(tmp_path / "set"), "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert (
        code == 2 and err.startswith("error: npm pack emoji-datasource-google@16.0.0 failed") and err.count("\n") == 1
    )
    assert not (tmp_path / "set").exists() and not (tmp_path / "set.partial").exists()
    package = emoji.PACKAGES["noto"][0]
    (tmp_path / "cache" / f"{package}-{emoji.VERSION}.tgz").write_bytes(b"\x1f\x8b truncated")
    code = main(["emoji-data", "--out", str(tmp_path / "set"), "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and "damaged download" in err and not (tmp_path / "set").exists()
    assert not (tmp_path / "cache" / f"{package}-{emoji.VERSION}.tgz").exists()  # removed, so a rerun fetches it
    # an archive that passes the checksum but is cut short while unpacking
    good = tmp_path / "g.tgz"
    fake_archive(good, emoji.PACKAGES["noto"][2], {"1f436.png": rgba()}, META)
    cut = tmp_path / "cut.tgz"
    cut.write_bytes(good.read_bytes()[: os.path.getsize(good) // 2])
    with pytest.raises(emoji.LdmkitError, match="damaged archive"):
        emoji.prepare({"noto": cut}, tmp_path / "set2")
    assert not (tmp_path / "set2").exists() and not (tmp_path / "set2.partial").exists()


def small_set(tmp_path):
    """12 emoji in two styles, flat colours distinct per emoji and style, 30% held out."""
    meta = [
        {
            "name": f"THING {i}",
            "short_name": f"t{i}",
            "category": ["Animals", "Food"][i % 2],
            "image": f"{i}.png",
            "has_img_google": True,
            "has_img_twitter": True,
        }
        for i in range(12)
    ]
    archives = {}
    for style, (_, _, folder) in emoji.PACKAGES.items():
        archives[style] = tmp_path / f"{style}.tgz"
        images = {
            f"{i}.png": Image.new("RGBA", (64, 64), (20 * i, 100 if style == "noto" else 200, 50, 255))
            for i in range(12)
        }
        fake_archive(archives[style], folder, images, meta)
    emoji.prepare(archives, tmp_path / "set", size=64, heldout_fraction=0.3)
    return tmp_path / "set"


def test_eval_emoji_reports_every_measure(tmp_path, capsys):
    small_set(tmp_path)
    assert main(["init-model", str(tmp_path / "m.safetensors")]) == 0
    capsys.readouterr()
    argv = [
        "eval-emoji",
        "--model",
        str(tmp_path / "m.safetensors"),
        "--data",
        str(tmp_path / "set"),
        "--fd-samples",
        "4",
        "--cfg",
        "1,5",
        "--steps",
        "2",
        "--classifier-steps",
        "10",
        "-q",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert report["heldout_images"] > 0 and report["train_images"] + report["heldout_images"] == 24
    assert set(report["by_cfg"]) == {"1.0", "5.0"} and set(report["classifier"]) == {"style", "category"}
    real = report["real"]
    assert real["fd_train_vs_heldout"] >= 0 and real["fd_train_split"] >= 0
    assert 0 <= real["heldout_name_recall@1"] <= real["heldout_name_recall@5"] <= 1
    for row in report["by_cfg"].values():
        assert row["fd"] >= 0 and 0 <= row["recall@1"] <= row["recall@5"] <= 1
        assert 0 <= row["heldout_name_recall@1"] <= row["heldout_name_recall@5"] <= 1
        assert 0 <= row["heldout_style_accuracy"] <= 1 and row["median_nn_distance"] >= 0
    assert report["generated"]["prompts"] == 4 and report["generated"]["seconds_per_image"] > 0


class Replay:
    """A 'model' that draws exactly the real image of each caption it is given: the evaluation must then
    find every training prompt's own image, and give the held-out prompts the real images' ceilings."""

    def __init__(self, folder):
        self.by_caption = {}
        for split in ("train", "heldout"):
            for f in sorted((folder / split).glob("*.png")):
                self.by_caption[f.with_suffix(".txt").read_text().strip()] = Image.open(f).convert("RGB")
        self.model = type("M", (), {"config": type("C", (), {"image_size": 64})()})()

    def __call__(self, captions, **_):
        return type("R", (), {"images": [self.by_caption[c] for c in captions]})()


def test_eval_emoji_on_real_images_gives_the_real_ceilings(tmp_path):
    from ldmkit.evaluation.emoji_eval import evaluate_emoji

    folder = small_set(tmp_path)
    report = evaluate_emoji(Replay(folder), folder, fd_samples=6, cfgs=(1.0,), classifier_steps=30)
    row, real = report["by_cfg"]["1.0"], report["real"]
    assert row["recall@1"] == 1.0 and row["median_nn_distance"] == 0.0
    assert row["heldout_name_recall@1"] == real["heldout_name_recall@1"]
    assert row["heldout_name_recall@5"] == real["heldout_name_recall@5"]
    assert row["heldout_style_accuracy"] == report["classifier"]["style"]["heldout_accuracy"]
