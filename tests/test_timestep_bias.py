"""Timestep bias (diffusers' --timestep_bias_strategy / _multiplier / _portion / _begin / _end): the weights
are those of its training script's equations, the task draws with them, and without a bias the draws are
the uniform ones every earlier run made; validation always draws uniformly."""

import numpy as np
import pytest
import torch

from ldmkit.errors import ConfigError
from ldmkit.training.timesteps import TimestepBias


def reference_weights(strategy, multiplier, portion, begin, end, steps):
    """diffusers' generate_timestep_weights, restated: ones, the chosen part times the multiplier, normalised."""
    w = np.ones(steps)
    n = int(portion * steps)
    part = {"later": slice(-n, None) if n else slice(0, 0), "earlier": slice(0, n), "range": slice(begin, end)}
    w[part[strategy]] *= multiplier
    return w / w.sum()


@pytest.mark.parametrize("seed", range(6))
def test_weights_are_the_reference_equations_for_drawn_settings(seed):
    rng = np.random.default_rng(seed)
    steps = int(rng.choice([50, 1000, 1001]))
    strategy = str(rng.choice(["later", "earlier", "range"]))
    begin = int(rng.integers(0, steps // 2))
    end = begin + int(rng.integers(steps // 20, steps // 2))
    multiplier = float(rng.uniform(0.1, 0.5) if rng.random() < 0.5 else rng.uniform(2, 5))
    portion = float(rng.uniform(0.05, 0.95))
    # "later" / "earlier" keep range fields of any value (here past 50 steps): they read only the portion
    bias = TimestepBias(strategy, multiplier, portion, *((begin, end) if strategy == "range" else (900, 2000)))
    want = reference_weights(strategy, multiplier, portion, begin, end, steps)
    got = bias.weights(steps).numpy()
    assert np.allclose(got, want, rtol=1e-12), f"seed {seed}: {bias}, {steps} steps"
    # drawn as often as weighted: the biased part's share of N draws, within five standard errors, and
    # told apart from uniform draws (whose share would be the part's size)
    n_draws, g = 40000, torch.Generator().manual_seed(seed)
    k = torch.multinomial(bias.weights(steps), n_draws, replacement=True, generator=g).numpy()
    part = np.zeros(steps, dtype=bool)
    n = int(portion * steps)
    part[{"later": slice(steps - n, steps), "earlier": slice(0, n), "range": slice(begin, end)}[strategy]] = True
    share, expected, uniform = part[k].mean(), want[part].sum(), part.mean()
    tolerance = 5 * np.sqrt(expected * (1 - expected) / n_draws)
    assert abs(share - expected) < tolerance, f"seed {seed}: share {share:.4f}, expected {expected:.4f}"
    assert abs(uniform - expected) > 2 * tolerance, f"seed {seed}: the bias would not show"


def test_bad_settings_are_refused_in_one_line():
    from ldmkit.config import from_dict
    from ldmkit.training.ldm import LDMTrainConfig

    for bias, message in (
        ({"strategy": "middle"}, "timestep_bias.strategy: 'middle'; allowed: later, earlier, range"),
        ({"multiplier": 0}, "multiplier > 0"),
        ({"portion": 1.5}, "0 < portion <= 1"),
    ):
        with pytest.raises(ConfigError, match=message):
            from_dict(LDMTrainConfig, {"autoencoder": "x", "unet": {}, "timestep_bias": bias})
    # what depends on the model's number of timesteps, when the task knows it
    for bias, message in (
        (TimestepBias("range", 2, 0.25, 500, 400), r"range \[500, 400\); allowed: 0 <= begin < end <= 1000"),
        (TimestepBias("range", 2, 0.25, 0, 1200), r"range \[0, 1200\)"),
        (TimestepBias("later", 2, 0.0005), "portion: 0.0005 of 1000 timesteps is none of them"),
    ):
        with pytest.raises(ConfigError, match=message):
            bias.weights(1000)


def test_the_task_draws_with_the_bias_and_uniformly_without(tmp_path):
    from ldmkit.checkpoints.single_file import save_single_file
    from ldmkit.data.images import DataConfig, sample_generator
    from ldmkit.models.ldm import LatentDiffusion
    from ldmkit.models.presets import tiny
    from ldmkit.training.ldm import LDMTask, LDMTrainConfig
    from ldmkit.training.loop import RunConfig

    path = tmp_path / "m.safetensors"
    save_single_file(LatentDiffusion(tiny()), path)
    run = RunConfig(dir=str(tmp_path / "run"), batch_size=4, threads=1)
    drawn = {}
    for name, bias in (("none", None), ("top", TimestepBias("range", 1e9, 0.25, 990, 1000))):
        task = LDMTask(LDMTrainConfig(init_from=str(path), data=DataConfig(n=8), run=run, timestep_bias=bias))
        draw = task.draw

        def spy(*args, _draw=draw, _name=name):
            out = _draw(*args)
            drawn[_name], drawn["shape"] = out[1], out[0].shape[1:]
            return out

        task.draw = spy
        images = torch.stack([task.data.load(i)[0] for i in range(8)])
        task.loss(images, list(range(8)), ["a red circle"] * 8, list(range(100, 108)))
        if bias is not None:  # validation draws uniformly: its loss compares across runs
            task.evaluate(0)
            assert (drawn["top"] < 990).any(), drawn["top"]
            task.loss(images, list(range(8)), ["a red circle"] * 8, list(range(100, 108)))
    assert (drawn["top"] >= 990).all(), drawn["top"]
    # without a bias, each sample's generator gives the latent noise, then the uniform timestep, as before
    uniform = []
    for g in (sample_generator(0, i) for i in range(100, 108)):
        torch.randn((1, *drawn["shape"]), generator=g)
        uniform.append(torch.randint(0, 1000, (1,), generator=g))
    assert torch.equal(drawn["none"], torch.cat(uniform))
    assert (drawn["none"] < 990).any()
