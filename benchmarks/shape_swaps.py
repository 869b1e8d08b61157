"""How a model gets two-shape scenes' shapes wrong: the first N two-shape scenes of a split (a relation or
a plain pair), SEEDS images each, judged; every image with a shape wrong is counted as a *swap* when it
shows the caption's two colours and two shapes with the shapes exchanged between the colours (for a
held-out scene that trades a colour-shape pair training never shows for ones it does: "a red star above a
green circle" drawn as a green star and a red circle), and as *other* when not. Prints one JSON line; with
--list, also each wrong image's caption and what the judge found.

    python benchmarks/shape_swaps.py MODEL [--split heldout] [--n 100] [--seeds 2] [--steps S --cfg W --sampler X]
"""

import argparse
import json
from collections import Counter

import torch

from ldmkit.data.shapes import sample_scene
from ldmkit.evaluation.judge import judge
from ldmkit.pipelines import Pipeline


def is_swap(wanted: list[tuple[str, str]], found: list[tuple[str, str]]) -> bool:
    """(colour, shape) pairs: found holds the wanted colours, each with the other one's shape."""
    (c1, s1), (c2, s2) = wanted
    return c1 != c2 and s1 != s2 and sorted(found) == sorted([(c1, s2), (c2, s1)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--split", default="heldout")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--seed", type=int, default=1, help="scene seed (eval's --seed)")
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg", type=float)
    p.add_argument("--sampler")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--list", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = Pipeline.load(args.model)
    counts, i, scenes = Counter(), 0, 0
    while scenes < args.n:
        scene = sample_scene(args.split, i, args.seed)
        i += 1
        if len(scene.intent.items) != 2:
            continue
        scenes += 1
        wanted = [(item.colour, item.shape) for item in scene.intent.items]
        result = pipe(
            scene.caption, seed=1000 * i, batch=args.seeds, steps=args.steps, cfg=args.cfg, sampler=args.sampler
        )
        for image in result.images:
            verdict = judge(image, scene.intent)
            found = [(d.colour, d.shape) for d in verdict.detections]
            kind = "shape right" if verdict.checks.get("shape", True) else "swap" if is_swap(wanted, found) else "other"
            counts[kind] += 1
            if args.list and kind != "shape right":
                print(f"{kind}: {scene.caption} | found {', '.join(' '.join(f) for f in sorted(found))}")
    settings = {"steps": args.steps, "cfg": args.cfg, "sampler": args.sampler}
    print(json.dumps({"model": args.model, "split": args.split, "scenes": scenes, "settings": settings, **counts}))


if __name__ == "__main__":
    main()
