"""A text-to-video model measured by the clip judge (evaluation/clip_judge.py) on captions of the clips world:
per-frame fully correct (the image judge on every frame), motion correct, identity kept, whole clips fully
correct — overall and per motion — for a split's clips, one clip per caption at seed + i.

The baseline is the image model the video model grew from, run frame by frame with the same noise: the
video model before its temporal layers learned anything (they start as no-ops), so the difference between the
two is what the temporal layers add. The ceiling is the judge on the true renders."""

from collections import defaultdict

import numpy as np

from ldmkit.data.shapes_clips import sample_clip
from ldmkit.evaluation.clip_judge import CLIP_CHECKS, judge_clip
from ldmkit.pipelines.video_params import VideoParams


def _summary(verdicts: list) -> dict:
    frames = sum(v.frames_correct for v in verdicts) / max(1, sum(v.frames for v in verdicts))
    out = {"frames_fully_correct": round(float(frames), 4)}
    for check in CLIP_CHECKS[1:]:
        out[check] = round(float(np.mean([v.checks[check] for v in verdicts])), 4)
    out["clips_fully_correct"] = round(float(np.mean([v.correct for v in verdicts])), 4)
    return out


def evaluate_clips(pipe, split="val", n=50, seed=0, steps=None, cfg=None, sampler=None, progress=None) -> dict:
    """pipe: a VideoPipeline of a text-to-video model of the shapes world."""
    c = pipe.model.config
    frames, size = c.unet.num_frames, c.width
    clips = [sample_clip(split, i, 0, size, frames) for i in range(n)]
    kw = {k: v for k, v in dict(steps=steps, cfg=cfg, sampler=sampler).items() if v is not None}
    chosen = VideoParams(prompt="x", **kw).for_model(pipe.defaults, frames, c.vae.downsample_factor, pipe.name, True)
    verdicts, truth = [], []
    for i, clip in enumerate(clips):  # clip i at seed + i
        result = pipe(prompt=clip.caption, seed=seed + i, frames=frames, **kw)
        verdicts.append(judge_clip(result.videos[0], clip.intent))
        truth.append(judge_clip(clip.render(), clip.intent))
        if progress:
            progress()
    by_motion = defaultdict(list)
    for clip, v in zip(clips, verdicts):
        by_motion[clip.intent.motion].append(v)
    return {
        "model": pipe.name,
        "split": split,
        "clips": n,
        "frames": frames,
        "steps": chosen.steps,
        "cfg": chosen.cfg,
        "sampler": chosen.sampler,
        **_summary(verdicts),
        "by_motion": {m: {"clips": len(vs), **_summary(vs)} for m, vs in sorted(by_motion.items())},
        "judge_on_renders": _summary(truth),
    }
