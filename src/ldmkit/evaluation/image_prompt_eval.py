"""Image prompts measured by the shapes judge: the prompt image is a render of a scene of the split, and
the output is judged against that scene (its shapes, colours, sizes, positions, relation, count).

- image alone: the empty text prompt and the render as the image prompt, at each scale;
- image against text: the text of one scene and the render of another (the next one of the split), at
  each scale -- how often the output is the text's scene and how often the image's: where the scale
  trades one for the other.
The text-prompt baseline is `ldmkit eval` of the same split; the ceiling, the judge on the renders."""

import numpy as np

from ldmkit.data.shapes import render
from ldmkit.evaluation.judge import judge
from ldmkit.evaluation.shapes_eval import _accuracies, _by_kind, _scenes, prompt_kind
from ldmkit.pipelines.image_prompt import ImagePromptInput


def evaluate_image_prompts(
    pipe, adapter, encoder, split="val", n=50, scales=(1.0,), cfg=3.0, steps=20, sampler=None, seed=0, progress=None
) -> dict:
    size = pipe.model.config.image_size
    _, scenes = _scenes(split, n, seed, size, set())
    renders = [render(s) for s in scenes]
    kinds = [prompt_kind(s.intent) for s in scenes]
    kw = dict(steps=steps, cfg=cfg, width=size, height=size, **({"sampler": sampler} if sampler else {}))
    rows = []
    for scale in scales:
        alone, text_side, image_side = [], [], []
        for i, scene in enumerate(scenes):
            other = (i + 1) % len(scenes)
            own = ImagePromptInput(adapter, encoder, [renders[i]], scale)
            image = pipe("", image_prompts=[own], seed=seed + 1000 * i, **kw).images[0]
            alone.append(judge(image, scene.intent))
            theirs = ImagePromptInput(adapter, encoder, [renders[other]], scale)
            mixed = pipe(scene.caption, image_prompts=[theirs], seed=seed + 1000 * i, **kw).images[0]
            text_side.append(judge(mixed, scene.intent).correct)
            image_side.append(judge(mixed, scenes[other].intent).correct)
            if progress:
                progress()
        rows.append(
            {
                "scale": scale,
                "image_alone": {**_accuracies(alone), "by_kind": _by_kind(alone, kinds)},
                "image_against_text": {
                    "text_scene_fully_correct": round(float(np.mean(text_side)), 4),
                    "image_scene_fully_correct": round(float(np.mean(image_side)), 4),
                },
            }
        )
    truth = [judge(r, s.intent) for r, s in zip(renders, scenes)]
    return {
        "model": pipe.name,
        "split": split,
        "prompts": n,
        "cfg": cfg,
        "steps": steps,
        "sampler": sampler or pipe.defaults["sampler"],
        "scales": rows,
        "judge_on_renders": _accuracies(truth),
        "notes": "image alone: empty text, the scene's render as the image prompt; image against text: the text of"
        " scene i, the render of scene i+1; one image per scene and scale, seed + 1000 i",
    }
