"""Training checkpoints kept in git (recipes/stage-checkpoints/): the compacted form (every fp32 tensor
stored as bf16) resumes a run within about one optimiser step of the full checkpoint; every kept file
loads with weights_only."""

import importlib.util

import pytest
import torch
import yaml

from conftest import ROOT


def recipe_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def resumed_task(config_path, state):
    from ldmkit.config import from_dict
    from ldmkit.training.ldm import LDMTask, LDMTrainConfig

    task = LDMTask(from_dict(LDMTrainConfig, yaml.safe_load(config_path.read_text())))
    task.load_state_dict(state["task"])
    return task


def test_a_compacted_checkpoint_resumes_as_the_full_one(base_model, tmp_path):
    run = base_model.parent
    full_path = sorted((run / "checkpoints").glob("step-*.pt"))[-1]
    small_path = tmp_path / "small.pt"
    torch.save(recipe_module("compact_checkpoint").compact(torch.load(full_path, weights_only=True)), small_path)
    assert small_path.stat().st_size < 0.8 * full_path.stat().st_size

    config = run.parent / f"{run.name}.yaml"
    full = resumed_task(config, torch.load(full_path, weights_only=True))
    small = resumed_task(config, torch.load(small_path, weights_only=True))
    # weights, averages and moments are fp32 again once loaded: training goes on in full precision
    assert all(v.dtype == torch.float32 for v in small.unet.state_dict().values() if v.is_floating_point())
    assert all(v.dtype == torch.float32 for v in small.ema.state.values() if v.is_floating_point())
    moments = [v for s in small.opt.state.values() for k, v in s.items() if k != "step"]
    assert moments and all(v.dtype == torch.float32 for v in moments)

    before = {k: v.clone() for k, v in full.unet.state_dict().items()}
    step = torch.load(full_path, weights_only=True)["step"]
    batch = range(step * 8, step * 8 + 8)
    a, b = full.train_step(step, batch, 3e-4), small.train_step(step, batch, 3e-4)
    flat = lambda task: torch.cat([v.flatten() for v in task.unet.state_dict().values()])  # noqa: E731
    one_step = (flat(full) - torch.cat([v.flatten() for v in before.values()])).norm()
    apart = (flat(small) - flat(full)).norm()
    print(f"loss {a['loss']:.6f} against {b['loss']:.6f}; apart {apart:.3g}, one step {one_step:.3g}")
    assert one_step > 0 and abs(a["loss"] - b["loss"]) < 0.01 * a["loss"]
    # the rounding moves the weights by about what one optimiser step does, not more
    assert apart < 2 * one_step


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "stage-checkpoints").glob("*.pt")), ids=lambda p: p.name)
def test_kept_training_checkpoints_load_without_pickled_code(path):
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert isinstance(state["step"], int) and "task" in state


def test_a_checkpoint_as_a_model_file_is_the_model_its_run_wrote(base_model, tmp_path):
    """recipes/checkpoint_model.py on a run's last checkpoint writes what the run's end wrote, tensor for
    tensor (its EMA weights, latent scale, latent-to-RGB map and vocabulary), so a run judged midway is
    judged as it would be finished."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    last = sorted((base_model.parent / "checkpoints").glob("step-*.pt"))[-1]
    out = tmp_path / "midway.safetensors"
    recipe_module("checkpoint_model").main(last, out)
    ours, theirs = load_file(out), load_file(base_model)
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), [k for k in ours if not torch.equal(ours[k], theirs[k])]
    with safe_open(out, "pt") as a, safe_open(base_model, "pt") as b:
        assert a.metadata() == b.metadata()
    assert [p.name for p in tmp_path.iterdir()] == ["midway.safetensors"]  # no temporary folder left
