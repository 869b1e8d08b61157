"""Training both stages: losses fall, the discriminator really trains, resume after SIGKILL is exact,
a NaN stops the run with the last good checkpoint intact, bad data and configs fail clearly."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import ROOT, config_file, losses
from ldmkit.cli import main


def test_autoencoder_run_writes_everything_and_improves(autoencoder):
    names = {p.name for p in autoencoder.iterdir()}
    assert {"autoencoder.safetensors", "loss.csv", "loss.png", "metrics.jsonl", "samples", "checkpoints"} <= names
    metrics = [yaml.safe_load(line) for line in (autoencoder / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["psnr"] > metrics[0]["psnr"]
    rec = losses(autoencoder, "rec")
    assert np.mean(rec[-4:]) < np.mean(rec[:4])
    assert (autoencoder / "checkpoints" / "best.pt").exists()
    assert len(list((autoencoder / "checkpoints").glob("step-*.pt"))) == 2  # keep_last


def test_discriminator_trains_after_disc_start_and_not_before():
    from ldmkit.config import from_dict
    from ldmkit.training.autoencoder import AutoencoderTask, AutoencoderTrainConfig

    data = yaml.safe_load((ROOT / "configs" / "test-autoencoder.yaml").read_text())
    task = AutoencoderTask(from_dict(AutoencoderTrainConfig, data))
    before = {k: v.clone() for k, v in task.disc.state_dict().items()}
    calls = []
    task.disc.register_forward_hook(lambda *_: calls.append(1))
    values = task.train_step(0, range(0, 8), 2e-4)  # disc_start is 4
    assert all(torch.equal(before[k], v) for k, v in task.disc.state_dict().items())
    assert values["d_weight"] == 0.0 and values["d_loss"] == 0.0
    assert calls == []  # before disc_start the discriminator is not even run
    values = task.train_step(4, range(32, 40), 2e-4)
    assert len(calls) == 3  # the generator's pass, then real and reconstructed for the discriminator
    changed = [k for k, v in task.disc.state_dict().items() if not torch.equal(before[k], v)]
    assert len(changed) == len(before)  # every discriminator tensor moved
    assert values["d_weight"] > 0 and values["disc_on"] == 1.0


def test_bf16_training_follows_fp32():
    """run.precision bf16 (autocast, channels-last): the same losses and gradient directions as fp32
    from the same weights and batch, before and after the discriminator starts."""
    from ldmkit.config import from_dict
    from ldmkit.training.autoencoder import AutoencoderTask, AutoencoderTrainConfig

    data = yaml.safe_load((ROOT / "configs" / "test-autoencoder.yaml").read_text())
    tasks = []
    for precision in ("fp32", "bf16"):
        data["run"]["precision"] = precision
        tasks.append(AutoencoderTask(from_dict(AutoencoderTrainConfig, data)))
    exact, fast = tasks
    fast.load_state_dict(exact.state_dict())
    for step in (0, 4):  # disc_start is 4
        a, b = (
            exact.train_step(step, range(8 * step, 8 * step + 8), 2e-4),
            fast.train_step(step, range(8 * step, 8 * step + 8), 2e-4),
        )
        assert abs(a["nll"] - b["nll"]) <= 0.02 * a["nll"], (step, a["nll"], b["nll"])
        ga = torch.cat([p.grad.flatten() for p in exact.vae.parameters()])
        gb = torch.cat([p.grad.flatten() for p in fast.vae.parameters()])
        assert torch.nn.functional.cosine_similarity(ga, gb, dim=0) > 0.99, step
    assert fast.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not torch.is_autocast_enabled("cpu")


# One thread and no MKL "dynamic" mode: float results must not depend on how busy the machine is.
QUIET_ENV = {
    **os.environ,
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MKL_DYNAMIC": "FALSE",
}


def run_killed_then_resumed(cmd: list[str], run_dir: Path, kill_after_rows: int, sig=signal.SIGKILL):
    """Start the run, send `sig` once the loss log has more than kill_after_rows rows, then resume it.
    SIGKILL leaves the last periodic checkpoint; SIGTERM stops the run after the step under way, with a
    checkpoint at that step (exit 143 and one line saying so)."""
    env = QUIET_ENV
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    log = run_dir / "loss.csv"
    while time.time() < deadline:
        if log.exists() and len(log.read_text().splitlines()) > kill_after_rows:
            break
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed")
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate()
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*.pt"))
    assert checkpoints, "no checkpoint before the kill"
    if sig == signal.SIGTERM:
        rows = len(log.read_text().splitlines()) - 1  # after the header: one per step done
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert err.strip().splitlines()[-1].startswith(f"error: stopped by SIGTERM at step {rows}: checkpoint"), err
        assert checkpoints[-1].name == f"step-{rows:08d}.pt"  # nothing trained is lost
    assert subprocess.run(cmd + ["--resume"], env=env, capture_output=True).returncode == 0


@pytest.mark.parametrize(
    "stage, sig", [("autoencoder", signal.SIGKILL), ("ldm", signal.SIGKILL), ("autoencoder", signal.SIGTERM)]
)
def test_resume_after_a_kill_is_exact(tmp_path, autoencoder, stage, sig):
    steps = 16
    if stage == "autoencoder":
        name, command = "test-autoencoder.yaml", "train-autoencoder"
        extra = {
            "run": {
                **yaml.safe_load((ROOT / "configs" / name).read_text())["run"],
                "steps": steps,
                "eval_every": 100,
                "sample_every": 100,
            }
        }
    else:
        name, command = "test-ldm.yaml", "train"
        extra = {
            "autoencoder": str(autoencoder / "autoencoder.safetensors"),
            "run": {
                **yaml.safe_load((ROOT / "configs" / name).read_text())["run"],
                "steps": steps,
                "eval_every": 100,
                "sample_every": 100,
            },
        }
    whole = config_file(tmp_path, name, tmp_path / "whole", **extra)
    killed = config_file(tmp_path, name, tmp_path / "killed", **extra)
    for cfg in (whole, killed):  # run.dir was overwritten by extra["run"]: set it back
        data = yaml.safe_load(cfg.read_text())
        data["run"]["dir"] = str(tmp_path / cfg.stem)
        cfg.write_text(yaml.safe_dump(data))
    whole_cmd = [sys.executable, "-m", "ldmkit", command, "--config", str(whole), "-q"]
    assert subprocess.run(whole_cmd, env=QUIET_ENV, capture_output=True).returncode == 0
    run_killed_then_resumed(
        [sys.executable, "-m", "ldmkit", command, "--config", str(killed), "-q"],
        tmp_path / "killed",
        kill_after_rows=10 if sig == signal.SIGKILL else 6,  # SIGTERM: between checkpoints (every 4 steps)
        sig=sig,
    )
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "killed")
    assert len(a) == len(b) == steps
    assert np.allclose(a, b, rtol=1e-6, atol=0), np.abs(np.array(a) - np.array(b)).max()
    # the same files, line ends and all: no \r\n rows after the resume, no evaluation row written twice
    for run in ("whole", "killed"):
        assert b"\r" not in (tmp_path / run / "loss.csv").read_bytes(), run
    evaluated = [
        [yaml.safe_load(line)["step"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("whole", "killed")
    ]
    assert evaluated[0] == evaluated[1] == [steps]


def test_controlnet_run_trains_only_the_controlnet(tmp_path, base_model, capsys):
    from safetensors.torch import load_file

    from ldmkit.checkpoints.controlnet_files import load_controlnet
    from ldmkit.checkpoints.single_file import load_model

    cfg = config_file(tmp_path, "test-controlnet.yaml", tmp_path / "cn", base=str(base_model))
    before = load_file(str(base_model))
    assert main(["train-controlnet", "--config", str(cfg), "-q"]) == 0
    run = tmp_path / "cn"
    assert (run / "samples" / "samples-00000008.png").exists() and (run / "loss.png").exists()
    assert len(losses(run)) == 8
    base = load_model(base_model)
    net = load_controlnet(run / "controlnet.safetensors", base=base.unet.config)
    assert net.control_config.downsample_factor == base.vae.config.downsample_factor
    assert all(z[0].weight.abs().max() > 0 for z in net.zero_convs)  # the zero convolutions learned
    after = load_file(str(base_model))
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base file is untouched
    capsys.readouterr()
    code = main(
        [
            "generate",
            "a red circle",
            "--model",
            str(base_model),
            "--controlnet",
            str(run / "controlnet.safetensors"),
            "--control",
            "canny:" + str(run / "samples" / "samples-00000008.png"),
            "--steps",
            "2",
            "-q",
            "-o",
            str(tmp_path / "c.png"),
        ]
    )
    assert code == 0, capsys.readouterr().err


def test_ldm_run_and_its_model(tmp_path, autoencoder, capsys):
    cfg = config_file(
        tmp_path, "test-ldm.yaml", tmp_path / "ldm", autoencoder=str(autoencoder / "autoencoder.safetensors")
    )
    assert main(["train", "--config", str(cfg), "-q"]) == 0
    run = tmp_path / "ldm"
    loss = losses(run)
    assert np.mean(loss[-3:]) < np.mean(loss[:3])
    assert (run / "samples" / "samples-00000010.png").exists() and (run / "loss.png").exists()
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "a red circle",
                "--model",
                str(run / "model.safetensors"),
                "--steps",
                "3",
                "-q",
                "-o",
                str(tmp_path / "x.png"),
            ]
        )
        == 0
    )
    assert Image.open(tmp_path / "x.png").size == (32, 32)
    # Fine-tuning starts from that model.
    tuned = config_file(
        tmp_path,
        "test-ldm.yaml",
        tmp_path / "tuned",
        autoencoder=None,
        unet=None,
        init_from=str(run / "model.safetensors"),
    )
    data = yaml.safe_load(tuned.read_text())
    data["run"]["steps"] = 2
    tuned.write_text(yaml.safe_dump(data))
    assert main(["train", "--config", str(tuned), "-q"]) == 0
    assert (tmp_path / "tuned" / "model.safetensors").exists()


def test_ldm_bf16_loss_follows_fp32_and_validates_on_a_held_out_folder(tmp_path, autoencoder):
    from ldmkit.config import from_dict
    from ldmkit.data.images import DataConfig, ShapesData, load_batch
    from ldmkit.images import tensor_to_pil
    from ldmkit.training.ldm import LDMTask, LDMTrainConfig

    held = ShapesData(DataConfig(split="val", n=8, size=32))
    for i in range(8):
        image, caption = held.load(i)
        tensor_to_pil(image[None])[0].save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(caption)
    data = yaml.safe_load((ROOT / "configs" / "test-ldm.yaml").read_text())
    data.update(
        autoencoder=str(autoencoder / "autoencoder.safetensors"),
        val={"kind": "folder", "path": str(tmp_path), "size": 32},
    )
    tasks = []
    for precision in ("fp32", "bf16"):
        data["run"]["precision"] = precision
        tasks.append(LDMTask(from_dict(LDMTrainConfig, data)))
    exact, fast = tasks
    exact.measure_scale()
    fast.load_state_dict(exact.state_dict())
    images, captions, gs = load_batch(exact.data, exact.order, range(8), False, 0)
    items = [exact.order.item(g) for g in gs]
    a, b = (t.loss(images, items, captions, gs).item() for t in (exact, fast))
    assert abs(a - b) <= 0.03 * a, (a, b)
    va, vb = exact.evaluate(0)["val_loss"], fast.evaluate(0)["val_loss"]
    assert 0 < va and abs(va - vb) <= 0.03 * va, (va, vb)
    assert not torch.is_autocast_enabled("cpu")


def test_frozen_text_states_are_encoded_once_and_kept_within_a_bound(autoencoder, monkeypatch):
    from ldmkit.config import from_dict
    from ldmkit.models.prompts import encode_prompts
    from ldmkit.training import latent_task as ldm
    from ldmkit.training.ldm import LDMTask, LDMTrainConfig

    data = yaml.safe_load((ROOT / "configs" / "test-ldm.yaml").read_text())
    data["autoencoder"] = str(autoencoder / "autoencoder.safetensors")
    task = LDMTask(from_dict(LDMTrainConfig, data))
    text = task.model.text_encoder
    calls = []
    encode_ids = text.encode_ids
    monkeypatch.setattr(text, "encode_ids", lambda ids, mask: calls.append(len(ids)) or encode_ids(ids, mask))
    captions = ["a red circle", "two blue squares", "a red circle"]
    with torch.no_grad():  # the same batch the memo encodes: a batch's size changes float rounding
        direct = encode_prompts(text, captions[:2], None, mode="truncate")[0][[0, 1, 0]]
    calls.clear()
    first, again = task.encode_text(captions), task.encode_text(captions[::-1])
    assert calls == [2]  # the two distinct captions, once
    assert (first - direct).abs().max() <= 1e-6 and torch.equal(again, first.flip(0))
    per_caption = direct[0].numel() * direct.element_size()
    monkeypatch.setattr(ldm, "TEXT_CACHE_MB", (len(task.text_memo) + 1) * per_caption / 2**20)
    more = task.encode_text(["a green star", "a yellow triangle"])
    assert len(task.text_memo) == 4 and "a yellow triangle" not in task.text_memo  # full: encoded, not kept
    with torch.no_grad():
        fresh = encode_prompts(text, ["a green star", "a yellow triangle"], None, mode="truncate")[0]
    assert (more - fresh).abs().max() <= 1e-6


def test_ema_follows_its_equation_and_fused_adamw_the_reference_update(autoencoder):
    """EMA against its equation in float64; the fused AdamW against torch's reference (for-loop)
    implementation on the same batches: the same weights up to float rounding."""
    from ldmkit.config import from_dict
    from ldmkit.training.ldm import LDMTask, LDMTrainConfig

    data = yaml.safe_load((ROOT / "configs" / "test-ldm.yaml").read_text())
    data["autoencoder"] = str(autoencoder / "autoencoder.safetensors")
    fused, reference = (LDMTask(from_dict(LDMTrainConfig, data)) for _ in range(2))
    assert fused.opt.defaults["fused"] is True
    reference.opt = torch.optim.AdamW(
        reference.trainable.parameters(), lr=fused.config.run.lr, weight_decay=fused.config.run.weight_decay
    )
    expected = {k: v.double() for k, v in fused.ema.items()}
    B = fused.config.run.batch_size
    for step in range(3):
        for task in (fused, reference):
            task.train_step(step, range(step * B, (step + 1) * B), fused.config.run.lr)
        decay = min(fused.config.ema_decay, (1 + step) / (10 + step))
        for k, v in fused.trainable.state_dict().items():
            expected[k] = decay * expected[k] + (1 - decay) * v.double() if v.is_floating_point() else v.double()
        for k, v in fused.ema.items():
            assert (v.double() - expected[k]).abs().max() <= 1e-6 * (1 + expected[k].abs().max()), k
    ours, theirs = fused.trainable.state_dict(), reference.trainable.state_dict()
    moved = [k for k, v in ours.items() if v.is_floating_point() and not torch.equal(v, fused.ema[k])]
    assert moved  # the weights did change, so the comparison below compares updates
    for k in ours:
        assert (ours[k] - theirs[k]).abs().max() <= 1e-5 * (1 + theirs[k].abs().max()), k


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    from ldmkit.errors import TrainingError
    from ldmkit.training.loop import RunConfig, Trainer

    class Exploding:
        def __init__(self):
            self.w = torch.zeros(3)

        def state_dict(self):
            return {"w": self.w}

        def load_state_dict(self, d):
            self.w = d["w"]

        def train_step(self, step, indices, lr):
            self.w += 1
            return {"loss": float("nan") if step == 5 else 1.0 / (step + 1)}

        def evaluate(self, step):
            return {}

        def sample(self, step, folder):
            pass

        def finish(self, folder):
            pass

    run = RunConfig(dir=str(tmp_path / "run"), steps=10, ckpt_every=4, eval_every=100, sample_every=100)
    trainer = Trainer(Exploding(), run)
    with pytest.raises(TrainingError, match="loss is nan at step 5.*step-00000004.pt"):
        trainer.fit(progress=False)
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-00000004.pt"]
    state = torch.load(tmp_path / "run" / "checkpoints" / ckpts[0], weights_only=True)
    assert state["step"] == 4 and torch.equal(state["task"]["w"], torch.full((3,), 4.0))


def one_line_error(capsys, argv, *needles):
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def test_bad_data_and_configs(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    cfg = config_file(
        tmp_path, "test-autoencoder.yaml", tmp_path / "r1", data={"kind": "folder", "path": str(tmp_path / "empty")}
    )
    one_line_error(capsys, ["train-autoencoder", "--config", cfg], "no images")
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    cfg = config_file(
        tmp_path, "test-autoencoder.yaml", tmp_path / "r2", data={"kind": "folder", "path": str(tmp_path / "imgs")}
    )
    one_line_error(capsys, ["train-autoencoder", "--config", cfg], "a.png", "no caption file a.txt")
    cfg = config_file(
        tmp_path, "test-autoencoder.yaml", tmp_path / "r3", model={"channels": [16, 32], "num_res_block": 1}
    )
    one_line_error(
        capsys, ["train-autoencoder", "--config", cfg], "unknown AutoencoderConfig option(s) ['num_res_block']"
    )
    cfg = config_file(tmp_path, "test-autoencoder.yaml", tmp_path / "r4", loss={"disc_start": "soon"})
    one_line_error(capsys, ["train-autoencoder", "--config", cfg], "loss.disc_start: expected int, got 'soon'")
    one_line_error(capsys, ["train-autoencoder", "--config", tmp_path / "missing.yaml"], "no such config file")
    fresh = config_file(tmp_path, "test-autoencoder.yaml", tmp_path / "r5")
    one_line_error(capsys, ["train-autoencoder", "--config", fresh, "--resume"], "--resume: no checkpoint in")
    one_line_error(capsys, ["train-autoencoder", "--config", fresh, "--threads", "0"], "--threads 0: allowed: 1 or")
    one_line_error(capsys, ["train-autoencoder", "--config", fresh, "--steps", "0"], "--steps 0: allowed: 1 or more")


def test_a_finished_run_goes_on_with_more_steps(autoencoder, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(autoencoder, run)
    cfg = config_file(tmp_path, "test-autoencoder.yaml", run)  # 12 steps, a checkpoint every 4
    one_line_error(capsys, ["train-autoencoder", "--config", cfg, "--resume", "--steps", "8"], "already at step 12")
    assert main(["train-autoencoder", "--config", str(cfg), "--resume", "--steps", "16", "-q"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 16
    assert len(losses(run)) == 16  # one row per step, the first 12 kept


def test_a_finished_run_is_not_overwritten(autoencoder, tmp_path, capsys):
    cfg = config_file(tmp_path, "test-autoencoder.yaml", autoencoder)
    one_line_error(capsys, ["train-autoencoder", "--config", cfg], "already holds checkpoints", "--resume")


def test_unreadable_images_are_skipped_and_counted(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(8):
        Image.new("RGB", (40, 30), (30 * i, 100, 200)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"picture {i}")
    (folder / "3.png").write_bytes(b"broken")
    cfg = config_file(
        tmp_path, "test-autoencoder.yaml", tmp_path / "run", data={"kind": "folder", "path": str(folder), "size": 32}
    )
    data = yaml.safe_load(cfg.read_text())
    data["run"]["steps"] = 2
    cfg.write_text(yaml.safe_dump(data))
    assert main(["train-autoencoder", "--config", str(cfg), "-q"]) == 0
    err = capsys.readouterr().err
    assert "warning: skipping unreadable image" in err and "3.png" in err
    assert sum(losses(tmp_path / "run", "skipped")) == 2  # the broken image is in both 8-image batches


def test_shards_and_folders_give_the_same_samples(tmp_path):
    from ldmkit.data.images import DataConfig, open_dataset
    from ldmkit.data.shapes_export import export

    export(tmp_path / "folder", "train", 20, fmt="folder")
    export(tmp_path / "shards", "train", 20, fmt="shards", shard_size=8)
    folder = open_dataset(DataConfig(kind="folder", path=str(tmp_path / "folder")))
    shards = open_dataset(DataConfig(kind="shards", path=str(tmp_path / "shards")))
    shapes = open_dataset(DataConfig(kind="shapes", n=20))
    assert len(folder) == len(shards) == 20
    for i in (0, 7, 8, 19):
        a, b, c = folder.load(i), shards.load(i), shapes.load(i)
        assert a[1] == b[1] == c[1]
        assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0])


def test_fitted_latent_preview_looks_like_the_decoded_image(autoencoder, tmp_path):
    from ldmkit.config import from_dict
    from ldmkit.data.shapes import render, sample_scene
    from ldmkit.images import latent_preview, pil_to_tensor
    from ldmkit.training.ldm import LDMTask, LDMTrainConfig

    data = yaml.safe_load((ROOT / "configs" / "test-ldm.yaml").read_text())
    data["autoencoder"] = str(autoencoder / "autoencoder.safetensors")
    data["run"]["dir"] = str(tmp_path / "run")
    task = LDMTask(from_dict(LDMTrainConfig, data))
    task.measure_scale()
    table = task.fit_latent_rgb()
    assert len(table) == 5 and all(len(row) == 3 for row in table)
    image = render(sample_scene("val", 0, size=32))
    with torch.no_grad():
        z = task.model.vae.scale(task.model.vae.encode(pil_to_tensor(image, 32, 32)).mode())
    preview = np.asarray(latent_preview(z, table)[0], dtype=np.float32)
    small = np.asarray(image.resize((16, 16), Image.BOX), dtype=np.float32)
    assert np.abs(preview - small).mean() < np.abs(small - small.mean((0, 1))).mean()  # better than flat colour


def test_every_committed_config_parses():
    from ldmkit.config import load_yaml
    from ldmkit.training.autoencoder import AutoencoderTrainConfig
    from ldmkit.training.controlnet import ControlNetTrainConfig
    from ldmkit.training.embedding import EmbeddingTrainConfig
    from ldmkit.training.image_tower import ImageTowerTrainConfig
    from ldmkit.training.ip_adapter import IPAdapterTrainConfig
    from ldmkit.training.lcm import DistillConfig
    from ldmkit.training.ldm import LDMTrainConfig
    from ldmkit.training.lora import LoraTrainConfig
    from ldmkit.training.text_tower import TextTowerTrainConfig
    from ldmkit.training.tiny_autoencoder import TinyDistillConfig
    from ldmkit.training.video_ldm import VideoLDMTrainConfig

    kinds = {
        "autoencoder": AutoencoderTrainConfig,
        "ldm": LDMTrainConfig,
        "controlnet": ControlNetTrainConfig,
        "lcm": DistillConfig,
        "lora": LoraTrainConfig,
        "embedding": EmbeddingTrainConfig,
        "tiny": TinyDistillConfig,
        "encoder": ImageTowerTrainConfig,
        "adapter": IPAdapterTrainConfig,
        "video": VideoLDMTrainConfig,
        "text": TextTowerTrainConfig,
    }
    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(files) >= 8
    for f in files:
        kind = f.stem.split("-")[-1]
        assert kind in kinds, f"{f.name}: name it <what>-<kind>.yaml, kind one of {sorted(kinds)}"
        load_yaml(kinds[kind], f)


def test_every_model_a_config_builds_on_may_be_a_path_under_home_or_a_bundled_name():
    """A config's teacher / base / text_from expands a leading ~ as run.dir does (a tiny decoder distilled
    from ~/runs/.../model.safetensors was refused as no such file); a bundled name passes unchanged."""
    from ldmkit.config import from_dict
    from ldmkit.training.image_tower import ImageTowerTrainConfig
    from ldmkit.training.text_tower import TextTowerTrainConfig
    from ldmkit.training.tiny_autoencoder import TinyDistillConfig
    from ldmkit.training.video_ldm import VideoLDMTrainConfig

    home = str(Path.home() / "runs" / "m.safetensors")
    for cls, name in [
        (TinyDistillConfig, "teacher"),
        (VideoLDMTrainConfig, "base"),
        (ImageTowerTrainConfig, "text_from"),
        (TextTowerTrainConfig, "model"),
    ]:
        assert getattr(from_dict(cls, {name: "~/runs/m.safetensors"}), name) == home
        assert getattr(from_dict(cls, {name: "shapes"}), name) == "shapes"


def test_a_config_refuses_condition_dropout_outside_0_to_1():
    """cond_dropout is a probability below 1 (at 1 no step sees a caption) in every latent task's config."""
    from ldmkit.config import from_dict
    from ldmkit.errors import ConfigError
    from ldmkit.training.controlnet import ControlNetTrainConfig
    from ldmkit.training.embedding import EmbeddingTrainConfig
    from ldmkit.training.ldm import LDMTrainConfig
    from ldmkit.training.lora import LoraTrainConfig

    required = {
        EmbeddingTrainConfig: {"base": "base.safetensors"},
        LoraTrainConfig: {"base": "base.safetensors"},
        LDMTrainConfig: {"init_from": "base.safetensors"},
        ControlNetTrainConfig: {"base": "base.safetensors"},
    }
    for cls, data in required.items():
        for p in (1.5, -0.1, 1.0):
            with pytest.raises(ConfigError, match=rf"cond_dropout: {p}; allowed: 0 <= p < 1"):
                from_dict(cls, {**data, "cond_dropout": p})
        for p in (0.0, 0.5):
            assert from_dict(cls, {**data, "cond_dropout": p}).cond_dropout == p


