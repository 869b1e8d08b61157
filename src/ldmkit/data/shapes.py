"""The shapes world: captioned images we generate, with an exact record of what was drawn.

A scene is one to three flat shapes (circle, square, triangle, star) in six named colours, two
sizes, at named positions or in stated relations, on a plain or lightly textured grey background.
Its caption is drawn from varied phrasings, and its `intent` is what the caption asserts -- the
thing the judge (evaluation/judge.py) checks a generated image against.

Deterministic: scene i of a split depends only on (split, seed, i). Splits: "train" and "val" share
a distribution; "heldout" scenes each use a (colour, shape) pair that "train" never shows; "pink" and
"teal" scenes each use that colour, and "diamond" scenes that shape, which no other split shows (for
teaching them to a trained model)."""

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

from ldmkit.errors import ConfigError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (240, 140, 20),
    "yellow": (235, 215, 30),
    "green": (40, 170, 60),
    "blue": (40, 90, 220),
    "purple": (140, 60, 190),
}
# Colours no training split uses: personalisation (LoRA, textual inversion) teaches them to a trained
# model. Split NAME (one per colour) puts this colour in every scene; the judge knows them all.
NOVEL_COLOURS: dict[str, tuple[int, int, int]] = {
    "pink": (240, 120, 190),
    "teal": (0, 150, 150),
}
PALETTE = COLOURS | NOVEL_COLOURS
SHAPES = ("circle", "square", "triangle", "star")
# Shapes no training split uses, likewise: split NAME puts one in every scene.
NOVEL_SHAPES = ("diamond",)
ALL_SHAPES = SHAPES + NOVEL_SHAPES  # every class the judge can tell apart
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "diamond": "diamonds"}
NUMBERS = {2: "two", 3: "three"}
# Radii (half the bounding box) as fractions of the image side: small vs large are far apart so
# that a judge can tell them.
SIZES = {"small": (0.09, 0.12), "large": (0.17, 0.21)}
# Where a named position puts a shape's centre (fractions of the side), and the judge's rule for it.
POSITIONS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "center": (0.5, 0.5)}
POSITION_WORDS = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
RELATIONS = ("above", "below", "left of", "right of")
RELATION_WORDS = {"above": "above", "below": "below", "left of": "to the left of", "right of": "to the right of"}
CONVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
# (colour, shape) pairs the training split never shows.
HELDOUT = {("red", "star"), ("blue", "triangle"), ("green", "circle"), ("yellow", "square")}
NOVEL = (*NOVEL_COLOURS, *NOVEL_SHAPES)
SPLITS = {"train": 0, "val": 1, "heldout": 2} | {name: 3 + i for i, name in enumerate(NOVEL)}


@dataclass
class Shape:
    shape: str
    colour: str
    size: str
    x: float  # centre, pixels
    y: float
    r: float  # half the bounding box, pixels


@dataclass
class Item:
    """One thing a caption asks for: `count` shapes of this colour and kind."""

    shape: str
    colour: str
    count: int = 1
    size: str | None = None
    position: str | None = None


@dataclass
class Intent:
    items: list[Item]
    relation: tuple[int, str, int] | None = None  # (item a, relation, item b)


@dataclass
class Scene:
    shapes: list[Shape]
    background: dict
    caption: str
    intent: Intent
    size: int = 64

    def to_json(self) -> dict:
        return {
            "caption": self.caption,
            "size": self.size,
            "background": self.background,
            "shapes": [asdict(s) for s in self.shapes],
            "intent": intent_to_json(self.intent),
        }


def intent_to_json(intent: Intent) -> dict:
    return {"items": [asdict(i) for i in intent.items], "relation": list(intent.relation) if intent.relation else None}


def intent_from_json(d: dict) -> Intent:
    rel = d.get("relation")
    return Intent([Item(**i) for i in d["items"]], tuple(rel) if rel else None)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun(item: Item, with_size: bool, with_colour: bool = True) -> str:
    words = ([item.size] if with_size and item.size else []) + ([item.colour] if with_colour else []) + [item.shape]
    text = " ".join(words)
    return f"{_article(text)} {text}"


