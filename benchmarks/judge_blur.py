"""How sharp an autoencoder's reconstructions must be for the judge: the first N true renders of a split,
each blurred by a Gaussian of SIGMA pixels, judged against their prompts (all five shapes in the judge's
vocabulary). Prints one JSON line per sigma: the fully-correct share and the shape misses where a star
was wanted. An autoencoder's ceiling (benchmarks/autoencoder_ceiling.py) read against these lines gives
the blur its reconstructions are worth.

    python benchmarks/judge_blur.py N SPLIT SIGMA ...
    python benchmarks/judge_blur.py 200 val 0 0.6 0.8 1.0
"""

import json
import sys

from PIL import ImageFilter

from ldmkit.data.shapes import ALL_SHAPES, render, sample_scene
from ldmkit.evaluation.judge import judge, shape_wanted


def main() -> None:
    n, split, sigmas = int(sys.argv[1]), sys.argv[2], [float(s) for s in sys.argv[3:]]
    scenes = [sample_scene(split, i) for i in range(n)]
    renders = [render(scene) for scene in scenes]
    for sigma in sigmas:
        correct = star_misses = 0
        for scene, image in zip(scenes, renders):
            verdict = judge(image.filter(ImageFilter.GaussianBlur(sigma)) if sigma else image, scene.intent, ALL_SHAPES)
            correct += verdict.correct
            star_misses += sum(shape_wanted(m) == "star" for m in verdict.misses)
        row = {"split": split, "n": n, "sigma": sigma, "fully_correct": round(correct / n, 4)}
        print(json.dumps({**row, "star_shape_misses": star_misses}), flush=True)


if __name__ == "__main__":
    main()