# What each prediction type's UNet output is, written from the papers, for z_t = a·x0 + s·ε with
# a = sqrt(ᾱ), s = sqrt(1 - ᾱ): ε (Ho et al. 2020), v = a·ε - s·x0 (Salimans & Ho 2022), x0.
PAPER_TARGETS = {
    "epsilon": lambda x0, eps, a, s: eps,
    "v_prediction": lambda x0, eps, a, s: a * eps - s * x0,
    "sample": lambda x0, eps, a, s: x0,
    "flow": lambda x0, eps, a, s: eps - x0,  # rectified flow (Liu et al. 2022): the straight path's velocity
}


def test_each_prediction_type_has_the_target_inverse_and_weight_of_its_equations():
    from ldmkit.models.ldm import PREDICTION_TYPES
    from ldmkit.training.predictions import PREDICTIONS

    assert set(PREDICTIONS) == set(PREDICTION_TYPES) == set(PAPER_TARGETS)
    # by hand: x0 = 1, ε = 2, ᾱ = 0.36 (a = 0.6, s = 0.8): v = 0.6·2 - 0.8·1 = 0.4
    one = torch.tensor([1.0], dtype=torch.float64)
    by_hand = {"epsilon": 2.0, "v_prediction": 0.4, "sample": 1.0, "flow": 1.0}
    for name, want in by_hand.items():
        assert PREDICTIONS[name].target(one, 2 * one, 0.6 * one, 0.8 * one).item() == pytest.approx(want, abs=1e-12)

    g = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64) for _ in range(2))
    ab = torch.tensor([0.9991, 0.5, 0.0047], dtype=torch.float64)[:, None, None, None]  # SD's ᾱ near t = 0, mid, T
    a, s = ab.sqrt(), (1 - ab).sqrt()
    zt = a * x0 + s * eps
    snr = (ab / (1 - ab)).flatten()
    delta = 0.1  # an output that stands for x0 + delta (and the ε that goes with it at this z_t)
    x0_off = x0 + delta
    eps_off = (zt - a * x0_off) / s
    for name, paper in PAPER_TARGETS.items():
        p = PREDICTIONS[name]
        target = paper(x0, eps, a, s)
        assert torch.allclose(p.target(x0, eps, a, s), target, rtol=0, atol=1e-12), name
        back_x0, back_eps = p.inverse(target, zt, a, s)
        assert torch.allclose(back_x0, x0, atol=1e-9) and torch.allclose(back_eps, eps, atol=1e-9), name
        # Min-SNR's divisor: the squared output error per unit of squared x0 error
        error = (paper(x0_off, eps_off, a, s) - target).pow(2).mean(dim=(1, 2, 3))
        assert torch.allclose(error / delta**2, p.x0_error_scale(snr), rtol=1e-9), name


