"""Training under hostile input: images declaring huge sizes (decompression bombs) in a folder or a tar shard
are refused before they are decoded, skipped and counted like unreadable ones, by every task and in every
task's log; a run interrupted and resumed writes exactly the files an uninterrupted run writes."""

import csv
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from conftest import ROOT, config_file, losses
from ldmkit.cli import main


def png(width: int, height: int, pixels: bytes | None = None) -> bytes:
    """A PNG whose header declares width x height pixels: 8-bit RGB with a few bytes of image data
    (a bomb's header with nothing behind it), or, given `pixels` (the filtered rows), 1-bit grey
    with those rows (a valid image that compresses to almost nothing)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    depth, colour = (8, 2) if pixels is None else (1, 0)
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64 if pixels is None else pixels, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def blank_png(side: int) -> bytes:
    """A valid, all-black 1-bit PNG of side x side pixels, a few kilobytes on disk."""
    row = b"\0" * (1 + (side + 7) // 8)  # filter byte, then the packed bits
    return png(side, side, row * side)


def image_folder(folder: Path, bombs: dict[str, bytes]) -> Path:
    """Eight small captioned images, some of them replaced by `bombs` (file name -> bytes)."""
    folder.mkdir()
    for i in range(8):
        Image.new("RGB", (40, 30), (30 * i, 100, 200)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"picture {i}")
    for name, data in bombs.items():
        (folder / name).write_bytes(data)
    return folder


def short_run(tmp_path: Path, config: str, folder: Path, **changes) -> Path:
    cfg = config_file(tmp_path, config, tmp_path / "run", data={"kind": "folder", "path": str(folder), "size": 32})
    data = yaml.safe_load(cfg.read_text())
    data["run"].update(steps=2, eval_every=100, sample_every=100)
    data.update(changes)
    cfg.write_text(yaml.safe_dump(data))
    return cfg


def log_columns(run: Path) -> list[str]:
    with open(run / "loss.csv", newline="") as f:
        return next(csv.reader(f))


# --- decompression bombs ------------------------------------------------------------------------------


def test_bombs_in_an_image_folder_are_skipped_and_counted_by_the_autoencoder(tmp_path, capsys):
    folder = image_folder(
        tmp_path / "imgs",
        {"3.png": png(100_000, 100_000), "5.png": png(13_000, 13_000)},  # beyond Pillow's own guard; within it
    )
    cfg = short_run(tmp_path, "test-autoencoder.yaml", folder)
    assert main(["train-autoencoder", "--config", str(cfg), "-q"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for name in ("3.png", "5.png"):
        line = next(line for line in err.splitlines() if name in line)
        assert "warning: skipping unreadable image" in line and "pixels" in line, line
    assert losses(tmp_path / "run", "skipped") == [2.0, 2.0]  # both bombs are in each 8-image batch


@pytest.mark.parametrize("latent_cache", [True, False])
def test_a_bomb_in_an_ldm_folder_is_skipped_and_counted_in_its_log(tmp_path, autoencoder, capsys, latent_cache):
    """With the latent cache, an unreadable image is not trained on (as a black one) but left out of
    each batch, as without it; in the validation folder it is left out of the validation loss."""
    folder = image_folder(tmp_path / "imgs", {"6.png": png(100_000, 100_000)})
    cfg = short_run(
        tmp_path,
        "test-ldm.yaml",
        folder,
        autoencoder=str(autoencoder / "autoencoder.safetensors"),
        latent_cache=latent_cache,
        val={"kind": "folder", "path": str(folder), "size": 32},  # validated on at the last step
    )
    assert main(["train", "--config", str(cfg), "-q"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "6.png" in err
    assert log_columns(tmp_path / "run") == ["step", "loss", "lr", "skipped"]
    assert losses(tmp_path / "run", "skipped") == [1.0, 1.0]
    assert (tmp_path / "run" / "model.safetensors").exists()
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert metrics["step"] == 2 and metrics["val_loss"] > 0


def test_an_image_over_the_training_pixel_limit_is_refused_before_decoding(tmp_path, caplog):
    """A valid image of 8200 x 8200 pixels (67 MP, below Pillow's own guard; 200 MB once converted to RGB)
    is refused from its header alone: the warning gives the declared size, not a decoding error."""
    from ldmkit.data.images import DataConfig, ImageFolder

    folder = image_folder(tmp_path / "imgs", {"2.png": blank_png(8200)})
    data = ImageFolder(DataConfig(kind="folder", path=str(folder), size=32))
    assert data.load(2) is None and data.skipped == 1
    assert "8200x8200 pixels" in caplog.text
    assert data.load(1)[0].shape == (3, 32, 32) and data.skipped == 1


def test_a_bomb_in_a_tar_shard_is_skipped_and_counted(tmp_path, caplog):
    from ldmkit.data.images import DataConfig, ShardData

    plain = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(plain, format="PNG")
    members = {"0.png": plain.getvalue(), "1.png": png(100_000, 100_000), "2.png": blank_png(8200)}
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        for name, data in members.items():
            for member, payload in ((name, data), (name.replace(".png", ".txt"), f"sample {name}".encode())):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    shards = ShardData(DataConfig(kind="shards", path=str(tmp_path / "shard-0.tar"), size=32))
    assert len(shards) == 3
    assert shards.load(0)[0].shape == (3, 32, 32)
    assert shards.load(1) is None and shards.load(2) is None and shards.skipped == 2
    assert "8200x8200 pixels" in caplog.text


# --- the latent tasks' log ------------------------------------------------------------------------------


def test_the_latent_tasks_log_skipped_after_their_own_columns(autoencoder):
    """The same `skipped` column as the autoencoder's, added at the end of the LDM's columns."""
    from ldmkit.config import from_dict
    from ldmkit.training.ldm import LDMTask, LDMTrainConfig

    data = yaml.safe_load((ROOT / "configs" / "test-ldm.yaml").read_text())
    data.update(autoencoder=str(autoencoder / "autoencoder.safetensors"), latent_cache=False)
    values = LDMTask(from_dict(LDMTrainConfig, data)).train_step(0, range(8), 1e-4)
    assert list(values) == ["loss", "lr", "skipped"] and values["skipped"] == 0.0


# --- resume ---------------------------------------------------------------------------------------------


class Interrupted(Exception):
    """What a kill looks like to the test: the run stops in the middle, between checkpoints."""


class Counter:
    """A task whose logged values and metrics are functions of its state (a step count), so that an
    interrupted and resumed run must reproduce an uninterrupted one to the byte."""

    def __init__(self, stop_at: int | None = None, columns=("loss", "lr", "skipped")):
        self.n, self.stop_at, self.columns = 0, stop_at, columns

    def state_dict(self):
        return {"n": torch.tensor(self.n)}

    def load_state_dict(self, d):
        self.n = int(d["n"])

    def train_step(self, step, indices, lr):
        if step == self.stop_at:
            raise Interrupted
        self.n += 1
        return {
            k: v for k, v in {"loss": 1 / self.n, "lr": lr, "skipped": float(step % 3)}.items() if k in self.columns
        }

    def evaluate(self, step):
        return {"val_loss": round(1 / self.n, 6), "score": -abs(self.n - 7)}

    def sample(self, step, folder):
        pass

    def finish(self, folder):
        pass


def run_config(folder: Path):
    from ldmkit.training.loop import RunConfig

    return RunConfig(dir=str(folder), steps=12, warmup=4, eval_every=3, ckpt_every=4, sample_every=100)


def interrupted_then_resumed(folder: Path, stop_at: int, between=None, columns=("loss", "lr", "skipped")) -> None:
    """Run until train_step(stop_at), `between(folder)`, then resume (logging loss, lr and skipped)."""
    from ldmkit.training.loop import Trainer

    with pytest.raises(Interrupted):
        Trainer(Counter(stop_at, columns), run_config(folder)).fit(progress=False)
    if between:
        between(folder)
    Trainer(Counter(), run_config(folder), resume=True).fit(progress=False)


@pytest.mark.parametrize("stop_at", [10, 9, 8])
def test_a_resumed_run_writes_the_files_of_an_uninterrupted_one(tmp_path, stop_at):
    """Stopped after evaluations the last checkpoint does not hold (steps 9, 8 and 10 with checkpoints
    every 4 and evaluations every 3), then resumed: the same rows, once each, with \\n line ends."""
    from ldmkit.training.loop import Trainer

    Trainer(Counter(), run_config(tmp_path / "whole")).fit(progress=False)
    interrupted_then_resumed(tmp_path / "resumed", stop_at)
    for name in ("loss.csv", "metrics.jsonl"):
        whole, resumed = ((tmp_path / run / name).read_bytes() for run in ("whole", "resumed"))
        assert b"\r" not in whole and resumed == whole, name
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6, 9, 12]
    assert [int(s) for s in losses(tmp_path / "resumed", "step")] == list(range(12))


def test_rows_cut_short_by_a_kill_are_dropped_on_resume(tmp_path):
    """A kill in the middle of a write leaves half a row: the resumed run drops it, and its files are
    still an uninterrupted run's."""
    from ldmkit.training.loop import Trainer

    def cut_short(folder: Path):
        with open(folder / "loss.csv", "a", newline="") as f:
            f.write("1")  # the start of a row "10,0.1,..."
        with open(folder / "metrics.jsonl", "a") as f:
            f.write('{"step": 1')

    Trainer(Counter(), run_config(tmp_path / "whole")).fit(progress=False)
    interrupted_then_resumed(tmp_path / "resumed", 10, cut_short)
    for name in ("loss.csv", "metrics.jsonl"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_a_resumed_run_that_logs_a_new_column_keeps_the_log_one_table(tmp_path):
    """A run begun by a version that logged fewer columns, resumed by one that logs more: one header
    with every column, the earlier rows blank in the new one."""
    interrupted_then_resumed(tmp_path / "run", 10, columns=("loss", "lr"))
    with open(tmp_path / "run" / "loss.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "loss", "lr", "skipped"]
    assert all(len(r) == 4 for r in rows)
    assert [r[3] for r in rows[1:9]] == [""] * 8 and rows[9][3] == "2"


def test_an_interrupted_autoencoder_run_resumes_to_the_same_logs(tmp_path):
    """The real task, stopped between checkpoints after an evaluation and resumed in the same process:
    the same log rows and metrics rows as an uninterrupted run, once each."""
    from ldmkit.config import from_dict
    from ldmkit.training.autoencoder import AutoencoderTask, AutoencoderTrainConfig
    from ldmkit.training.loop import Trainer

    data = yaml.safe_load((ROOT / "configs" / "test-autoencoder.yaml").read_text())
    data["run"].update(steps=7, eval_every=3, ckpt_every=4, sample_every=100, threads=1)

    def trainer(name: str, resume: bool = False, stop_at: int | None = None) -> Trainer:
        data["run"]["dir"] = str(tmp_path / name)
        task = AutoencoderTask(from_dict(AutoencoderTrainConfig, data))
        if stop_at is not None:
            step_of = task.train_step

            def stopping(step, *args):
                if step == stop_at:
                    raise Interrupted
                return step_of(step, *args)

            task.train_step = stopping
        return Trainer(task, task.config.run, resume=resume)

    trainer("whole").fit(progress=False)
    with pytest.raises(Interrupted):
        trainer("resumed", stop_at=6).fit(progress=False)  # evaluated at step 3 and 6, checkpointed at 4
    trainer("resumed", resume=True).fit(progress=False)
    runs = [tmp_path / "whole", tmp_path / "resumed"]
    whole, resumed = ([json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()] for r in runs)
    assert [m["step"] for m in resumed] == [m["step"] for m in whole] == [3, 6, 7]
    assert all(abs(a["psnr"] - b["psnr"]) <= 1e-3 for a, b in zip(whole, resumed))
    assert b"\r" not in (runs[1] / "loss.csv").read_bytes()
    assert log_columns(runs[1]) == log_columns(runs[0])
    assert losses(runs[1], "step") == losses(runs[0], "step") == list(range(7))
    assert losses(runs[1]) == pytest.approx(losses(runs[0]), rel=1e-5)


def test_an_ldm_folder_of_only_bombs_fails_in_one_line(tmp_path, autoencoder, capsys):
    """Nothing readable to measure the latent scale on: one error line, not a traceback."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        (folder / f"{i}.png").write_bytes(png(100_000, 100_000))
        (folder / f"{i}.txt").write_text("a bomb")
    cfg = short_run(tmp_path, "test-ldm.yaml", folder, autoencoder=str(autoencoder / "autoencoder.safetensors"))
    assert main(["train", "--config", str(cfg), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: data: no readable image") and "Traceback" not in "\n".join(err), err
