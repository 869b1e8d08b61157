"""Distilling a tiny autoencoder from a model's KL autoencoder (training/tiny_autoencoder.py): the command
runs and resumes, what it writes is a tiny decoder generation accepts and that decodes as the run measured,
the objective learns (a fixed batch is fitted), and a tiny autoencoder that cannot read the teacher's
latents is refused before training."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ldmkit.config import from_dict
from ldmkit.errors import ConfigError
from ldmkit.evaluation.metrics import psnr
from ldmkit.models.tiny_autoencoder import TinyAutoencoderConfig
from ldmkit.training.tiny_autoencoder import TinyDistillConfig, TinyDistillTask, edges

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "test-tiny.yaml"


def config(tmp_path, **changes) -> TinyDistillConfig:
    import yaml

    c = from_dict(TinyDistillConfig, yaml.safe_load(CONFIG.read_text()))
    return replace(c, run=replace(c.run, dir=str(tmp_path / "run")), **changes)


def test_the_command_writes_a_tiny_decoder_generation_accepts(tmp_path):
    from ldmkit.checkpoints.taesd_files import read_tiny_autoencoder
    from ldmkit.pipelines import Pipeline

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ldmkit", "distill-tiny-autoencoder", "--config", str(CONFIG), "--run-dir", str(run)]
    done = subprocess.run([*cmd, "-q"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    product = Path(json.loads(done.stdout)["tiny-autoencoder"])
    assert product == run / "tiny-autoencoder.safetensors"
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals if "psnr_vs_full" in e] == [3, 6]

    tiny = read_tiny_autoencoder(product).autoencoder
    assert tiny.parts == ("encoder", "decoder")
    task = TinyDistillTask(config(tmp_path))
    full, _ = task.decodes(task.val_images)
    with torch.no_grad():
        ours = tiny.decode(task.vae.scale(task.vae.encode(task.val_images).mean)).clamp(-1, 1)
    measured = psnr((full + 1) / 2, (ours + 1) / 2).mean().item()
    assert measured == pytest.approx(evals[-1]["psnr_vs_full"], abs=1e-3)

    pipe = Pipeline.load("shapes", tiny_decoder=product)
    pipe.codec.decoder = "tiny"
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(pipe.decode(z), tiny.decode(z))

    again = subprocess.run([*cmd, "--resume", "-q"], capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout)["step"] == 6  # finished: resuming trains nothing more


def test_the_objective_fits_a_fixed_batch(tmp_path):
    """The teacher's decode of a batch is learnable: 40 steps on the same 2 images at a high rate lower the
    loss below a third of its start (pixel L1 + edges + the encoder's MSE)."""
    task = TinyDistillTask(config(tmp_path))
    x = task.val_images[:2]
    losses = []
    for _ in range(40):
        task.opt.zero_grad()
        loss, _ = task.loss(x, [torch.Generator().manual_seed(i) for i in range(2)])
        loss.backward()
        task.opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 3, losses[::8]


def test_edges_are_neighbour_differences():
    x = torch.tensor([[[[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]]]])
    dx, dy = edges(x)
    assert dx.tolist() == [[[[1.0, 2.0], [0.0, 0.0]]]]
    assert dy.tolist() == [[[[2.0, 1.0, -1.0]]]]


@pytest.mark.parametrize(
    ("model", "says"),
    [
        (dict(latent_channels=16), "latent_channels 16: the teacher's latents have 4"),
        (dict(num_decoder_blocks=(1, 1, 1, 1), decoder_block_out_channels=(16,) * 4), "the teacher's factor is 2"),
    ],
)
def test_a_tiny_autoencoder_that_cannot_read_the_teachers_latents_is_refused(tmp_path, model, says):
    c = config(tmp_path)
    c = replace(c, model=TinyAutoencoderConfig(**{**c.model.__dict__, **model}))
    with pytest.raises(ConfigError, match=says):
        TinyDistillTask(c)


def test_parts_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="parts"):
        config(tmp_path, parts=("decoder", "decoder"))
    with pytest.raises(ConfigError, match="parts"):
        config(tmp_path, parts=("vae",))
