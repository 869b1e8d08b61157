"""`ldmkit generate-video IMAGE`: image-to-video (Stable Video Diffusion), flags named after diffusers'
StableVideoDiffusionPipeline arguments; the output's extension chooses the format (videos.py)."""

import json
import sys
from pathlib import Path

from ldmkit.errors import LdmkitError

DEFAULT_FORMAT = ".webp"


def _output_paths(out: str | None, seeds: list[int]) -> list[Path]:
    from ldmkit.videos import video_format

    if out is None:
        return [Path("outputs") / f"ldmkit-video-{s}{DEFAULT_FORMAT}" for s in seeds]
    p = Path(out)
    video_format(p)  # an extension naming no format is refused before any model is read
    return [p] if len(seeds) == 1 else [p.with_name(f"{p.stem}-{s}{p.suffix}") for s in seeds]


def _params(args):
    from ldmkit.images import load_image
    from ldmkit.pipelines.video_params import VideoParams

    source = Path(args.source)
    if not source.is_file():
        raise LdmkitError(
            f"{args.source}: no such image file (image-to-video models start from an image; a text-to-video"
            " model would take a prompt here)"
        )
    return VideoParams(
        image=load_image(source, "image"),
        frames=args.frames,
        width=args.width,
        height=args.height,
        steps=args.steps,
        sampler=args.sampler,
        seed=args.seed,
        batch=args.batch,
        fps=args.fps,
        motion_bucket=args.motion_bucket,
        noise_aug=args.noise_aug,
        min_cfg=args.min_cfg,
        max_cfg=args.max_cfg,
        decode_chunk=args.decode_chunk,
    )


def cmd_generate_video(args) -> int:
    import secrets
    from dataclasses import replace

    from tqdm import tqdm

    from ldmkit.checkpoints.files import check_writable
    from ldmkit.pipelines.video import VideoPipeline
    from ldmkit.videos import write_video

    params = _params(args)  # every check that needs no model runs here, before one is loaded
    if params.seed < 0:
        params = replace(params, seed=secrets.randbelow(2**32))
    paths = _output_paths(args.output, params.seeds)
    check_writable(paths[0])
    pipe = VideoPipeline.load(args.model)
    bars = []

    def progress(step, steps):
        if not bars:
            bars.append(tqdm(total=steps, desc="sampling", unit="step", disable=args.quiet, file=sys.stderr))
        bars[0].update(step + 1 - bars[0].n)

    result = pipe(params, callback=progress)
    for bar in bars:
        bar.close()
    for path, frames, text in zip(paths, result.videos, result.infotexts):
        write_video(path, frames, result.params.fps, text)
    print(json.dumps({"written": [str(p) for p in paths], "seeds": result.params.seeds}))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("generate-video", help="make a video from an image (Stable Video Diffusion)")
    p.add_argument("source", metavar="IMAGE", help="the conditioning frame (the clip starts from it)")
    p.add_argument("--model", required=True, help="a video model: a diffusers SVD folder or its single file")
    p.add_argument("--frames", type=int, help="frames in the clip (default: the model's, 14 or 25)")
    p.add_argument("--fps", type=int, help="frames per second, told to the model and written to the file (7)")
    p.add_argument("--motion-bucket", type=int, help="how much motion, 0 to 1023 (127; higher moves more)")
    p.add_argument("--noise-aug", type=float, help="noise added to the image: more departs further from it (0.02)")
    p.add_argument("--min-cfg", type=float, help="guidance scale on the first frame (1.0) ...")
    p.add_argument("--max-cfg", type=float, help="... ramped linearly to this on the last (3.0)")
    p.add_argument("--decode-chunk", type=int, help="frames decoded at a time: less memory (default: all)")
    p.add_argument("--steps", type=int, help="sampling steps (25)")
    p.add_argument("--sampler", help="sampler (euler; ldmkit generate --help lists them)")
    p.add_argument("--seed", type=int, default=-1, help="seed (below 0: random); clip i uses seed + i")
    p.add_argument("--batch", type=int, default=1, help="clips from one image")
    p.add_argument("--width", type=int, help="width in pixels, a multiple of 8 (1024)")
    p.add_argument("--height", type=int, help="height in pixels, a multiple of 8 (576)")
    p.add_argument("-o", "--output", help="output file: .webp, .png (animated, lossless), .gif or .mp4 (one per clip)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate_video)
