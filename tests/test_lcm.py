"""Latent consistency distillation: the student starts as the teacher, distillation and inference
use the same guidance scale w, the boundary condition holds, and a distilled model generates with
the LCM sampler by default. (The LCM sampler itself equals diffusers' LCMScheduler: test_samplers.py.)"""

from pathlib import Path

import torch
import yaml
from PIL import Image

from conftest import ROOT, config_file, losses
from ldmkit.cli import main
from ldmkit.diffusion.denoiser import Conditioning, Denoiser
from ldmkit.diffusion.schedule import SamplingSchedule
from ldmkit.nn.embedding import guidance_scale_embedding
from ldmkit.training.lcm import DistillConfig, DistillTask, boundary_scalings


def distill_config(tmp_path, teacher) -> DistillConfig:
    from ldmkit.config import from_dict

    data = yaml.safe_load((ROOT / "configs" / "test-lcm.yaml").read_text())
    data["run"]["dir"] = str(tmp_path / "lcm")
    data["teacher"] = str(teacher)
    return from_dict(DistillConfig, data)


def test_boundary_condition():
    c_skip, c_out = boundary_scalings(torch.tensor([0, 999]))
    assert c_skip[0] == 1 and c_out[0] == 0  # f(x, 0) = x
    assert c_skip[1] < 1e-6 and abs(c_out[1] - 1) < 1e-6  # far from the boundary: the x0 prediction


def test_student_starts_as_the_teacher_and_both_sides_use_the_same_w(tmp_path, base_model):
    task = DistillTask(distill_config(tmp_path, base_model))
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([999, 259])
    ctx = task.encode_text(["a red circle", "two blue squares"])
    with torch.no_grad():
        emb = guidance_scale_embedding(torch.tensor([3.0, 6.0]), task.config.time_cond_proj_dim)
        assert torch.equal(task.student(z, t, ctx, timestep_cond=emb), task.unet(z, t, ctx))

    # Record the w the teacher is guided with and the embedding the student is given in a training loss.
    seen = {}
    guided, student_forward = task.guided_teacher, task.student.forward

    def record_teacher(z_, t_, c_, u_, w):
        seen["w"] = w.clone()
        seen["teacher"] = (z_, t_, c_, u_)
        return guided(z_, t_, c_, u_, w)

    def record_student(*args, timestep_cond=None, **kw):
        seen["emb"] = timestep_cond.clone()
        return student_forward(*args, timestep_cond=timestep_cond, **kw)

    task.guided_teacher, task.student.forward = record_teacher, record_student
    Path(task.config.run.dir).mkdir()
    task.prepare()  # the latent cache
    items = [0, 1]
    task.loss(None, items, [task.data.caption(i) for i in items], [0, 1])
    w = seen["w"]
    assert (w >= task.config.w_min).all() and (w <= task.config.w_max).all()
    # inference embeds the --cfg it is given exactly so
    assert torch.equal(seen["emb"], guidance_scale_embedding(w, task.config.time_cond_proj_dim))
    # and the teacher's target is the pipeline's classifier-free guidance at that scale
    z_, t_, c_, u_ = seen["teacher"]
    with torch.no_grad():
        x0, _ = guided(z_, t_, c_, u_, w)
        for i in range(2):
            ab = task.schedule.alphas_cumprod[t_[i]]
            sigma = float(((1 - ab) / ab).sqrt())
            walk = SamplingSchedule(torch.tensor([sigma, 0.0]), torch.tensor([float(t_[i])]), 1.0)
            denoiser = Denoiser(task.unet, task.schedule, "epsilon", walk)
            cond = Conditioning(c_[i : i + 1], u_[i : i + 1], cfg_scale=float(w[i]))
            want = denoiser(z_[i : i + 1] / ab.sqrt(), sigma, cond)
            assert (want - x0[i : i + 1]).abs().max() <= 1e-4


def test_distill_run_and_its_model(tmp_path, base_model, capsys):
    cfg = config_file(tmp_path, "test-lcm.yaml", tmp_path / "lcm", teacher=str(base_model))
    assert main(["distill-lcm", "--config", str(cfg), "-q"]) == 0
    run = tmp_path / "lcm"
    assert len(losses(run)) == 6 and all(v >= 0 for v in losses(run))
    assert (run / "samples" / "samples-00000006.png").exists()
    capsys.readouterr()
    out = tmp_path / "fast.png"
    assert main(["generate", "a red circle", "--model", str(run / "model.safetensors"), "-q", "-o", str(out)]) == 0
    params = Image.open(out).info["parameters"]
    assert "Steps: 4" in params and "ldmkit sampler: lcm" in params  # a consistency model's defaults
    assert (
        main(
            [
                "distill-lcm",
                "--config",
                str(config_file(tmp_path, "test-lcm.yaml", tmp_path / "again", teacher=str(run / "model.safetensors"))),
                "-q",
            ]
        )
        == 2
    )
    assert "already has a guidance embedding" in capsys.readouterr().err
