"""README's first command, judged: "a red circle above a blue square" on seeds 0-3 (image i of the batch
has seed i, as `ldmkit generate --seed i` draws it), each image judged (colours, shapes, the relation) and
the verdicts printed as one JSON line, with a grid of the four images when --out is given. A model is a
bundled name or a file (a run's model.safetensors); steps, cfg and sampler default to the model's own.

    python benchmarks/first_prompt.py [MODEL] [--steps N] [--cfg W] [--sampler S] [--out grid.png]
    python benchmarks/first_prompt.py shapes-fast
    python benchmarks/first_prompt.py ~/runs/shapes-f2-ldm/model.safetensors --steps 20 --cfg 2 --sampler euler_a
"""

import argparse
import json

import torch

from ldmkit.data.shapes import Intent, Item
from ldmkit.evaluation.judge import judge
from ldmkit.images import image_grid
from ldmkit.pipelines import Pipeline

PROMPT = "a red circle above a blue square"
INTENT = Intent([Item("circle", "red"), Item("square", "blue")], (0, "above", 1))
SEEDS = 4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="shapes")
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg", type=float)
    p.add_argument("--sampler")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="a PNG grid of the four images, seeds 0-3 left to right")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = Pipeline.load(args.model)
    result = pipe(PROMPT, seed=0, batch=SEEDS, steps=args.steps, cfg=args.cfg, sampler=args.sampler)
    verdicts = [judge(image, INTENT) for image in result.images]
    print(
        json.dumps(
            {
                "model": args.model,
                "prompt": PROMPT,
                "settings": {"steps": args.steps, "cfg": args.cfg, "sampler": args.sampler},
                "right": sum(v.correct for v in verdicts),
                "of": SEEDS,
                "misses": {seed: v.misses for seed, v in enumerate(verdicts) if not v.correct},
            }
        )
    )
    if args.out:
        image_grid(result.images, rows=1).save(args.out)


if __name__ == "__main__":
    main()
