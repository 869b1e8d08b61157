"""Data parallelism is exact: two CPU processes (gloo) over a global batch give the gradients of one
process over the same batch, for both stages, and a short AdamW run ends at the same weights."""

from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import yaml

ROOT = Path(__file__).parent.parent


def stage_config(stage: str, folder: Path) -> dict:
    name = "test-autoencoder.yaml" if stage == "autoencoder" else "test-ldm.yaml"
    data = yaml.safe_load((ROOT / "configs" / name).read_text())
    data["run"].update({"dir": str(folder / "run"), "eval_every": 1000, "sample_every": 1000, "ckpt_every": 1000})
    if stage == "ldm":
        data["autoencoder"] = str(folder / "vae.safetensors")
    return data


def build_task(stage: str, data: dict):
    from ldmkit.config import from_dict

    if stage == "autoencoder":
        from ldmkit.training.autoencoder import AutoencoderTask, AutoencoderTrainConfig

        return AutoencoderTask(from_dict(AutoencoderTrainConfig, data))
    from ldmkit.training.ldm import LDMTask, LDMTrainConfig

    data = {**data, "latent_cache": False}
    return LDMTask(from_dict(LDMTrainConfig, data))


def gradients(task, stage: str) -> dict[str, torch.Tensor]:
    modules = {"vae": task.vae, "disc": task.disc} if stage == "autoencoder" else {"unet": task.unet}
    return {
        f"{m}.{n}": p.grad.clone()
        for m, mod in modules.items()
        for n, p in mod.named_parameters()
        if p.grad is not None
    }


def worker(rank: int, world: int, stage: str, folder: str, mode: str, accum: int = 1):
    from ldmkit.training import distributed as dist

    torch.set_num_threads(1)
    if world > 1:
        tdist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous-{mode}", rank=rank, world_size=world)
    data = stage_config(stage, Path(folder))
    data["run"]["grad_accum"] = accum
    if mode == "grads":
        task = build_task(stage, data)
        step = 5  # after the autoencoder's disc_start: the discriminator and the adaptive weight are on
        task.train_step(step, dist.local_slice(range(step * 8, step * 8 + 8)), 1e-4)
        if rank == 0:
            torch.save(gradients(task, stage), f"{folder}/grads-{world}-{accum}.pt")
    else:
        from ldmkit.training.loop import RunConfig, Trainer

        data["run"].update({"dir": f"{folder}/run-{world}", "steps": 3, "lr": 1e-5, "warmup": 1})
        task = build_task(stage, data)
        Trainer(task, RunConfig(**data["run"])).fit(progress=False)
    dist.shutdown()  # every rank done, then the group destroyed before interpreter teardown


def run(stage, folder, mode, world, accum=1):
    if world == 1:
        threads = torch.get_num_threads()
        try:
            worker(0, 1, stage, str(folder), mode, accum)
        finally:
            torch.set_num_threads(threads)
    else:
        mp.start_processes(worker, args=(world, stage, str(folder), mode), nprocs=world, start_method="spawn")


@pytest.fixture
def folder(tmp_path):
    from conftest import randomize
    from ldmkit.models.autoencoder import AutoencoderConfig, AutoencoderKL
    from ldmkit.training.autoencoder import save_autoencoder

    save_autoencoder(
        randomize(AutoencoderKL(AutoencoderConfig(channels=(16, 32), num_res_blocks=1, norm_groups=8))),
        tmp_path / "vae.safetensors",
    )
    return tmp_path


def relative_difference(one: dict, two: dict) -> float:
    assert set(one) == set(two) and len(one) > 10
    flat1 = torch.cat([one[k].flatten() for k in sorted(one)])
    flat2 = torch.cat([two[k].flatten() for k in sorted(one)])
    assert flat1.norm() > 0
    return ((flat1 - flat2).norm() / flat1.norm()).item()


@pytest.mark.parametrize("stage", ["autoencoder", "ldm"])
def test_two_processes_sum_to_the_single_process_gradients(folder, stage):
    """Two processes with 4 samples each equal one process over the same 8 samples in two
    micro-batches of 4 (the same arithmetic, summed over processes instead of in memory) to 1e-6;
    against one pass over all 8 at once only float32 reduction order differs (measured ~1e-6)."""
    run(stage, folder, "grads", 2)
    run(stage, folder, "grads", 1, accum=2)
    run(stage, folder, "grads", 1, accum=1)
    two = torch.load(folder / "grads-2-1.pt")
    assert relative_difference(torch.load(folder / "grads-1-2.pt"), two) <= 1e-6
    assert relative_difference(torch.load(folder / "grads-1-1.pt"), two) <= 1e-5


@pytest.mark.parametrize("stage", ["autoencoder", "ldm"])
def test_short_adamw_run_ends_at_the_same_weights(folder, stage):
    """Three steps at learning rate 1e-5 (Adam moves every weight by about lr per step, whatever the
    size of its gradient, so rounding-level gradient differences show up at that scale)."""
    run(stage, folder, "run", 2)
    run(stage, folder, "run", 1, accum=2)
    a = torch.load(folder / "run-1" / "checkpoints" / "step-00000003.pt", weights_only=True)["task"]
    b = torch.load(folder / "run-2" / "checkpoints" / "step-00000003.pt", weights_only=True)["task"]
    key = "vae" if stage == "autoencoder" else "unet"
    worst = max((a[key][k].float() - b[key][k].float()).abs().max().item() for k in a[key])
    assert worst <= 1e-5, worst
    rows = [open(folder / f"run-{w}" / "loss.csv").read().splitlines() for w in (1, 2)]
    assert len(rows[0]) == len(rows[1]) == 4  # rank 0 alone wrote the log
