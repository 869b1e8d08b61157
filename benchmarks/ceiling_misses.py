"""What the autoencoder's reconstructions lose, by the judge: reconstruct N true renders of a split
with the bundled model's autoencoder, judge each against its prompt, and count the misses by kind and
by the shape asked for (docs/models.md). AUTOENCODER: as benchmarks/autoencoder_ceiling.py reads it
(default: the bundled model's). With SHEET, the first eight scenes with a shape miss are drawn into it,
each true render beside its reconstruction, two pairs a row, at twice their size.

    python benchmarks/ceiling_misses.py [N] [SPLIT] [AUTOENCODER] [SHEET]
"""

import collections
import json
import sys

from PIL import Image

from ldmkit.data.shapes import render, sample_scene
from ldmkit.evaluation.judge import judge, shape_wanted
from ldmkit.evaluation.shapes_eval import reconstruct
from ldmkit.images import image_grid, tensor_to_pil
from ldmkit.pipelines import Pipeline


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    split = sys.argv[2] if len(sys.argv) > 2 else "val"
    if len(sys.argv) > 3:
        from autoencoder_ceiling import load  # the benchmark beside this one

        vae = load(sys.argv[3])[0]
    else:
        vae = Pipeline.load(None).model.vae
    misses, wrong, pairs = collections.Counter(), 0, []
    for i in range(n):
        scene = sample_scene(split, i)
        true = render(scene)
        rec = tensor_to_pil(reconstruct(vae, true)[1])[0]
        verdict = judge(rec, scene.intent)
        wrong += not verdict.correct
        if any(m.startswith("shape") for m in verdict.misses):
            pairs.append((true, rec))
        for m in verdict.misses:
            kind = m.split(":")[0]
            asked = shape_wanted(m) or ""
            misses[f"{kind} {asked}".strip()] += 1
    print(json.dumps({"split": split, "reconstructions": n, "not_fully_correct": wrong, "misses": dict(misses)}))
    if len(sys.argv) > 4:
        rows = [[*pairs[k], *pairs[k + 1]] for k in range(0, min(len(pairs), 8) - 1, 2)]  # two pairs a row
        sheet = image_grid(rows)
        sheet.resize((2 * sheet.width, 2 * sheet.height), Image.NEAREST).save(sys.argv[4])


if __name__ == "__main__":
    main()
