"""`ldmkit eval`: how well a model draws what shapes-world prompts ask for, per sampling setting,
with the autoencoder's reconstructions of real renders as the ceiling."""

import itertools
import time
from contextlib import contextmanager

import numpy as np
import torch

from ldmkit.data.shapes import render, sample_scene
from ldmkit.errors import ConfigError
from ldmkit.evaluation.judge import ATTRIBUTES, judge
from ldmkit.evaluation.metrics import psnr, ssim
from ldmkit.images import pil_to_tensor, tensor_to_pil


def _accuracies(verdicts) -> dict:
    out = {}
    for attr in ATTRIBUTES:
        applicable = [v.checks[attr] for v in verdicts if attr in v.checks]
        out[attr] = round(float(np.mean(applicable)), 4) if applicable else None
    out["fully_correct"] = round(float(np.mean([v.correct for v in verdicts])), 4)
    return out


def prompt_kind(intent) -> str:
    """single (one shape), relation (two shapes in a stated relation), pair (two shapes), count (2-3 alike)."""
    if intent.relation is not None:
        return "relation"
    if len(intent.items) == 2:
        return "pair"
    return "count" if intent.items[0].count > 1 else "single"


def _by_kind(verdicts, kinds) -> dict:
    return {
        k: {"images": kinds.count(k), **_accuracies([v for v, kk in zip(verdicts, kinds) if kk == k])}
        for k in sorted(set(kinds))
    }


def _miss_kinds(verdicts) -> dict:
    kinds: dict[str, int] = {}
    for v in verdicts:
        for m in v.misses:
            kind = m.split(":")[0]
            kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


@contextmanager
def _time_calls(module):
    """Accumulate the wall time of a module's forward calls in the yielded dict's "seconds"."""
    record, start = {"seconds": 0.0}, {}

    def before(*_):
        start["t"] = time.perf_counter()

    def after(*_):
        record["seconds"] += time.perf_counter() - start["t"]

    handles = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield record
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def reconstruct(vae, image) -> tuple[torch.Tensor, torch.Tensor]:
    """(the image, its autoencoder round trip) as [1, 3, H, W] tensors in [-1, 1]: the ceiling's input."""
    x = pil_to_tensor(image, image.width, image.height)
    return x, vae.decode(vae.encode(x).mode()).clamp(-1, 1)


def ceiling(vae, scenes, shapes=None) -> dict:
    """The judge on the autoencoder's reconstructions of real renders, and their PSNR / SSIM."""
    verdicts, p, s = [], [], []
    for scene in scenes:
        x, rec = reconstruct(vae, render(scene))
        a, b = (x + 1) / 2, (rec + 1) / 2
        p.append(float(psnr(a, b)[0]))
        s.append(float(ssim(a, b)[0]))
        verdicts.append(judge(tensor_to_pil(rec)[0], scene.intent, shapes))
    return {
        "reconstructions": {
            **_accuracies(verdicts),
            "by_kind": _by_kind(verdicts, [prompt_kind(sc.intent) for sc in scenes]),
        },
        "misses": _miss_kinds(verdicts),
        "psnr": round(float(np.mean(p)), 2),
        "ssim": round(float(np.mean(s)), 4),
    }


def _scenes(split: str, n: int, seed: int, size: int, saying: set[str]) -> tuple[list[int], list]:
    """(indices, scenes): the split's first n scenes; with `saying`, the first n whose captions say one
    of those words (a new word is measured on the prompts that use it)."""
    indices, scenes = [], []
    for i in itertools.count():
        scene = sample_scene(split, i, seed, size)
        if not saying or saying & set(scene.caption.split(" ")):
            indices.append(i)
            scenes.append(scene)
            if len(scenes) == n:
                return indices, scenes
        if i >= 100 * n:
            raise ConfigError(f"split {split}: fewer than {n} of its first {i + 1} captions say {sorted(saying)}")


def say(caption: str, words: dict[str, str]) -> str:
    """The caption with each word in `words` (whole words only) said as its replacement."""
    return " ".join(words.get(w, w) for w in caption.split(" "))


