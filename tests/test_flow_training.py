"""Training with a rectified-flow objective and a transformer backbone (`ldmkit train` with `mmdit:` and
`schedule: {prediction_type: flow}`): the loss against its equation -- z_σ = (1 − σ)·x0 + σ·ε, the
target ε − x0, σ the logit-normal quantile of the drawn index, the model's timestep σ·T -- and a tiny run
end to end whose model then generates from the command line."""

import json
import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import ROOT, config_file
from ldmkit.cli import main

MMDIT = {"depth": 2, "hidden_size": 32, "head_dim": 16, "patch_size": 2, "pos_embed_max_size": 8}


def flow_config(autoencoder, **changes) -> dict:
    data = yaml.safe_load((ROOT / "configs" / "test-ldm.yaml").read_text())
    data.pop("unet")
    data.update(autoencoder=str(autoencoder / "autoencoder.safetensors"), mmdit=MMDIT)
    data["schedule"] = {"prediction_type": "flow"}
    data.update(changes)
    return data


def test_the_flow_loss_is_its_equation(autoencoder):
    from ldmkit.config import from_dict
    from ldmkit.training.ldm import LDMTask, LDMTrainConfig

    task = LDMTask(from_dict(LDMTrainConfig, flow_config(autoencoder, logit_mean=0.3, logit_std=0.8)))
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    k = torch.tensor([0, 500, 999])
    task.draw = lambda items, images, gs, high, weights: (z0, k, eps, torch.ones(3))  # no caption dropped
    seen = {}

    def predict(zt, t, context, extra, y=None):
        seen.update(zt=zt, t=t, y=y)
        return torch.zeros_like(zt)

    task.predict = predict
    loss = task.loss(None, [0, 1, 2], ["a red circle"] * 3, [0, 1, 2], reduce=False)
    # σ by hand: the logit-normal quantile (k + ½)/T, through the standard normal's inverse CDF
    normal = torch.distributions.Normal(0.0, 1.0).icdf((k.double() + 0.5) / 1000)
    sigma = torch.sigmoid(0.3 + 0.8 * normal).float()
    s = sigma[:, None, None, None]
    assert torch.allclose(seen["zt"], (1 - s) * z0 + s * eps, atol=1e-6)
    assert torch.allclose(seen["t"], sigma * 1000, atol=1e-3) and seen["y"] is None
    assert torch.allclose(loss, (eps - z0).pow(2).mean(dim=(1, 2, 3)), rtol=1e-6)
    assert 0 < sigma[0] < 0.1 < sigma[1] < 0.9 < sigma[2] < 1  # both ends of the path are visited, rarely
    assert math.isclose(float(sigma[1]), 1 / (1 + math.exp(-0.3)), rel_tol=1e-3)  # the median: sigmoid(mean)


def test_a_transformer_trained_on_the_flow_objective_generates(tmp_path, autoencoder, capsys):
    cfg = config_file(tmp_path, "test-ldm.yaml", tmp_path / "flow", **{})
    data = flow_config(autoencoder)
    data["run"] = yaml.safe_load(cfg.read_text())["run"]
    cfg.write_text(yaml.safe_dump(data))
    assert main(["train", "--config", str(cfg), "-q"]) == 0
    run = tmp_path / "flow"
    assert (run / "samples" / "samples-00000010.png").exists()
    out = tmp_path / "x.png"
    assert main(["generate", "a red circle", "--model", str(run / "model.safetensors"), "--steps", "3", "-q",
                 "-o", str(out)]) == 0  # fmt: skip
    image = np.asarray(Image.open(out))
    assert image.shape == (32, 32, 3) and image.std() > 0
    from ldmkit.images import read_png_parameters
    from ldmkit.pipelines.params import from_infotext

    assert from_infotext(read_png_parameters(out))[0]["sampler"] == "euler"  # a flow model's default
    # its keys are a transformer's (joint_blocks), but its header says it is ours, with one text tower
    out, _ = capsys.readouterr()
    assert main(["inspect", str(run / "model.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "ldmkit"
    capsys.readouterr()
    assert main(["generate", "x", "--model", str(run / "model.safetensors"), "--sampler", "ddim", "-q"]) == 2
    assert "error: sampler 'ddim' with a flow-matching model; allowed: euler, heun" in capsys.readouterr().err


def test_a_config_with_two_backbones_or_none_is_refused(autoencoder):
    from ldmkit.config import from_dict
    from ldmkit.errors import ConfigError
    from ldmkit.training.ldm import LDMTrainConfig

    both = flow_config(autoencoder, unet={"channels": [32, 64]})
    for data in (both, {k: v for k, v in flow_config(autoencoder).items() if k != "mmdit"}):
        with pytest.raises(ConfigError, match="give exactly one backbone, unet or mmdit"):
            from_dict(LDMTrainConfig, data).check()
