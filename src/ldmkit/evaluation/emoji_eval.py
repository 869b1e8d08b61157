"""`ldmkit eval-emoji`: the emoji model measured without an exact judge.

A small classifier trained on the training set's own labels (style, category; evaluation/features.py)
gives the feature space. For each guidance scale, one set of generations from training captions and one
from the held-out (emoji, style) pairs' captions (the same captions and seeds at every scale) give:
- prompt -> content: recall@1 and @5 of the prompted emoji's name among the generations' nearest
  training images;
- generalisation: for held-out pairs, whether the nearest training images have the asked name (the emoji
  is in training in the other style) and whether the style head says the asked style; the ceilings
  beside: the same nearest-neighbour rule applied to the held-out real images, and the style head's
  accuracy on them;
- the Fréchet distance between generated and training images, with two real-vs-real floors: training vs
  held-out images, and as many training images as each generated set vs the other training images (the
  same sample size: the distance's bias grows as samples shrink);
- memorisation: the generations' median distance to their nearest training image, against held-out real
  images' (which no model saw) and training images' to each other."""

import time
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
from ldmkit.images import load_image, pil_to_tensor

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
    held_names = torch.tensor([name_of[r["name"]] for r in held_r])
    f_train = embed(net, train_x)
    f_held = embed(net, held_x)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(train_c), size=min(fd_samples, len(train_c)), replace=False)
    rest = np.setdiff1d(np.arange(len(train_c)), pick)
    held_dist, held_idx = nearest(f_held, f_train, k=5)
    train_dist, _ = nearest(f_train[:2000], f_train, k=1, exclude_self=True)
    report: dict = {
        "train_images": len(train_x),
        "heldout_images": len(held_x),
        "classifier": {
            k: {"heldout_accuracy": round(accuracy(net, held, k), 4), "classes": len(v)} for k, v in classes.items()
        },
        "real": {
            "fd_train_vs_heldout": round(frechet_distance(f_train.numpy(), f_held.numpy()), 4),
            # a second floor at the generated sets' sample size (203 held-out images bias the first upwards)
            "fd_train_split": round(frechet_distance(f_train[pick].numpy(), f_train[rest].numpy()), 4)
            if len(rest) > 1
            else None,
            "heldout_name_recall@1": round(recall_at(held_names, train_names, held_idx, 1), 4),
            "heldout_name_recall@5": round(recall_at(held_names, train_names, held_idx, 5), 4),
            "median_nn_distance_heldout": round(float(held_dist[:, 0].median()), 4),
            "median_nn_distance_train_to_train": round(float(train_dist[:, 0].median()), 4),
        },
        "generated": {"prompts": len(pick), "heldout_prompts": len(held_c), "steps": steps, "sampler": sampler},
        "by_cfg": {},
    }
    want = train_names[torch.as_tensor(pick)]
    seconds, images = 0.0, 0
    for cfg in cfgs:
        t = time.perf_counter()
        gen = _generate(pipe, [train_c[i] for i in pick], cfg, steps, sampler, seed, size, progress)
        gen_held = _generate(pipe, held_c, cfg, steps, sampler, seed + 100_000, size, progress)
        seconds, images = seconds + time.perf_counter() - t, images + len(gen) + len(gen_held)
        f_gen, f_gen_held = embed(net, gen), embed(net, gen_held)
        dist, idx = nearest(f_gen, f_train, k=5)
        _, idx_held = nearest(f_gen_held, f_train, k=5)
        report["by_cfg"][str(cfg)] = {
            "fd": round(frechet_distance(f_gen.numpy(), f_train.numpy()), 4),
            "recall@1": round(recall_at(want, train_names, idx, 1), 4),
            "recall@5": round(recall_at(want, train_names, idx, 5), 4),
            "median_nn_distance": round(float(dist[:, 0].median()), 4),
            "heldout_name_recall@1": round(recall_at(held_names, train_names, idx_held, 1), 4),
            "heldout_name_recall@5": round(recall_at(held_names, train_names, idx_held, 5), 4),
            # the held-out real images' labels, scored on their generated stand-ins
            "heldout_style_accuracy": round(accuracy(net, Labelled(gen_held, held.labels, classes), "style"), 4),
        }
    report["generated"]["seconds_per_image"] = round(seconds / max(images, 1), 4)
    return report
