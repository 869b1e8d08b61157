"""`ldmkit eval-emoji`: the emoji model measured without an exact judge (issue #11).

A small classifier trained on the training set's own labels (style, category; evaluation/features.py)
gives the feature space. In it:
- prompt -> content: for training captions, the nearest training images of each generation; recall@1
  and @5 of the prompted emoji's name;
- generalisation: for held-out (emoji, style) pairs, whether the nearest training image has the asked
  name (the emoji exists in training in the other style), and whether the style head says the asked
  style (its own accuracy on the held-out real images is reported beside);
- the Fréchet distance between generated and training images per guidance scale, with the distance
  between the training and held-out real images as the floor;
- memorisation: each generation's distance to its nearest training image, against the same for
  held-out real images (which no model saw)."""

from pathlib import Path

import numpy as np
import torch

from ldmkit.errors import ConfigError
from ldmkit.evaluation.features import (
    Labelled,
    accuracy,
    embed,
    frechet_distance,
    nearest,
    recall_at,
    train_classifier,
)
from ldmkit.pipelines.images import load_image, pil_to_tensor

CHUNK = 32


def parse_caption(caption: str) -> dict[str, str]:
    """ "thumbs up, medium skin tone, people & body, noto style" -> name, full name, category, style."""
    parts = [p.strip() for p in caption.split(",")]
    if len(parts) < 3 or not parts[-1].endswith(" style"):
        raise ConfigError(f"caption {caption!r}: expected 'NAME, CATEGORY, STYLE style' (ldmkit emoji-data)")
    return {
        "name": parts[0],
        "full": ", ".join(parts[:-2]),
        "category": parts[-2],
        "style": parts[-1][: -len(" style")],
    }


def load_set(folder: Path, size: int, limit: int | None = None) -> tuple[torch.Tensor, list[dict], list[str]]:
    files = sorted(folder.glob("*.png"))[:limit]
    if not files:
        raise ConfigError(f"{folder}: no images (run ldmkit emoji-data first)")
    captions = [f.with_suffix(".txt").read_text().strip() for f in files]
    images = torch.cat([pil_to_tensor(load_image(f), size, size) for f in files])
    return images, [parse_caption(c) for c in captions], captions


def _labels(records: list[dict], key: str, classes: list[str]) -> torch.Tensor:
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index.get(r[key], -1) for r in records])


def _generate(pipe, captions: list[str], cfg: float, steps: int, sampler: str, seed: int, size: int, progress):
    """Caption i's image with seed + i, CHUNK prompts per call (a batch keeps the CPU busier than one)."""
    out = []
    for start in range(0, len(captions), CHUNK):
        part = captions[start : start + CHUNK]
        result = pipe(part, steps=steps, cfg=cfg, sampler=sampler, seed=seed + start, width=size, height=size)
        out += [pil_to_tensor(image, size, size) for image in result.images]
        for _ in part if progress else ():
            progress()
    return torch.cat(out)


def evaluate_emoji(
    pipe,
    data: Path,
    n: int = 200,
    fd_samples: int = 2000,
    cfgs=(1.0, 3.0, 5.0, 7.5),
    steps: int = 20,
    sampler: str = "dpmpp_2m_karras",
    classifier_steps: int = 3000,
    seed: int = 0,
    progress=None,
) -> dict:
    size = pipe.model.config.image_size
    train_x, train_r, train_c = load_set(data / "train", size)
    held_x, held_r, held_c = load_set(data / "heldout", size)
    classes = {k: sorted({r[k] for r in train_r}) for k in ("style", "category")}
    labelled = Labelled(train_x, {k: _labels(train_r, k, v) for k, v in classes.items()}, classes)
    net = train_classifier(labelled, steps=classifier_steps, seed=seed)
    held = Labelled(held_x, {k: _labels(held_r, k, v) for k, v in classes.items()}, classes)
    names = sorted({r["name"] for r in train_r + held_r})
    name_of = {c: i for i, c in enumerate(names)}
    train_names = torch.tensor([name_of[r["name"]] for r in train_r])
    f_train = embed(net, train_x)
    f_held = embed(net, held_x)
    report: dict = {
        "train_images": len(train_x),
        "heldout_images": len(held_x),
        "classifier": {
            k: {"heldout_accuracy": round(accuracy(net, held, k), 4), "classes": len(v)} for k, v in classes.items()
        },
        "floor_fd_train_vs_heldout": round(frechet_distance(f_train.numpy(), f_held.numpy()), 4),
    }
    rng = np.random.default_rng(seed)
    default_cfg = pipe.defaults["cfg"]
    # prompt -> content, on training captions
    pick = rng.choice(len(train_c), size=min(n, len(train_c)), replace=False)
    gen = _generate(pipe, [train_c[i] for i in pick], default_cfg, steps, sampler, seed, size, progress)
    f_gen = embed(net, gen)
    dist, idx = nearest(f_gen, f_train, k=5)
    want = train_names[torch.as_tensor(pick)]
    report["prompt_to_content"] = {
        "prompts": len(pick),
        "cfg": default_cfg,
        "recall@1": round(recall_at(want, train_names, idx, 1), 4),
        "recall@5": round(recall_at(want, train_names, idx, 5), 4),
    }
    # memorisation: generations' nearest training distance vs held-out real images'
    held_dist, _ = nearest(f_held, f_train, k=1)
    train_dist, _ = nearest(f_train[:2000], f_train, k=1, exclude_self=True)
    report["memorisation"] = {
        "median_nn_distance_generated": round(float(dist[:, 0].median()), 4),
        "median_nn_distance_heldout_real": round(float(held_dist[:, 0].median()), 4),
        "median_nn_distance_train_to_train": round(float(train_dist[:, 0].median()), 4),
    }
    # generalisation: held-out (emoji, style) pairs
    gen = _generate(pipe, held_c, default_cfg, steps, sampler, seed, size, progress)
    f_gen = embed(net, gen)
    _, idx = nearest(f_gen, f_train, k=5)
    want = torch.tensor([name_of[r["name"]] for r in held_r])
    with torch.no_grad():
        style = torch.cat([net(gen[i : i + 256])["style"] for i in range(0, len(gen), 256)]).argmax(1)
    report["heldout_pairs"] = {
        "prompts": len(held_c),
        "name_recall@1": round(recall_at(want, train_names, idx, 1), 4),
        "name_recall@5": round(recall_at(want, train_names, idx, 5), 4),
        "style_accuracy": round(float((style == _labels(held_r, "style", classes["style"])).float().mean()), 4),
    }
    # fidelity / diversity across guidance scales
    report["fd_by_cfg"] = {}
    pick = rng.choice(len(train_c), size=min(fd_samples, len(train_c)), replace=False)
    for cfg in cfgs:
        gen = _generate(pipe, [train_c[i] for i in pick], cfg, steps, sampler, seed + 10_000, size, progress)
        report["fd_by_cfg"][str(cfg)] = round(frechet_distance(embed(net, gen).numpy(), f_train.numpy()), 4)
    return report