def caption_for(intent: Intent, rng: np.random.Generator, colours: bool = True) -> str:
    """A natural phrasing of the intent, drawn from a few templates. colours=False names a relation's
    shapes without their colours ("a star above a circle"), for training only."""
    items = intent.items
    if intent.relation is not None:
        a, rel, b = intent.relation
        text = f"{_noun(items[a], True, colours)} {RELATION_WORDS[rel]} {_noun(items[b], True, colours)}"
        return text if rng.random() < 0.7 else "there is " + text
    if len(items) == 2:
        return f"{_noun(items[0], True)} and {_noun(items[1], True)}"
    item = items[0]
    if item.count > 1:
        return f"{NUMBERS[item.count]} {item.colour} {PLURAL[item.shape]}"
    text = _noun(item, True)
    if item.position:
        text += " " + POSITION_WORDS[item.position]
    return text if rng.random() < 0.85 else text.removeprefix("a ").removeprefix("an ")


def converse(intent: Intent) -> Intent:
    """The same scene asserted the other way round: "X above Y" becomes "Y below X"."""
    if intent.relation is None:
        return intent
    a, rel, b = intent.relation
    return Intent(intent.items, (b, CONVERSE[rel], a))


def canonical(intent: Intent) -> Intent:
    """The intent with its relation stated as "above" or "left of" (the same intent when it already is,
    or states none)."""
    if intent.relation is None or intent.relation[1] in ("above", "left of"):
        return intent
    return converse(intent)


def wordings(intent: Intent, seed) -> list[tuple[str, str]]:
    """Each way of stating the intent (a relation both ways round, anything else its one way), paired with
    the canonical statement in the same template ("there is" or not): [(caption, canonical caption)]. The
    template is drawn from `seed` (anything numpy's default_rng takes)."""
    target = caption_for(canonical(intent), np.random.default_rng(seed))
    forms = [intent, converse(intent)] if intent.relation is not None else [intent]
    return [(caption_for(form, np.random.default_rng(seed)), target) for form in forms]


def _pick_kind(rng, split: str) -> tuple[str, str]:
    while True:
        colour = split if split in NOVEL_COLOURS and rng.random() < 0.5 else str(rng.choice(list(COLOURS)))
        shape = split if split in NOVEL_SHAPES and rng.random() < 0.5 else str(rng.choice(SHAPES))
        if split == "heldout" or (colour, shape) not in HELDOUT:  # held-out pairs only where held out
            return colour, shape


def _size_for(rng, shape: str) -> str:
    # Novel shapes are always large: the bundled f=4 autoencoder keeps a large diamond's corners but
    # rounds a small one into a circle or a triangle (9 of 81 small vs 62 of 63 large survive; docs/data.md),
    # and a UNet adapter cannot teach what the frozen decoder cannot draw.
    return "large" if shape in NOVEL_SHAPES else str(rng.choice(list(SIZES)))


def _radius(rng, size: str, side: int) -> float:
    lo, hi = SIZES[size]
    return float(rng.uniform(lo, hi) * side)


# How far each shape reaches from its centre, in units of r (a square's corners, a triangle's base
# corners lie beyond r).
EXTENT = {"circle": 1.0, "star": 1.0, "square": 1.28, "triangle": 1.35, "diamond": 1.0}


# A triangle's centroid lies 0.3 r below the centre of its bounding box; the others' at the centre.
CENTROID_DY = {"circle": 0.0, "star": 0.0, "square": 0.0, "triangle": 0.3, "diamond": 0.0}


def _separated(shapes: list[Shape], x: float, y: float, r: float, shape: str, gap: float) -> bool:
    return all(math.hypot(s.x - x, s.y - y) > EXTENT[s.shape] * s.r + EXTENT[shape] * r + gap for s in shapes)


def sample_scene(split: str, index: int, seed: int = 0, size: int = 64) -> Scene:
    """Scene `index` of `split`: a deterministic function of its arguments."""
    if split not in SPLITS:
        raise ConfigError(f"split {split!r}; allowed: {list(SPLITS)}")
    rng = np.random.default_rng([SPLITS[split], seed, index])
    while True:  # rejection sampling; heldout scenes must use a held-out pair
        scene = _try_scene(rng, split, size)
        if scene is None:
            continue
        kinds = {(s.colour, s.shape) for s in scene.shapes}
        if split == "heldout" and not (kinds & HELDOUT):
            continue
        if split in NOVEL and split not in {word for kind in kinds for word in kind}:
            continue
        return scene


def _try_scene(rng, split: str, side: int) -> Scene | None:
    kind = rng.choice(["single", "relation", "pair", "count"], p=[0.35, 0.35, 0.1, 0.2])
    margin = 0.04 * side
    if kind == "single":
        drawn = _try_single(rng, split, side, margin)
    elif kind in ("relation", "pair"):
        drawn = _try_two(rng, split, side, margin, kind == "relation")
    else:
        drawn = _try_count(rng, split, side, margin)
    if drawn is None:
        return None
    shapes, intent = drawn
    background = {
        "grey": int(rng.integers(170, 236)),
        "texture": str(rng.choice(["plain", "noise", "gradient"])),
        "seed": int(rng.integers(0, 2**31)),
    }
    return Scene(shapes, background, caption_for(intent, rng), intent, side)


