"""Does a shapes model read a relation stated either way? The first N two-shape relation scenes of a split
are each prompted twice: as "above" / "to the left of" (the upper or left shape named first) and as the
converse "below" / "to the right of" (it named second). Each prompt is drawn on seeds 0..S-1 (image i of a
batch has seed i), each image judged; printed per form as one JSON line: the share whose relation is right
between the shapes found for its two items (the judge's relation check) and the share fully correct.

    python benchmarks/relation_forms.py [MODEL] [--n 40] [--seeds 2] [--split val] [--steps N] [--cfg W]
        [--sampler S] [--threads 2]
    python benchmarks/relation_forms.py ~/runs/RUN/model.safetensors --steps 20 --cfg 2 --sampler euler_a
"""

import argparse
import json

import numpy as np
import torch

from ldmkit.data.shapes import canonical, caption_for, converse, sample_scene
from ldmkit.evaluation.judge import judge
from ldmkit.pipelines import Pipeline


def relation_scenes(split: str, n: int):
    """The first n scenes of the split whose caption states a relation, in index order."""
    found, i = [], 0
    while len(found) < n:
        scene = sample_scene(split, i)
        if scene.intent.relation is not None:
            found.append((i, scene))
        i += 1
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="shapes")
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--split", default="val")
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg", type=float)
    p.add_argument("--sampler")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = Pipeline.load(args.model)
    tally = {form: {"relation": 0, "fully": 0, "images": 0} for form in ("named first", "named second")}
    for i, scene in relation_scenes(args.split, args.n):
        first = canonical(scene.intent)  # the upper or left shape named first
        for form, intent in (("named first", first), ("named second", converse(first))):
            prompt = caption_for(intent, np.random.default_rng(i)).removeprefix("there is ")
            result = pipe(prompt, seed=0, batch=args.seeds, steps=args.steps, cfg=args.cfg, sampler=args.sampler)
            t = tally[form]
            for image in result.images:
                v = judge(image, intent)
                t["relation"] += bool(v.checks.get("relation"))
                t["fully"] += v.correct
                t["images"] += 1
    report = {form: {k: round(100 * t[k] / t["images"], 1) for k in ("relation", "fully")} for form, t in tally.items()}
    settings = {"steps": args.steps, "cfg": args.cfg, "sampler": args.sampler, "n": args.n, "seeds": args.seeds}
    print(json.dumps({"model": args.model, "split": args.split, "settings": settings, **report}))


if __name__ == "__main__":
    main()