def _run_settings(
    pipe, scenes, cfgs, steps, samplers, seeds_per_prompt, seed, progress, unet_time, loras, shapes, words, caches
):
    size = pipe.model.config.image_size
    # first-call costs, paid on a prompt the model knows (a closed vocabulary warns of words outside it)
    pipe(scenes[0].caption, steps=2, cfg=cfgs[0], sampler=samplers[0], seed=0, batch=seeds_per_prompt)
    settings = []
    for cfg, n_steps, sampler, cache in itertools.product(cfgs, steps, samplers, caches):
        verdicts, kinds, diversity, seconds = [], [], [], 0.0
        unet_time["seconds"] = 0.0
        for i, scene in enumerate(scenes):
            t = time.perf_counter()
            result = pipe(
                say(scene.caption, words),
                steps=n_steps,
                cfg=cfg,
                sampler=sampler,
                seed=seed + 1000 * i,
                batch=seeds_per_prompt,
                width=size,
                height=size,
                loras=loras,
                feature_cache=cache,
            )
            seconds += time.perf_counter() - t
            arrays = [np.asarray(im, dtype=np.float32) / 255 for im in result.images]
            verdicts += [judge(im, scene.intent, shapes) for im in result.images]
            kinds += [prompt_kind(scene.intent)] * len(result.images)
            if len(arrays) > 1:
                diversity.append(np.mean([np.abs(a - b).mean() for a, b in itertools.combinations(arrays, 2)]))
            if progress:
                progress()
        settings.append(
            {
                "cfg": cfg,
                "steps": n_steps,
                "sampler": sampler,
                **({"feature_cache": cache} if cache > 1 else {}),
                "images": len(verdicts),
                **_accuracies(verdicts),
                "by_kind": _by_kind(verdicts, kinds),
                "misses": _miss_kinds(verdicts),
                "diversity": round(float(np.mean(diversity)), 4) if diversity else None,
                "seconds_per_image": round(seconds / len(verdicts), 4),
                "unet_seconds_per_image": round(unet_time["seconds"] / len(verdicts), 4),
            }
        )
    return settings


def evaluate(
    pipe,
    split: str = "val",
    n: int = 50,
    cfgs=(7.0,),
    steps=(20,),
    samplers=("dpmpp_2m_karras",),
    seeds_per_prompt: int = 2,
    seed: int = 0,
    progress=None,
    loras=None,
    shapes=None,
    words=None,
    feature_caches=(1,),
) -> dict:
    """loras: (file, weight) pairs merged for every image; textual-inversion words are the caller's
    to load into `pipe.embeddings`. words: {caption word: what the prompt says instead} (a new word for
    a colour: the prompt says it, the judge still checks the colour; only prompts that say a word in
    `words` are measured). shapes: the judge's shape classes
    (default: the training world's and any the prompt names). feature_caches: DeepCache intervals to
    measure (1 = off)."""
    words = words or {}
    size = pipe.model.config.image_size
    indices, scenes = _scenes(split, n, seed, size, set(words))
    with _time_calls(pipe.model.unet) as unet_time:
        settings = _run_settings(
            pipe,
            scenes,
            cfgs,
            steps,
            samplers,
            seeds_per_prompt,
            seed,
            progress,
            unet_time,
            loras,
            shapes,
            words,
            tuple(feature_caches),
        )
    renders = [judge(render(s), s.intent, shapes) for s in scenes]
    render_kinds = [prompt_kind(sc.intent) for sc in scenes]
    return {
        "model": pipe.name,
        "loras": [[str(f), w] for f, w in loras or []],
        "embeddings": sorted(pipe.embeddings.vectors),
        "words": words,
        "judge_shapes": list(shapes) if shapes else "the world's and the prompt's",
        "split": split,
        "scenes": indices if words else f"0..{n - 1}",
        "prompts": n,
        "seeds_per_prompt": seeds_per_prompt,
        "image_size": size,
        "settings": settings,
        "judge_on_renders": {**_accuracies(renders), "by_kind": _by_kind(renders, render_kinds)},
        "ceiling": ceiling(pipe.model.vae, scenes[: min(n, 100)], shapes),
        "notes": "diversity: mean absolute pixel difference (0-1) between images of the same prompt; seconds per"
        " image: warm, model load excluded, batch = seeds per prompt (end to end, and the UNet calls alone)",
    }
