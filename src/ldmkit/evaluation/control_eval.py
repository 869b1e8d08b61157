"""How well a ControlNet controls: on shapes-world prompts, the edge F-score (2-pixel tolerance)
between the control edges (Canny of the true render) and the edges of the generated image, with
control and without, against the ceiling -- the same score for the autoencoder's reconstruction of
the true render, since nothing decoded by that autoencoder can do better. The judge checks that
control does not cost prompt adherence."""

import numpy as np

from ldmkit.data.shapes import render, sample_scene
from ldmkit.evaluation.judge import judge
from ldmkit.evaluation.metrics import edge_fscore
from ldmkit.evaluation.shapes_eval import _accuracies, _by_kind, prompt_kind, reconstruct
from ldmkit.images import tensor_to_pil
from ldmkit.pipelines.control import ControlInput, canny


def edges(image) -> np.ndarray:
    return np.asarray(canny(image).convert("L")) > 0


def _mean(rows: list[dict]) -> dict:
    return {k: round(float(np.mean([r[k] for r in rows])), 4) for k in ("precision", "recall", "f")}


def evaluate_control(
    pipe,
    net,
    split: str = "heldout",
    n: int = 50,
    cfg: float = 5.0,
    steps: int = 20,
    sampler: str = "dpmpp_2m_karras",
    strength: float = 1.0,
    seed: int = 0,
    progress=None,
    grid_rows: int = 0,
) -> tuple[dict, list]:
    """(report, the first `grid_rows` rows of [control, without, with] pictures)."""
    size = pipe.model.config.image_size
    vae = pipe.model.vae
    scores = {"with": [], "without": [], "ceiling": []}
    verdicts = {"with": [], "without": []}
    kinds, pictures = [], []
    for i in range(n):
        scene = sample_scene(split, i, seed, size)
        truth = render(scene)
        target = edges(truth)
        settings = dict(steps=steps, cfg=cfg, sampler=sampler, seed=seed + 1000 * i, width=size, height=size)
        controlled = pipe(scene.caption, control=[ControlInput(net, truth, "canny", strength)], **settings)
        plain = pipe(scene.caption, **settings)
        for name, result in (("with", controlled), ("without", plain)):
            scores[name].append(edge_fscore(edges(result.images[0]), target))
            verdicts[name].append(judge(result.images[0], scene.intent))
        rec = tensor_to_pil(reconstruct(vae, truth)[1])[0]
        scores["ceiling"].append(edge_fscore(edges(rec), target))
        kinds.append(prompt_kind(scene.intent))
        if i < grid_rows:
            pictures.append([controlled.control_images[0], plain.images[0], controlled.images[0]])
        if progress:
            progress()
    edge = {name: _mean(rows) for name, rows in scores.items()}
    report = {
        "split": split,
        "prompts": n,
        "settings": {"cfg": cfg, "steps": steps, "sampler": sampler, "strength": strength, "seed": seed},
        "edge_f": edge,
        "with_over_ceiling": round(edge["with"]["f"] / edge["ceiling"]["f"], 4) if edge["ceiling"]["f"] else None,
        "judge": {name: {**_accuracies(v), "by_kind": _by_kind(v, kinds)} for name, v in verdicts.items()},
        "notes": "edge_f: Canny edges of each image vs those of the true render, matched within 2 pixels",
    }
    return report, pictures
