"""`ldmkit generate-video IMAGE_OR_PROMPT`: image-to-video (Stable Video Diffusion) or text-to-video (ldmkit's
own), flags named after diffusers' StableVideoDiffusionPipeline arguments; the output's extension chooses the
format (videos.py). `ldmkit eval-video`: a text-to-video model of the shapes world measured by the clip judge."""

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
    image = load_image(source, "image") if source.is_file() else None  # not a file: a prompt
    return VideoParams(
        image=image,
        prompt="" if image is not None else args.source,
        negative_prompt=args.negative_prompt,
        cfg=args.cfg,
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
    p.add_argument(
        "source",
        metavar="IMAGE_OR_PROMPT",
        help="an image file (image-to-video: the clip starts from it) or a prompt (text-to-video models)",
    )
    p.add_argument("--negative-prompt", default="", help="text-to-video: what to steer away from")
    p.add_argument("--cfg", type=float, help="text-to-video: guidance scale on every frame (the model's)")
    p.add_argument(
        "--model",
        required=True,
        help="a video model: a diffusers SVD folder, an SVD file or ldmkit's video.safetensors",
    )
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


def cmd_eval_video(args) -> int:
    from tqdm import tqdm

    from ldmkit.cli.common import _print_report
    from ldmkit.evaluation.video_eval import evaluate_clips
    from ldmkit.pipelines.video import VideoPipeline

    if args.baseline:
        from ldmkit.bundled import resolve
        from ldmkit.checkpoints.single_file import load_model
        from ldmkit.training.video_ldm import ClipDataConfig, VideoLDMTrainConfig, video_model_from_image_model

        config = VideoLDMTrainConfig(data=ClipDataConfig(frames=args.frames))
        model = video_model_from_image_model(load_model(resolve(args.model)[0]), config)
        pipe = VideoPipeline(model, f"{args.model} frame by frame")
    else:
        pipe = VideoPipeline.load(args.model)
    if pipe.model.config.text is None:
        raise LdmkitError(f"{args.model}: eval-video measures text-to-video models of the shapes world")
    with tqdm(total=args.n, desc="clips", disable=args.quiet, file=sys.stderr) as bar:
        report = evaluate_clips(pipe, args.split, args.n, args.seed, args.steps, args.cfg, args.sampler, bar.update)
    return _print_report(report, args.out, "eval-video")


def add_eval_video(sub) -> None:
    p = sub.add_parser("eval-video", help="score a text-to-video model's clips of the shapes world with the clip judge")
    p.add_argument("--model", required=True, help="ldmkit's video.safetensors (or, with --baseline, an image model)")
    p.add_argument(
        "--baseline", action="store_true", help="measure the image model --model names, run frame by frame instead"
    )
    p.add_argument("--frames", type=int, default=8, help="with --baseline: frames per clip (default 8)")
    p.add_argument("--split", default="val", choices=["train", "val", "heldout"])
    p.add_argument("--n", type=int, default=50, help="clips (default 50)")
    p.add_argument("--seed", type=int, default=0, help="clip i uses seed + i")
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg", type=float)
    p.add_argument("--sampler")
    p.add_argument("--out", help="also write the report to this JSON file")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_eval_video)
