"""Training image prompts: a small image tower contrastive against a model's text encoder, then an
IP-Adapter for a frozen model, each a few steps with the shared loop; the files they end with are what
--image-encoder and --ip-adapter read, and the adapter's dropout follows the paper's shares."""

import json
import math

import pytest
import torch

from conftest import config_file, losses
from ldmkit.checkpoints.image_encoder_files import load_image_encoder
from ldmkit.checkpoints.ip_adapter_files import read_ip_adapter
from ldmkit.cli import main
from ldmkit.training.image_tower import contrastive_loss


def test_contrastive_loss_against_its_equation():
    """Captions that repeat in a batch are one caption: at large scale, aligned embeddings cost ln 2 for
    each of two twins (their caption is shared by two images) and nothing for the third; an image nearer
    the wrong caption costs more."""
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    same = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    aligned = contrastive_loss(text.clone(), text, torch.tensor(50.0), same)
    assert abs(aligned.item() - 2 * math.log(2) / 3) < 1e-6
    wrong = contrastive_loss(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), text, torch.tensor(50.0), same)
    assert wrong > aligned + 1


def test_train_a_tower_then_an_adapter(tmp_path, base_model, capsys):
    cfg = config_file(tmp_path, "test-image-encoder.yaml", tmp_path / "tower")
    assert main(["train-image-encoder", "--config", str(cfg), "-q"]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["image-encoder"] == str(tmp_path / "tower" / "image-encoder")
    assert len(losses(tmp_path / "tower")) == 6
    metrics = [json.loads(line) for line in (tmp_path / "tower" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= m["caption_top1"] <= 1 for m in metrics if "caption_top1" in m)
    tower = load_image_encoder(tmp_path / "tower" / "image-encoder")
    assert (tower.width, tower.embed_dim, tower.size) == (32, 24, 32)

    cfg = config_file(
        tmp_path,
        "test-ip-adapter.yaml",
        tmp_path / "adapter",
        base=str(base_model),
        image_encoder=str(tmp_path / "tower" / "image-encoder"),
    )
    assert main(["train-ip-adapter", "--config", str(cfg), "-q"]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[-1])["ip_adapter"]
    assert out == str(tmp_path / "adapter" / "ip-adapter.safetensors")
    assert len(losses(tmp_path / "adapter")) == 6
    assert (tmp_path / "adapter" / "samples" / "samples-00000006.png").exists()
    found = read_ip_adapter(out)
    assert found.config.kind == "plus" and found.config.image_dim == 32 and found.config.tokens == 4
    # the adapter trained: its attention weights moved from their initial values
    from ldmkit.config import from_dict, load_yaml  # noqa: F401
    from ldmkit.training.ip_adapter import IPAdapterTask, IPAdapterTrainConfig

    fresh = IPAdapterTask(load_yaml(IPAdapterTrainConfig, cfg)).adapter.state_dict()
    trained = found.adapter.state_dict()
    assert any((trained[k] - fresh[k]).abs().max() > 1e-4 for k in fresh if "to_k_ip" in k)
    prompt = tmp_path / "p.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(prompt)
    argv = ["generate", "", "--model", str(base_model), "--steps", "2", "--ip-adapter", out, "--ip-image", str(prompt)]
    argv += ["--image-encoder", str(tmp_path / "tower" / "image-encoder"), "-o", str(tmp_path / "o.png"), "--quiet"]
    assert main(argv) == 0


def test_the_papers_dropout_shares():
    """By default 5 % of samples drop both prompts, 5 % the caption alone, 5 % the image alone; the caption's
    share is cond_dropout (what the shared loss drops)."""
    from ldmkit.config import from_dict
    from ldmkit.errors import ConfigError
    from ldmkit.training.ip_adapter import IPAdapterTrainConfig

    c = from_dict(IPAdapterTrainConfig, {"base": "b.safetensors", "image_encoder": "tower"})
    u = torch.linspace(0, 1, 100001)
    text, image = u < c.cond_dropout, c.image_dropped(u)
    share = lambda m: m.float().mean().item()  # noqa: E731
    assert abs(share(text & image) - 0.05) < 1e-3
    assert abs(share(text & ~image) - 0.05) < 1e-3 and abs(share(image & ~text) - 0.05) < 1e-3
    c = from_dict(IPAdapterTrainConfig, {"base": "b", "image_encoder": "t", "drop_text": 0.5})
    assert abs(share((u < c.cond_dropout) & ~c.image_dropped(u)) - 0.5) < 1e-3
    with pytest.raises(ConfigError, match="summing below 1"):
        from_dict(IPAdapterTrainConfig, {"base": "b", "image_encoder": "t", "drop_text": 0.95})
