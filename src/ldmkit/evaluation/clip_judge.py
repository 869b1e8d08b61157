"""The clip judge: the shapes judge (evaluation/judge.py) on every frame, plus what only a clip can get wrong —
the motion (direction and extent of a move, growth, shrinkage, the change of colour) and the identity (one
shape of one kind throughout, of one colour unless it was asked to change).

The shape is tracked by the largest detection in each frame; a move counts when its centroid travels at least
MIN_TRAVEL of the side along the asked axis, more than along the other; growth and shrinkage when its area
changes by GROWTH at least."""

from dataclasses import dataclass, field

from PIL import Image

from ldmkit.data.shapes import ALL_SHAPES
from ldmkit.data.shapes_clips import DIRECTIONS, ClipIntent
from ldmkit.evaluation.judge import Detection, judge

MIN_TRAVEL = 0.1
GROWTH = 1.5
CLIP_CHECKS = ("frames", "motion", "identity")


@dataclass
class ClipVerdict:
    frames_correct: int
    frames: int
    checks: dict[str, bool] = field(default_factory=dict)
    misses: list[str] = field(default_factory=list)

    @property
    def correct(self) -> bool:
        return all(self.checks.values())


def _motion_ok(intent: ClipIntent, first: Detection, last: Detection, side: int) -> bool:
    if intent.motion in DIRECTIONS:
        dx, dy = DIRECTIONS[intent.motion]
        along = (last.x - first.x) * dx + (last.y - first.y) * dy
        across = abs((last.x - first.x) * dy) + abs((last.y - first.y) * dx)
        return along >= MIN_TRAVEL * side and along > across
    if intent.motion == "grow":
        return last.area >= GROWTH * first.area
    if intent.motion == "shrink":
        return first.area >= GROWTH * last.area
    return first.colour == intent.colour and last.colour == intent.to_colour  # recolour


def judge_clip(frames: list[Image.Image], intent: ClipIntent) -> ClipVerdict:
    n, side = len(frames), frames[0].size[0]
    v = ClipVerdict(0, n)
    tracked: list[Detection | None] = []
    for i, frame in enumerate(frames):
        verdict = judge(frame, intent.frame_intent(i, n), ALL_SHAPES)
        v.frames_correct += verdict.correct
        tracked.append(max(verdict.detections, key=lambda d: d.area, default=None))
    v.checks["frames"] = v.frames_correct == n
    if v.frames_correct < n:
        v.misses.append(f"frames: {n - v.frames_correct} of {n} frames do not show {intent.colour} {intent.shape}")
    if any(d is None for d in tracked):
        v.checks["motion"] = v.checks["identity"] = False
        v.misses.append("identity: a frame shows no shape")
        return v
    first, last = tracked[0], tracked[-1]
    v.checks["motion"] = _motion_ok(intent, first, last, side)
    if not v.checks["motion"]:
        v.misses.append(f"motion: wanted {intent.motion}; first {first.describe()}, last {last.describe()}")
    shapes = {d.shape for d in tracked}
    colours = [d.colour for d in tracked]
    changes = sum(a != b for a, b in zip(colours, colours[1:]))
    v.checks["identity"] = len(shapes) == 1 and changes <= (1 if intent.motion == "recolour" else 0)
    if not v.checks["identity"]:
        v.misses.append(f"identity: shapes {sorted(shapes)}, colours {colours}")
    return v
