"""How much of the shapes world an autoencoder keeps, by the judge: reconstruct the first N true renders
of each split and judge each against its prompt (all five shapes in the judge's vocabulary). Prints, per
autoencoder and split, the fully-correct share (one-shape and relation prompts apart), the star shape
misses, PSNR and SSIM. An autoencoder is `bundled` (the shipped shapes model's), an autoencoder file, or a
training run folder (its latest checkpoint, or the one named: RUN/checkpoints/step-N.pt). Novel colours
and shapes (pink, teal, diamond) are the splits no training data names.

    python benchmarks/autoencoder_ceiling.py N SPLITS NAME=AUTOENCODER ...
    python benchmarks/autoencoder_ceiling.py 400 val,heldout,pink,teal,diamond f4=~/runs/shapes-f4-ae
"""

import json
import sys
from pathlib import Path

import torch

from ldmkit.data.shapes import ALL_SHAPES, sample_scene
from ldmkit.evaluation.shapes_eval import ceiling


def load(spec: str):
    from ldmkit.checkpoints.single_file import load_vae_file
    from ldmkit.config import from_dict
    from ldmkit.models.autoencoder import AutoencoderConfig, AutoencoderKL
    from ldmkit.pipelines import Pipeline

    if spec == "bundled":
        return Pipeline.load(None).model.vae, "bundled"
    path = Path(spec).expanduser()
    if path.is_dir():  # a run folder: its newest checkpoint
        path = sorted((path / "checkpoints").glob("step-*.pt"))[-1]
    if path.suffix != ".pt":
        return load_vae_file(path), path.name
    run = path.parent.parent
    config = from_dict(AutoencoderConfig, json.loads((run / "config.json").read_text())["model"], str(run))
    vae = AutoencoderKL(config)
    vae.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["task"]["vae"])
    return vae.eval(), f"{run.name}/{path.stem}"


def main() -> None:
    n, splits, specs = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3:]
    torch.set_num_threads(1)
    for spec in specs:
        name, _, where = spec.partition("=")
        vae, label = load(where)
        for split in splits:
            scenes = [sample_scene(split, i) for i in range(n)]
            c = ceiling(vae, scenes, ALL_SHAPES)
            r = c["reconstructions"]
            row = {
                "autoencoder": name,
                "weights": label,
                "split": split,
                "n": n,
                "fully_correct": r["fully_correct"],
                "by_kind": {k: v["fully_correct"] for k, v in r["by_kind"].items()},
                "misses": c["misses"],
                "psnr": c["psnr"],
                "ssim": c["ssim"],
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
