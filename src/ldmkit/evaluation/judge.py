"""The shapes judge: a deterministic, non-learned detector that reads a shapes-world image and
checks it against what its prompt asked for (an `Intent`), explaining every miss.

Detection: each pixel is labelled with the nearest of the palette colours and the background (the
median of the border); pixels of one colour form connected components; a component's shape comes
from its geometry (fill of its bounding box, solidity against its convex hull, where its mass sits).
Checks: colour and shape of each asked-for object (after the best matching of asked to found
objects), the count, named positions (by centroid), relations (by centroids), and size if asked."""

import itertools
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image

from ldmkit.data.shapes import PALETTE, PLURAL, SHAPES, SIZES, Intent

ATTRIBUTES = ("colour", "shape", "count", "position", "relation", "size")
_PALETTE = np.array(list(PALETTE.values()), dtype=np.float32)
_NAMES = list(PALETTE)


@dataclass
class Detection:
    colour: str
    shape: str
    x: float
    y: float
    area: int
    radius: float  # half the larger side of the bounding box

    def describe(self) -> str:
        return f"{self.colour} {self.shape} at ({self.x:.0f}, {self.y:.0f})"


@dataclass
class Verdict:
    checks: dict[str, bool] = field(default_factory=dict)  # attribute -> passed (absent: not asked)
    misses: list[str] = field(default_factory=list)  # "kind: explanation"
    detections: list[Detection] = field(default_factory=list)

    @property
    def correct(self) -> bool:
        return all(self.checks.values())


