"""Text-to-video trained by ldmkit: the clips world, the clip judge, temporal layers grown into the bundled
image model (as no-ops at first: the image model frame by frame), train-video, generate-video from a prompt,
eval-video."""

import json

import numpy as np
import pytest
import torch

from ldmkit.cli import main
from ldmkit.data.shapes_clips import CLIP_SPLITS, HELD_OUT, MOTIONS, ClipIntent, sample_clip
from ldmkit.errors import ConfigError
from ldmkit.evaluation.clip_judge import judge_clip
from ldmkit.training.video_ldm import ClipDataConfig, VideoLDMTrainConfig, video_model_from_image_model


def test_clips_are_deterministic_and_their_splits_keep_held_out_pairs_apart():
    a, b = sample_clip("train", 5), sample_clip("train", 5)
    assert a.caption == b.caption and [np.asarray(x) for x in a.render()][3].tobytes() == b.render()[3].tobytes()
    pairs = {
        split: {(c.intent.shape, c.intent.motion) for c in map(lambda i: sample_clip(split, i), range(300))}
        for split in CLIP_SPLITS
    }
    assert not pairs["train"] & HELD_OUT and not pairs["val"] & HELD_OUT and pairs["heldout"] <= HELD_OUT
    assert {m for _, m in pairs["train"]} == set(MOTIONS)
    with pytest.raises(ConfigError, match="clip split"):
        sample_clip("pink", 0)


def test_the_judge_passes_every_render_and_catches_wrong_motion():
    for i in range(60):
        clip = sample_clip("val", i)
        frames = clip.render()
        assert judge_clip(frames, clip.intent).correct, (clip.caption, judge_clip(frames, clip.intent).misses)
        if clip.intent.motion == "recolour":
            continue
        still = judge_clip([frames[0]] * len(frames), clip.intent)  # nothing moves
        assert not still.checks["motion"], clip.caption
        if clip.intent.motion in ("grow", "shrink", "left", "right", "up", "down"):
            assert not judge_clip(frames[::-1], clip.intent).checks["motion"], clip.caption  # played backwards
    recolour = next(c for c in map(lambda i: sample_clip("val", i), range(200)) if c.intent.motion == "recolour")
    frames = recolour.render()
    swapped = ClipIntent(recolour.intent.shape, recolour.intent.to_colour, "recolour", recolour.intent.colour)
    assert not judge_clip(frames, swapped).correct


def test_a_new_video_model_is_the_image_model_frame_by_frame():
    from ldmkit.bundled import resolve
    from ldmkit.checkpoints.single_file import load_model

    base = load_model(resolve("shapes")[0])
    model = video_model_from_image_model(base, VideoLDMTrainConfig(data=ClipDataConfig(frames=3)))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 16, 16, generator=g)
    context = torch.randn(2, 5, base.config.text.hidden_size, generator=g)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        video = model.unet(x, t, context)
        frames = base.unet(x.flatten(0, 1), t.repeat_interleave(3), context.repeat_interleave(3, dim=0))
    assert torch.allclose(video.flatten(0, 1), frames, atol=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two steps of train-video on a tiny image model: a video.safetensors to use (not a good one)."""
    import yaml

    run = tmp_path_factory.mktemp("video-run")
    assert main(["init-model", str(run / "image.safetensors")]) == 0  # a tiny image model of ldmkit's kind
    config = {
        "run": {
            "dir": str(run),
            "steps": 2,
            "batch_size": 1,
            "lr": 1e-4,
            "warmup": 1,
            "eval_every": 2,
            "sample_every": 2,
            "ckpt_every": 2,
            "threads": 2,
        },
        "base": str(run / "image.safetensors"),
        "data": {"frames": 3, "n": 10},
        "sample": {"prompts": ["a red circle moving right"], "seeds": [0], "steps": 2},
        "val_batches": 1,
    }
    path = run / "test-video.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train-video", "--config", str(path), "-q"]) == 0
    assert (run / "samples" / "samples-00000002.png").exists()
    return run / "video.safetensors"


def test_train_video_makes_a_model_generate_video_reads(trained, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "clip.png"
    args = ["generate-video", "a blue square moving up", "--model", str(trained), "--steps", "2", "--seed", "4"]
    assert main([*args, "-o", str(out), "-q"]) == 0
    from ldmkit.videos import frame_count, read_video_parameters

    assert frame_count(out) == 3
    text = read_video_parameters(out)
    assert text.startswith("a blue square moving up\n") and "CFG scale: 3" in text and "Frames: 3" in text
    bad = main(["generate-video", "a blue square", "--model", str(trained), "--frames", "0"])
    assert bad == 2


def test_eval_video_reports_the_judge_for_model_and_baseline(trained, capsys):
    capsys.readouterr()
    assert main(["eval-video", "--model", str(trained), "--n", "2", "--steps", "1", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["clips"] == 2 and report["frames"] == 3 and report["judge_on_renders"]["clips_fully_correct"] == 1
    for key in ("frames_fully_correct", "motion", "identity", "clips_fully_correct"):
        assert 0 <= report[key] <= 1
    base = str(trained.parent / "image.safetensors")
    assert main(["eval-video", "--model", base, "--baseline", "--frames", "3", "--n", "1", "--steps", "1", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == f"{base} frame by frame"
