"""The hires fix on the bundled `shapes` model, by the judge: three ways to a 128x128 image from the
same prompts (the `val` split's first N scenes, as `ldmkit eval` draws them) and the same seeds.

    python benchmarks/hires_fix.py [--n 100] [--seed 1] [--threads 2] [--methods ...] [--log FILE]

Methods (the model's own settings, Pipeline.load(None).defaults, for every pass):
  hires_latent_0.6   64 -> 128 hires fix, upscaler "Latent" (the default), strength 0.6
  hires_latent_0.4   the same, strength 0.4
  hires_lanczos_0.6  the same with the pixel upscaler "Lanczos", strength 0.6
  plain_128          plain generation at width = height = 128
  lanczos_128        plain 64x64 generation, upscaled to 128 with PIL Lanczos
  plain_64           plain 64x64 generation (the reference: the model's own size)

The judge reads proportions of the image side, but its shape rules were tuned on 64x64 renders, so the
headline numbers judge each 128x128 image after resizing it to 64x64 with PIL Lanczos (`judge_64`);
`judge_128` is the judge on the 128x128 image as it is. `judge_on_renders` runs both on true renders
of the same scenes. Seconds per image: warm (a warm-up call at each size first), end to end, batch 1,
mean and median; the methods run interleaved, prompt by prompt. `vs_plain_64`: prompts a method gets
fully correct that plain 64x64 does not (gained), and the reverse (lost). Prints JSON; the load
average (1, 5, 15 min) at the start and the end says whether something shared the CPU."""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import json  # noqa: E402

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ldmkit.data.shapes import render  # noqa: E402
from ldmkit.evaluation.judge import Verdict, judge  # noqa: E402
from ldmkit.evaluation.shapes_eval import _accuracies, _by_kind, _scenes, prompt_kind  # noqa: E402
from ldmkit.pipelines import Pipeline  # noqa: E402

METHODS = {
    # name: (keyword arguments of the pipeline call, upscale the 64x64 result with Lanczos after)
    "hires_latent_0.6": ({"hires_scale": 2, "strength": 0.6, "hires_upscaler": "Latent"}, False),
    "hires_latent_0.4": ({"hires_scale": 2, "strength": 0.4, "hires_upscaler": "Latent"}, False),
    "hires_lanczos_0.6": ({"hires_scale": 2, "strength": 0.6, "hires_upscaler": "Lanczos"}, False),
    "plain_128": ({"width": 128, "height": 128}, False),
    "lanczos_128": ({}, True),
    "plain_64": ({}, False),
}
JUDGE_SIZE = 64  # the model's (and the judge's) native size
RESAMPLE = Image.LANCZOS


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def to_judge_size(image: Image.Image) -> Image.Image:
    return image if image.size[0] == JUDGE_SIZE else image.resize((JUDGE_SIZE, JUDGE_SIZE), RESAMPLE)


def summary(verdicts, kinds) -> dict:
    acc = _accuracies(verdicts)
    return {
        "fully_correct": acc.pop("fully_correct"),
        "by_attribute": acc,
        "by_kind": {
            k: {"images": v["images"], "fully_correct": v["fully_correct"]}
            for k, v in _by_kind(verdicts, kinds).items()
        },
    }


def method_report(name, v64, v128, kinds, seconds, image_size) -> dict:
    return {
        "image_size": image_size,
        "images": len(v64),
        "judge_64": summary(v64, kinds),
        "judge_128": summary(v128, kinds) if image_size != JUDGE_SIZE else "same as judge_64",
        "seconds_per_image": round(statistics.mean(seconds), 3),
        "seconds_per_image_median": round(statistics.median(seconds), 3),
    }