def classify_shape(mask: np.ndarray, shapes=SHAPES) -> str:
    """Shape class of one component from its geometry: a star is far from convex; a diamond (if
    `shapes` has it) is narrow at the top and the bottom; a triangle is narrow at the top with its mass
    low; a square fills the corners of its bounding box; else a circle."""
    ys, xs = np.nonzero(mask)
    y0, x0 = ys.min(), xs.min()
    h, w = ys.max() - y0 + 1, xs.max() - x0 + 1
    box = mask[y0 : y0 + h, x0 : x0 + w].astype(np.float32)
    contours, _ = cv2.findContours(box.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    hull = cv2.convexHull(max(contours, key=cv2.contourArea))
    # The hull's area from pixel centres misses half a pixel along its outline: add it back.
    solidity = len(ys) / max(cv2.contourArea(hull) + 0.5 * cv2.arcLength(hull, True), 1.0)
    if solidity < 0.8:
        return "star"
    top_width = box[: max(1, h // 4)].sum(1).mean() / w
    bottom_width = box[-max(1, h // 4) :].sum(1).mean() / w
    mass_y = (ys.mean() - y0) / h  # 0 = top
    # Pointed at both ends (a triangle's base is wide) and filling half its box (a circle fills 0.79).
    if "diamond" in shapes and top_width < 0.42 and bottom_width < 0.42 and box.mean() < 0.65:
        return "diamond"
    if top_width < 0.33 and mass_y > 0.52:
        return "triangle"
    # Corners of the bounding box (|dx| + |dy| > 0.75 of its half-size, summed): a square fills
    # them, a circle leaves them empty (measured on renders: >= 0.42 vs <= 0.04).
    yy, xx = np.mgrid[0:h, 0:w]
    corner = np.abs((xx + 0.5) / w - 0.5) + np.abs((yy + 0.5) / h - 0.5) > 0.75
    if corner.any() and box[corner].mean() > 0.25:
        return "square"
    return "circle"


def shape_wanted(miss: str) -> str | None:
    """The shape a "shape: wanted the COLOUR SHAPE, found ..." miss asked for; None for other kinds."""
    if not miss.startswith("shape:"):
        return None
    return miss.split("wanted the ", 1)[1].split(",", 1)[0].split()[-1]


def detect(image: Image.Image, shapes=SHAPES) -> list[Detection]:
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    side = arr.shape[0]
    border = np.concatenate(
        [arr[:2].reshape(-1, 3), arr[-2:].reshape(-1, 3), arr[:, :2].reshape(-1, 3), arr[:, -2:].reshape(-1, 3)]
    )
    background = np.median(border, axis=0)
    # Edge pixels are blends of a shape's colour with the background: measure each pixel's distance
    # to the segment background -> colour, and how far along it lies (its coverage).
    offset = arr - background  # [H, W, 3]
    axis = _PALETTE - background  # [K, 3]
    along = np.clip((offset @ axis.T) / (axis * axis).sum(-1), 0, 1)  # [H, W, K]
    residual = np.linalg.norm(offset[:, :, None, :] - along[..., None] * axis[None, None], axis=-1)
    nearest = residual.argmin(-1)
    coverage = np.take_along_axis(along, nearest[..., None], -1)[..., 0]
    foreground = coverage > 0.5
    min_area = max(4, int(0.004 * side * side))
    found = []
    for k, name in enumerate(_NAMES):
        mask = (foreground & (nearest == k)).astype(np.uint8)
        if mask.sum() < min_area:
            continue
        n, labels, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
        for j in range(1, n):
            if stats[j, cv2.CC_STAT_AREA] < min_area:
                continue
            comp = labels == j
            w, h = stats[j, cv2.CC_STAT_WIDTH], stats[j, cv2.CC_STAT_HEIGHT]
            found.append(
                Detection(
                    name,
                    classify_shape(comp, shapes),
                    float(centroids[j][0]),
                    float(centroids[j][1]),
                    int(stats[j, cv2.CC_STAT_AREA]),
                    max(w, h) / 2,
                )
            )
    return found


def _position_ok(d: Detection, position: str, side: int) -> bool:
    x, y = d.x / side, d.y / side
    return {
        "left": x < 0.4,
        "right": x > 0.6,
        "top": y < 0.4,
        "bottom": y > 0.6,
        "center": 0.3 < x < 0.7 and 0.3 < y < 0.7,
    }[position]


def _relation_ok(a: Detection, rel: str, b: Detection, side: int) -> bool:
    m = 0.1 * side
    return {"above": a.y + m < b.y, "below": a.y > b.y + m, "left of": a.x + m < b.x, "right of": a.x > b.x + m}[rel]


def _size_of(d: Detection, side: int) -> str:
    small_hi, large_lo = SIZES["small"][1], SIZES["large"][0]
    return "small" if d.radius / side < (small_hi + large_lo) / 2 else "large"


def judge(image: Image.Image, intent: Intent, shapes=None) -> Verdict:
    """shapes: the classes a found shape may take; by default the training world's and any the prompt
    names (so a model that never saw diamonds is judged as before unless a prompt asks for one)."""
    side = image.size[0]
    if shapes is None:
        shapes = (*SHAPES, *sorted({item.shape for item in intent.items} - set(SHAPES)))
    found = detect(image, shapes)
    v = Verdict(detections=found)
    # One entry per asked-for object: (index of its item in the intent, the item).
    wanted = [(i, item) for i, item in enumerate(intent.items) for _ in range(item.count)]
    assigned = _best_assignment(wanted, found)
    _check_objects(v, intent, wanted, assigned, side)
    _check_count(v, intent, found)
    _check_positions(v, wanted, assigned, side)
    if intent.relation is not None:
        _check_relation(v, intent, wanted, assigned, side)
    return v


def _best_assignment(wanted: list, found: list[Detection]) -> list[Detection | None]:
    """The found object (or None) for each asked-for one: the assignment with the most exact
    matches, then colour matches, then shape matches."""

    def score(assign):
        s = 0
        for (_, item), d in zip(wanted, assign):
            if d is not None:
                s += (
                    4 * (d.colour == item.colour and d.shape == item.shape)
                    + 2 * (d.colour == item.colour)
                    + (d.shape == item.shape)
                )
        return s

    options = found + [None] * len(wanted)
    best = max(
        (p for p in itertools.permutations(range(len(options)), len(wanted))),
        key=lambda p: score([options[j] for j in p]),
        default=(),
    )
    return [options[j] for j in best]


def _check_objects(v: Verdict, intent: Intent, wanted: list, assigned: list, side: int) -> None:
    """Colour, shape and (if asked) size of each asked-for object against the one assigned to it."""
    colour_ok = shape_ok = size_ok = True
    for (_, item), d in zip(wanted, assigned):
        name = f"{item.colour} {item.shape}"
        if d is None:
            colour_ok = shape_ok = False
            size_ok = size_ok and not item.size
            v.misses.append(f"missing: no shape found for the {name}")
            continue
        if d.colour != item.colour:
            colour_ok = False
            v.misses.append(f"colour: wanted the {name}, found a {d.describe()}")
        if d.shape != item.shape:
            shape_ok = False
            v.misses.append(f"shape: wanted the {name}, found a {d.describe()}")
        if item.size and _size_of(d, side) != item.size:
            size_ok = False
            v.misses.append(f"size: wanted a {item.size} {name}, found a {_size_of(d, side)} one")
    v.checks["colour"], v.checks["shape"] = colour_ok, shape_ok
    if any(item.size for item in intent.items):
        v.checks["size"] = size_ok


def _check_count(v: Verdict, intent: Intent, found: list[Detection]) -> None:
    total = sum(item.count for item in intent.items)
    v.checks["count"] = len(found) == total
    if len(found) != total:
        kinds = ", ".join(
            f"{item.count} {item.colour} {PLURAL[item.shape] if item.count > 1 else item.shape}"
            for item in intent.items
        )
        v.misses.append(
            f"count: wanted {total} shape(s) ({kinds}), found {len(found)}: " + "; ".join(d.describe() for d in found)
        )


def _check_positions(v: Verdict, wanted: list, assigned: list, side: int) -> None:
    """Named positions, checked only when the intent names one."""
    positioned = [(item, d) for (_, item), d in zip(wanted, assigned) if item.position]
    if not positioned:
        return
    ok = True
    for item, d in positioned:
        if d is None or not _position_ok(d, item.position, side):
            ok = False
            where = d.describe() if d else "nothing"
            v.misses.append(f"position: wanted the {item.colour} {item.shape} {item.position}, found {where}")
    v.checks["position"] = ok


def _check_relation(v: Verdict, intent: Intent, wanted: list, assigned: list, side: int) -> None:
    """The stated relation between the first objects assigned to its two items."""
    a, rel, b = intent.relation
    first: dict[int, Detection | None] = {}
    for (i, _), d in zip(wanted, assigned):
        first.setdefault(i, d)
    da, db = first.get(a), first.get(b)
    ok = da is not None and db is not None and _relation_ok(da, rel, db, side)
    v.checks["relation"] = ok
    if not ok:
        ia, ib = intent.items[a], intent.items[b]
        v.misses.append(
            f"relation: wanted the {ia.colour} {ia.shape} {rel} the {ib.colour} {ib.shape}; found "
            f"{da.describe() if da else 'nothing'} and {db.describe() if db else 'nothing'}"
        )


def corrupt(intent: Intent, kind: str, rng: np.random.Generator) -> Intent | None:
    """A deliberately wrong version of an intent (to test that the judge catches it), or None when
    `kind` does not apply (no position to move, no relation to flip)."""
    import copy

    from ldmkit.data.shapes import ALL_SHAPES, PALETTE, POSITIONS

    wrong = copy.deepcopy(intent)
    item = wrong.items[int(rng.integers(len(wrong.items)))]
    if kind == "colour":
        item.colour = str(rng.choice([c for c in PALETTE if c != item.colour]))
    elif kind == "shape":
        item.shape = str(rng.choice([s for s in ALL_SHAPES if s != item.shape]))
    elif kind == "count":
        item.count = item.count + 1 if item.count == 1 or rng.random() < 0.5 else item.count - 1
    elif kind == "position":
        placed = [i for i in wrong.items if i.position]
        if not placed:
            return None
        opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
        p = placed[0]
        p.position = opposite.get(p.position) or str(rng.choice([q for q in POSITIONS if q != "center"]))
    elif kind == "relation":
        if wrong.relation is None:
            return None
        a, rel, b = wrong.relation
        flips = {
            "above": ["below", "left of", "right of"],
            "below": ["above", "left of", "right of"],
            "left of": ["right of", "above", "below"],
            "right of": ["left of", "above", "below"],
        }
        wrong.relation = (a, str(rng.choice(flips[rel])), b)
    else:
        raise ValueError(kind)
    return wrong


def self_test(per_split: int, seed: int = 0) -> dict:
    """The judge, with every shape class it knows, against the records of its own renders and against
    deliberately wrong intents:
    {"renders": n, "renders_correct": k, "misses_on_renders": {kind: count}, "caught": {kind: [caught, total]}}."""
    from ldmkit.data.shapes import ALL_SHAPES, SPLITS, render, sample_scene

    rng = np.random.default_rng(seed)
    correct, misses, caught = 0, {}, {}
    for split in SPLITS:
        for i in range(per_split):
            scene = sample_scene(split, i, seed)
            image = render(scene)
            verdict = judge(image, scene.intent, ALL_SHAPES)
            correct += verdict.correct
            for m in verdict.misses:
                misses[m.split(":")[0]] = misses.get(m.split(":")[0], 0) + 1
            for kind in ("colour", "shape", "count", "position", "relation"):
                bad = corrupt(scene.intent, kind, rng)
                if bad is not None:
                    c = caught.setdefault(kind, [0, 0])
                    c[0] += not judge(image, bad, ALL_SHAPES).correct
                    c[1] += 1
    return {
        "renders": per_split * len(SPLITS),
        "renders_correct": correct,
        "misses_on_renders": misses,
        "caught": caught,
    }