def _try_single(rng, split: str, side: int, margin: float) -> tuple[list[Shape], Intent] | None:
    colour, shape = _pick_kind(rng, split)
    size = _size_for(rng, shape)
    position = str(rng.choice(list(POSITIONS))) if rng.random() < 0.6 else None
    r = _radius(rng, size, side)
    if position:
        cx, cy = POSITIONS[position]
        x, y = (cx + rng.uniform(-0.05, 0.05)) * side, (cy + rng.uniform(-0.05, 0.05)) * side
    else:
        x, y = rng.uniform(r + margin, side - r - margin, size=2)
    if not (r + margin <= x <= side - r - margin and r + margin <= y <= side - r - margin):
        return None
    intent = Intent([Item(shape, colour, 1, size if rng.random() < 0.5 else None, position)])
    return [Shape(shape, colour, size, float(x), float(y), r)], intent


def _try_two(rng, split: str, side: int, margin: float, related: bool) -> tuple[list[Shape], Intent] | None:
    """Two different kinds of shape, the first in a stated relation to the second if `related`."""
    (c1, s1), (c2, s2) = _pick_kind(rng, split), _pick_kind(rng, split)
    if (c1, s1) == (c2, s2):
        return None
    sizes = [_size_for(rng, s1), _size_for(rng, s2)]
    radii = [_radius(rng, sz, side) for sz in sizes]
    rel = str(rng.choice(RELATIONS)) if related else None
    shapes: list[Shape] = []
    # Relations are unambiguous: the stated axis differs by >= 0.25 side, the other by < 0.08.
    for _ in range(50):
        along = rng.uniform(0.25, 0.6) * side
        across = rng.uniform(-0.08, 0.08) * side
        if rel in ("above", "below") or (rel is None and rng.random() < 0.5):
            dx, dy = across, along if rel != "above" else -along
            if rel is None:
                dy = along * rng.choice([-1, 1])
        else:
            dx, dy = (-along if rel == "left of" else along) if rel else along * rng.choice([-1, 1]), across
        x1 = rng.uniform(radii[0] + margin, side - radii[0] - margin)
        y1 = rng.uniform(radii[0] + margin, side - radii[0] - margin)
        x2, y2 = x1 - dx, y1 - dy  # the first shape is `rel` of the second: a - b = (dx, dy)
        lo, hi = radii[1] + margin, side - radii[1] - margin
        if not (lo <= x2 <= hi and lo <= y2 <= hi):
            continue
        # Judged by centroids: the stated axis must differ by >= 0.22 side, the other by <= 0.06.
        cdx = x1 - x2
        cdy = (y1 + CENTROID_DY[s1] * radii[0]) - (y2 + CENTROID_DY[s2] * radii[1])
        vertical = abs(dy) > abs(dx)
        along_c, across_c = (abs(cdy), abs(cdx)) if vertical else (abs(cdx), abs(cdy))
        if rel is not None and (along_c < 0.22 * side or across_c > 0.06 * side):
            continue
        if math.hypot(x1 - x2, y1 - y2) > EXTENT[s1] * radii[0] + EXTENT[s2] * radii[1] + margin:
            shapes = [
                Shape(s1, c1, sizes[0], float(x1), float(y1), radii[0]),
                Shape(s2, c2, sizes[1], float(x2), float(y2), radii[1]),
            ]
            break
    if not shapes:
        return None
    keep_size = rng.random() < 0.3
    items = [Item(s1, c1, 1, sizes[0] if keep_size else None), Item(s2, c2, 1, sizes[1] if keep_size else None)]
    return shapes, Intent(items, (0, rel, 1) if rel else None)


def _try_count(rng, split: str, side: int, margin: float) -> tuple[list[Shape], Intent] | None:
    """Two or three shapes of one kind, apart from each other."""
    colour, shape = _pick_kind(rng, split)
    count = int(rng.choice([2, 3]))
    size = "small" if count == 3 and shape not in NOVEL_SHAPES else _size_for(rng, shape)
    shapes: list[Shape] = []
    for _ in range(200):
        r = _radius(rng, size, side)
        x, y = rng.uniform(r + margin, side - r - margin, size=2)
        if _separated(shapes, x, y, r, shape, margin):
            shapes.append(Shape(shape, colour, size, float(x), float(y), r))
            if len(shapes) == count:
                break
    if len(shapes) < count:
        return None
    return shapes, Intent([Item(shape, colour, count)])