def task_predicting(tmp_path: Path, prediction_type: str, **config):
    """An LDMTask fine-tuning a tiny random model of this prediction type, with a latent cache of known
    latents (std 0, so z0 = the scaled mean exactly)."""
    from dataclasses import replace

    from ldmkit.checkpoints.single_file import save_single_file
    from ldmkit.data.images import DataConfig
    from ldmkit.models.ldm import LatentDiffusion, ScheduleConfig
    from ldmkit.models.presets import tiny
    from ldmkit.training.ldm import LDMTask, LDMTrainConfig
    from ldmkit.training.loop import RunConfig

    torch.manual_seed(0)
    path = tmp_path / f"{prediction_type}.safetensors"
    save_single_file(LatentDiffusion(replace(tiny(), schedule=ScheduleConfig(prediction_type=prediction_type))), path)
    task = LDMTask(
        LDMTrainConfig(
            init_from=str(path),
            data=DataConfig(n=8),
            run=RunConfig(dir=str(tmp_path / "run"), batch_size=8),
            cond_dropout=0.0,
            **config,
        )
    )
    assert task.model.config.schedule.prediction_type == prediction_type
    mean = torch.randn(8, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    task.cache = {"mean": mean, "std": torch.zeros_like(mean)}
    return task, task.model.vae.scale(mean)


def oracle(task, z0: torch.Tensor, kind: str, x0_error: float = 0.0):
    """A stand-in UNet that knows the clean latents: it outputs the paper's `kind` target of
    x0 + x0_error (and the ε that goes with it at z_t), and records the timesteps it saw."""
    seen = []

    def predict(zt, t, context, extra):
        seen.append(t)
        ab = task.schedule.alphas_cumprod[t].double()[:, None, None, None]
        a, s = ab.sqrt(), (1 - ab).sqrt()
        x0 = z0.double() + x0_error
        eps = (zt.double() - a * x0) / s
        return PAPER_TARGETS[kind](x0, eps, a, s).float()

    return predict, seen


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_the_training_loss_is_against_the_models_own_prediction_target(tmp_path, prediction_type):
    """The training step's loss: zero for a UNet that outputs exactly its prediction type's target,
    large for one that outputs another type's; an x0-prediction model that outputs x0 has loss 0."""
    task, z0 = task_predicting(tmp_path, prediction_type)
    items, gs = list(range(8)), list(range(8))
    captions = [task.data.caption(i) for i in items]
    for kind in PAPER_TARGETS:
        task.predict, _ = oracle(task, z0, kind)
        loss = task.loss(None, items, captions, gs).item()
        assert (loss <= 1e-8) if kind == prediction_type else (loss > 1e-2), (kind, loss)
    if prediction_type == "sample":
        task.predict = lambda zt, t, context, extra: z0
        assert task.loss(None, items, captions, gs).item() == 0.0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weighting_is_min_snr_gamma_times_the_x0_error_for_every_prediction_type(tmp_path, prediction_type):
    """Min-SNR-γ (Hang et al. 2023) weights the x0 error by min(SNR, γ) whatever the UNet predicts."""
    gamma, x0_error = 5.0, 0.1
    task, z0 = task_predicting(tmp_path, prediction_type, min_snr_gamma=gamma)
    items = list(range(8))
    task.predict, seen = oracle(task, z0, prediction_type, x0_error)
    per_sample = task.loss(None, items, [task.data.caption(i) for i in items], items, reduce=False)
    ab = task.schedule.alphas_cumprod[seen[0]]
    snr = ab / (1 - ab)
    assert (snr < gamma).any() and (snr > gamma).any(), snr  # both sides of the clamp
    assert torch.allclose(per_sample, snr.clamp(max=gamma) * x0_error**2, rtol=1e-3), (per_sample, snr)


def test_fine_tuning_keeps_the_models_latent_scale_and_schedule_unless_one_is_given(tmp_path):
    """Fine-tuning starts from the model's own latent scale (measuring it again on the new data would move
    every latent the UNet learned on) and its own schedule; a schedule in the config replaces the model's
    (here zero terminal SNR with v-prediction, as Lin et al. 2024 fine-tuned SD 2.1) and is saved with it,
    completed as SD's scheduler config: DDIM's class default clip_sample: True would clamp the latents to ±1."""
    from dataclasses import replace

    from ldmkit.checkpoints.single_file import load_model, save_single_file
    from ldmkit.data.images import DataConfig
    from ldmkit.diffusion.registry import SAMPLERS
    from ldmkit.diffusion.schedule import NoiseSchedule
    from ldmkit.models.ldm import LatentDiffusion, ScheduleConfig
    from ldmkit.models.presets import tiny
    from ldmkit.training.ldm import LDMTask, LDMTrainConfig
    from ldmkit.training.loop import RunConfig

    torch.manual_seed(0)
    base = tiny()
    base = replace(base, vae=replace(base.vae, scale_factor=0.37), guessed={"schedule.prediction_type": "epsilon"})
    model = LatentDiffusion(base)
    stored = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), dim=0)  # DDPM's linear schedule, not SD's
    model.alphas_cumprod = stored
    path = tmp_path / "base.safetensors"
    save_single_file(model, path)
    zsnr = ScheduleConfig(
        prediction_type="v_prediction", diffusers={"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    )
    for name, schedule in (("own", None), ("zsnr", zsnr)):
        run = RunConfig(dir=str(tmp_path / name), batch_size=4, threads=1)
        task = LDMTask(LDMTrainConfig(init_from=str(path), data=DataConfig(n=4), run=run, schedule=schedule))
        assert math.isfinite(task.train_step(0, range(4), 1e-4)["loss"])
        assert task.model.vae.config.scale_factor == 0.37, name
        save_single_file(task.ema_model(), tmp_path / f"{name}.safetensors")
        tuned = load_model(tmp_path / f"{name}.safetensors")
        assert tuned.config.vae.scale_factor == 0.37, name
        expected = schedule or base.schedule
        assert tuned.config.schedule.prediction_type == expected.prediction_type, name
        assert bool(tuned.config.schedule.diffusers.get("rescale_betas_zero_snr")) == (schedule is zsnr), name
        wanted = stored if schedule is None else NoiseSchedule.from_config(zsnr).alphas_cumprod
        assert torch.allclose(task.schedule.alphas_cumprod, wanted), name
        assert (task.schedule.alphas_cumprod[-1] == 0) == (schedule is zsnr), name
        # what the file's family rules guessed of the old schedule no longer describes the new one
        assert ("schedule.prediction_type" in tuned.config.guessed) == (schedule is None), name
        ddim = SAMPLERS["ddim"].scheduler_settings(tuned.config.schedule.diffusers)
        assert ddim["clip_sample"] is False, name
        assert ddim["timestep_spacing"] == ("trailing" if schedule is zsnr else "leading"), name


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_new_backbone_reads_latents_of_its_autoencoders_width(tmp_path, seed):
    """An autoencoder with a latent width drawn at random (an f = 8 one keeps more channels): the UNet built
    on it reads and predicts that many, whatever the config's default, and trains on both-ways captions."""
    from ldmkit.config import from_dict
    from ldmkit.models.autoencoder import AutoencoderConfig, AutoencoderKL
    from ldmkit.training.autoencoder import save_autoencoder
    from ldmkit.training.ldm import LDMTask, LDMTrainConfig

    width = int(np.random.default_rng(seed).integers(1, 17))
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        AutoencoderConfig(channels=(16, 32), num_res_blocks=1, z_channels=width, embed_dim=width, norm_groups=8)
    )
    save_autoencoder(vae, tmp_path / "ae.safetensors")
    data = yaml.safe_load((ROOT / "configs" / "test-ldm.yaml").read_text())
    data["autoencoder"] = str(tmp_path / "ae.safetensors")
    data["run"]["dir"] = str(tmp_path / "run")
    data["data"]["relations"] = "both-ways"
    task = LDMTask(from_dict(LDMTrainConfig, data))
    unet = task.model.unet.config
    assert unet.in_channels == unet.out_channels == width, f"seed {seed}: latent width {width}"
    assert len(task.data) == 2 * data["data"]["n"]
    logged = task.train_step(0, range(8), 1e-4)
    assert math.isfinite(logged["loss"]), f"seed {seed}"


def test_a_latent_cache_of_other_data_is_encoded_anew(tmp_path):
    """A run folder reused with more items (both-ways captions double a split): the cache file's rows are
    not the data's items, so it is encoded again rather than read (or indexed past its end)."""
    from ldmkit.data import latent_cache
    from ldmkit.data.images import DataConfig, ShapesData
    from ldmkit.models.autoencoder import AutoencoderConfig, AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderConfig(channels=(16, 32), num_res_blocks=1, norm_groups=8)).eval()
    small = ShapesData(DataConfig(split="val", n=4, size=32))
    both = ShapesData(DataConfig(split="val", n=4, size=32, relations="both-ways"))
    first = latent_cache.load_or_encode(tmp_path, small, vae, 32)
    again = latent_cache.load_or_encode(tmp_path, both, vae, 32)
    assert len(first["readable"]) == 4 and len(again["readable"]) == 8
    # items 4..7 are scenes 0..3 told anew: encoded once, read from the same rows
    assert len(again["mean"]) == 4 and again["row"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    for a, b in zip(latent_cache.posterior(again, [4, 5, 6, 7]), latent_cache.posterior(first, [0, 1, 2, 3])):
        assert torch.equal(a, b)
    # with colours drawn per item, the doubled half is not the same images: every item has its own row
    anyc = ShapesData(DataConfig(split="val", n=4, size=32, relations="both-ways", colours="any"))
    (tmp_path / "any").mkdir()
    own = latent_cache.load_or_encode(tmp_path / "any", anyc, vae, 32)
    assert len(own["mean"]) == 8 and own["row"].tolist() == list(range(8))
    assert not torch.equal(own["mean"][4:], own["mean"][:4])
    assert len(latent_cache.load_or_encode(tmp_path, both, vae, 32)["readable"]) == 8


def test_a_stop_signal_while_the_latent_cache_encodes_leaves_no_file(tmp_path):
    """Encoding 100k images takes many minutes: SIGTERM or Ctrl-C stops it between batches (the loop's
    stop flag, read by `stopping`) rather than after it, and nothing half-written is left to be read."""
    from ldmkit.data import latent_cache
    from ldmkit.data.images import DataConfig, ShapesData
    from ldmkit.errors import Stopped
    from ldmkit.models.autoencoder import AutoencoderConfig, AutoencoderKL

    vae = AutoencoderKL(AutoencoderConfig(channels=(16,), num_res_blocks=1, norm_groups=8)).eval()
    data = ShapesData(DataConfig(split="val", n=latent_cache.BATCH + 8, size=16))
    flags = iter([None, signal.SIGTERM])  # the signal arrives while the first batch is encoded
    n = latent_cache.BATCH + 8
    with pytest.raises(Stopped, match=rf"SIGTERM while encoding the latent cache \({latent_cache.BATCH} of {n} "):
        latent_cache.load_or_encode(tmp_path, data, vae, 16, stopping=lambda: next(flags))
    assert list(tmp_path.iterdir()) == []
    assert len(latent_cache.load_or_encode(tmp_path, data, vae, 16)["readable"]) == n


def test_a_fine_tune_knows_its_base_words_and_an_open_base_stays_open(tmp_path):
    """A model's closed vocabulary (the words prompts are warned about) after a fine-tune through init_from
    is its base's and its captions' together: a canonical-caption fine-tune of a model that reads "below"
    once lost the word; a fine-tune of an open-vocabulary base (SD) stays open."""
    from ldmkit.checkpoints.single_file import load_model, save_single_file
    from ldmkit.data.images import DataConfig
    from ldmkit.models.ldm import LatentDiffusion
    from ldmkit.models.presets import tiny
    from ldmkit.training.ldm import LDMTask, LDMTrainConfig
    from ldmkit.training.loop import RunConfig

    for name, base_words in (("closed", ("below", "zork")), ("open", ())):
        torch.manual_seed(0)
        model = LatentDiffusion(tiny())
        model.config.vocabulary = base_words
        path = tmp_path / f"{name}.safetensors"
        save_single_file(model, path)
        run = RunConfig(dir=str(tmp_path / name), batch_size=4, threads=1)
        data = DataConfig(n=8, size=32, relations="canonical")
        task = LDMTask(LDMTrainConfig(init_from=str(path), data=data, run=run))
        task.finish(tmp_path / name)
        words = load_model(tmp_path / name / "model.safetensors").config.vocabulary
        captions = {w for i in range(8) for w in task.data.caption(i).split(" ")}
        assert (set(words) == set(base_words) | captions) if base_words else words == (), (name, words)