def run(pipe, methods, scenes, seed, size, log: Path | None) -> dict:
    """Every method on every prompt, the methods interleaved prompt by prompt (so a neighbour's load
    falls on all of them alike). With a log (JSON lines, one per image), images already in it are not
    made again: a killed run resumes."""
    done = {}
    if log is not None and log.exists():
        for line in log.read_text().splitlines():
            r = json.loads(line)
            if r["seed"] == seed + 1000 * r["i"]:
                done[(r["i"], r["method"])] = r
    todo = [m for m in methods if any((i, m) not in done for i in range(len(scenes)))]
    for m in todo:  # first-call costs at each size
        kwargs, _ = METHODS[m]
        pipe(scenes[0].caption, steps=2, seed=0, **kwargs)
    rec = {m: {"v64": [], "v128": [], "seconds": [], "size": 0} for m in methods}
    for i, scene in enumerate(scenes):
        for m in methods:
            r = done.get((i, m))
            if r is None:
                kwargs, lanczos = METHODS[m]
                t, cpu = time.perf_counter(), time.process_time()
                image = pipe(scene.caption, seed=seed + 1000 * i, **kwargs).images[0]
                if lanczos:
                    image = image.resize((2 * size, 2 * size), Image.LANCZOS)
                r = {
                    "i": i,
                    "method": m,
                    "seed": seed + 1000 * i,
                    "size": image.size[0],
                    "seconds": round(time.perf_counter() - t, 4),
                    "cpu_seconds": round(time.process_time() - cpu, 4),
                    "checks_64": judge(to_judge_size(image), scene.intent).checks,
                    "checks_128": judge(image, scene.intent).checks,
                }
                if log is not None:
                    with log.open("a") as f:
                        f.write(json.dumps(r) + "\n")
            rec[m]["seconds"].append(r["seconds"])
            rec[m]["v64"].append(Verdict(checks=r["checks_64"]))
            rec[m]["v128"].append(Verdict(checks=r["checks_128"]))
            rec[m]["size"] = r["size"]
        if (i + 1) % 10 == 0:
            print(f"{i + 1}/{len(scenes)} prompts, load {load()}", file=sys.stderr, flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="prompts (the val split's first N scenes), one seed each")
    ap.add_argument("--seed", type=int, default=1, help="scene seed; image i uses seed + 1000 i (as ldmkit eval)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log", type=Path, help="JSON lines, one per image; a rerun with the same log resumes")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
    args = ap.parse_args()
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            sys.exit(f"unknown method {m!r}; allowed: {', '.join(METHODS)}")
    torch.set_num_threads(args.threads)
    started, load_start = datetime.now(timezone.utc), load()

    pipe = Pipeline.load(None)
    size = pipe.model.config.image_size
    _, scenes = _scenes("val", args.n, args.seed, size, set())
    kinds = [prompt_kind(s.intent) for s in scenes]
    renders = [render(s) for s in scenes]
    big = [r.resize((2 * size, 2 * size), Image.LANCZOS) for r in renders]
    rec = run(pipe, methods, scenes, args.seed, size, args.log)
    results = {m: method_report(m, r["v64"], r["v128"], kinds, r["seconds"], r["size"]) for m, r in rec.items()}
    correct = {m: [v.correct for v in r["v64"]] for m, r in rec.items()}
    if "plain_64" in correct:  # paired against the model's own size: prompts gained / lost
        for m in methods:
            if m != "plain_64":
                pairs = list(zip(correct[m], correct["plain_64"]))
                results[m]["vs_plain_64"] = {
                    "gained": sum(a and not b for a, b in pairs),
                    "lost": sum(b and not a for a, b in pairs),
                }

    report = {
        "command": " ".join(["python", "benchmarks/hires_fix.py", *sys.argv[1:]]),
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "minutes": round((datetime.now(timezone.utc) - started).total_seconds() / 60, 1),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "loadavg_1_5_15": {"start": load_start, "end": load()},
        "model": pipe.name,
        "settings": {k: v for k, v in pipe.defaults.items()},
        "split": "val",
        "prompts": args.n,
        "seeds_per_prompt": 1,
        "seeds": f"{args.seed} + 1000 i",
        "judged": f"128x128 images resized to {JUDGE_SIZE}x{JUDGE_SIZE} with PIL Lanczos (judge_64);"
        " as they are (judge_128)",
        "judge_on_renders": {
            "64": summary([judge(r, s.intent) for r, s in zip(renders, scenes)], kinds)["fully_correct"],
            "128_lanczos_up": summary([judge(b, s.intent) for b, s in zip(big, scenes)], kinds)["fully_correct"],
            "128_up_then_down": summary([judge(to_judge_size(b), s.intent) for b, s in zip(big, scenes)], kinds)[
                "fully_correct"
            ],
        },
        "methods": results,
        "accuracy": {m: results[m]["judge_64"]["fully_correct"] for m in methods},
        "seconds_per_image": {m: results[m]["seconds_per_image"] for m in methods},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
