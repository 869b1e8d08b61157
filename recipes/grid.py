"""README pictures: generated images in a grid, each with its prompt (and setting) written under it.

Rows are prompts; columns are every combination of the variants asked for (a LoRA's weights, an
embedding off and on), step counts and seeds. Pixels are enlarged by an integer factor (nearest
neighbour, so nothing is smoothed) to leave room for the text.

    python recipes/grid.py --prompt "a red circle" --prompt "two green stars" --seeds 0,1 --out docs/x.png
"""

import argparse
import itertools
import textwrap

from PIL import Image, ImageDraw

from ldmkit.pipelines import Pipeline

LINE = 11  # pixels per line of Pillow's built-in font


def tile(image: Image.Image, text: str, scale: int) -> Image.Image:
    big = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    lines = [w for part in text.split("\n") for w in textwrap.wrap(part, max(8, big.width // 6))]
    out = Image.new("RGB", (big.width, big.height + LINE * len(lines) + 4), "white")
    out.paste(big, (0, 0))
    draw = ImageDraw.Draw(out)
    for k, line in enumerate(lines):
        draw.text((2, big.height + 2 + LINE * k), line, fill="black")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="default: the bundled model")
    ap.add_argument("--prompt", action="append", required=True)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", help="comma-separated; default: the model's chosen setting")
    ap.add_argument("--cfg", type=float)
    ap.add_argument("--sampler")
    ap.add_argument("--lora", help="a LoRA file; its weights from --lora-weights make columns")
    ap.add_argument("--lora-weights", default="1")
    ap.add_argument("--embedding", help="a textual-inversion file: columns without it, then with it")
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    pipe = Pipeline.load(args.model)
    steps = [int(s) for s in args.steps.split(",")] if args.steps else [pipe.defaults["steps"]]
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [(None, "")]
    if args.lora:
        variants = [([(args.lora, float(w))], f"LoRA {w}") for w in args.lora_weights.split(",")]
    if args.embedding:
        variants = [(None, "without embedding"), ("embedding", "with embedding")]
    rows = [[] for _ in args.prompt]
    for (variant, label), n, seed in itertools.product(variants, steps, seeds):
        if variant == "embedding" and not pipe.embeddings.vectors:
            pipe.embeddings.load(args.embedding)
        loras = variant if isinstance(variant, list) else None
        for row, prompt in zip(rows, args.prompt):
            result = pipe(prompt, steps=n, cfg=args.cfg, sampler=args.sampler, seed=seed, loras=loras)
            setting = ", ".join(x for x in (label, f"{n} steps" if len(steps) > 1 else "", f"seed {seed}") if x)
            row.append(tile(result.images[0], f"{prompt}\n{setting}", args.scale))
    w = max(t.width for r in rows for t in r)
    h = max(t.height for r in rows for t in r)
    grid = Image.new("RGB", (w * len(rows[0]), h * len(rows)), "white")
    for i, row in enumerate(rows):
        for j, t in enumerate(row):
            grid.paste(t, (j * w, i * h))
    grid.save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