# --- rendering -----------------------------------------------------------------------------------

SUPERSAMPLE = 4


def _polygon(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.9 * r
        return [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    if shape == "triangle":  # pointing up, base 2r, height 1.8r
        return [(x, y - 0.9 * r), (x + r, y + 0.9 * r), (x - r, y + 0.9 * r)]
    if shape == "diamond":  # a rhombus, taller than wide
        return [(x, y - r), (x + 0.75 * r, y), (x, y + r), (x - 0.75 * r, y)]
    if shape == "star":  # five points, inner radius 0.45 r
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((x + rad * math.cos(a), y + rad * math.sin(a)))
        return pts
    raise ConfigError(f"unknown shape {shape!r}")


def render(scene: Scene, with_masks: bool = False, colours: list | None = None):
    """RGB image (and, with_masks, one boolean mask per shape), anti-aliased by supersampling. `colours`
    (one RGB per shape) overrides the named palette: autoencoder data in colours no caption names."""
    side, ss = scene.size, SUPERSAMPLE
    big = Image.new("RGB", (side * ss, side * ss), (0, 0, 0))
    cover = Image.new("L", big.size, 0)  # where any shape is: the alpha of the shapes over the background
    draw, cover_draw = ImageDraw.Draw(big), ImageDraw.Draw(cover)
    masks = []
    for k, s in enumerate(scene.shapes):
        _draw_shape(draw, s, ss, tuple(colours[k]) if colours is not None else PALETTE[s.colour])
        _draw_shape(cover_draw, s, ss, 255)
        if with_masks:
            m = Image.new("L", big.size, 0)
            _draw_shape(ImageDraw.Draw(m), s, ss, 255)
            masks.append(np.asarray(m.resize((side, side), Image.BOX)) >= 128)
    fg = np.asarray(big.resize((side, side), Image.BOX), dtype=np.float32)
    alpha = np.asarray(cover.resize((side, side), Image.BOX), dtype=np.float32)[..., None] / 255.0
    bg = _background(scene.background, side)
    # The box filter averaged shape colour with black; undo that where the shape covers a pixel.
    colour_part = np.where(alpha > 0, fg / np.maximum(alpha, 1e-6), 0)
    out = alpha * colour_part + (1 - alpha) * bg
    image = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))
    return (image, masks) if with_masks else image


def any_colours(scene: Scene, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """One RGB per shape: its named colour half the time, else uniform over the RGB cube -- so that an
    autoencoder trained on them reconstructs colours no caption names (pink, teal) as well as the six."""
    return [
        PALETTE[s.colour] if rng.random() < 0.5 else tuple(int(v) for v in rng.integers(0, 256, 3))
        for s in scene.shapes
    ]


def _draw_shape(draw: ImageDraw.ImageDraw, s: Shape, scale: int, fill) -> None:
    x, y, r = s.x * scale, s.y * scale, s.r * scale
    if s.shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    else:
        draw.polygon(_polygon(s.shape, x, y, r), fill=fill)


def _background(bg: dict, side: int) -> np.ndarray:
    grey = float(bg["grey"])
    rng = np.random.default_rng(bg["seed"])
    base = np.full((side, side, 3), grey, dtype=np.float32)
    if bg["texture"] == "noise":
        base += rng.normal(0, 4.0, size=(side, side, 1)).astype(np.float32)
    elif bg["texture"] == "gradient":
        ramp = np.linspace(-1, 1, side, dtype=np.float32)
        angle = rng.uniform(0, 2 * math.pi)
        base += 10.0 * (np.cos(angle) * ramp[None, :, None] + np.sin(angle) * ramp[:, None, None])
    return base


def edge_map(image: Image.Image, low: int = 50, high: int = 150) -> Image.Image:
    """Canny edges (white on black), the control image of edge ControlNets."""
    import cv2

    edges = cv2.Canny(np.asarray(image.convert("L")), low, high)
    return Image.fromarray(edges)


def scene_mask(masks: list[np.ndarray], side: int) -> Image.Image:
    """Union of the shapes' masks (white = shape)."""
    union = np.zeros((side, side), dtype=bool)
    for m in masks:
        union |= m
    return Image.fromarray((union * 255).astype(np.uint8))
