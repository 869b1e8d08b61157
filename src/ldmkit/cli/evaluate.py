"""Measuring models: eval (shapes world, or a ControlNet's edges) and eval-emoji."""

import sys
from pathlib import Path

from ldmkit.cli.common import DEFAULT_NOTE, MODEL_HELP, _list, _parse_lora, _print_report
from ldmkit.errors import LdmkitError


def _parse_word(text: str) -> tuple[str, str]:
    from ldmkit.data.shapes import ALL_SHAPES, PALETTE

    old, sep, new = (part.strip() for part in text.partition("="))
    if not sep or not old or not new or " " in old + new:
        raise LdmkitError(f"--word {text!r}: expected OLD=NEW, two single words (e.g. red=dax)")
    if old not in (*PALETTE, *ALL_SHAPES):
        raise LdmkitError(
            f"--word {text!r}: OLD must be a colour or shape the captions use: {', '.join(PALETTE)}, "
            f"{', '.join(ALL_SHAPES)}"
        )
    return old, new


def cmd_eval(args) -> int:
    from tqdm import tqdm

    from ldmkit.data.shapes import ALL_SHAPES, SPLITS
    from ldmkit.diffusion.registry import get_sampler
    from ldmkit.evaluation.shapes_eval import evaluate
    from ldmkit.pipelines import Pipeline

    cfgs = _list(args.cfg, float, "cfg") if args.cfg is not None else None
    steps = _list(args.steps, int, "steps") if args.steps is not None else None
    samplers = _list(args.samplers, str, "samplers") if args.samplers is not None else None
    caches = _list(args.feature_cache, int, "feature-cache") if args.feature_cache is not None else [1]
    if any(n < 1 for n in caches):
        raise LdmkitError(f"--feature-cache {args.feature_cache}: allowed: integers of 1 or more (1 = off)")
    for name in samplers or []:
        get_sampler(name)
    if any(s <= 0 for s in steps or []):
        raise LdmkitError(f"--steps {args.steps}: allowed: positive integers")
    if args.split not in SPLITS:
        raise LdmkitError(f"--split {args.split}: allowed: {', '.join(SPLITS)}")
    if args.n <= 0 or args.seeds <= 0:
        raise LdmkitError("--n and --seeds: allowed: 1 or more")
    loras = [_parse_lora(text) for text in args.lora or []]
    words = dict(_parse_word(text) for text in args.word or [])
    shapes = ALL_SHAPES if args.novel_shapes else None
    pipe = Pipeline.load(args.model, tiny_decoder=args.tiny_decoder)
    pipe.codec.decoder = "tiny" if args.tiny_decoder else "full"  # the final images by the tiny decoder
    for path in args.embedding or []:
        pipe.embeddings.load(path)
    cfgs = cfgs or [pipe.defaults["cfg"]]
    steps = steps or [pipe.defaults["steps"]]
    samplers = samplers or [pipe.defaults["sampler"]]
    if args.control:
        report = _eval_control(args, pipe, cfgs[0], steps[0], samplers[0])
    elif args.ip_adapter:
        report = _eval_image_prompts(args, pipe, cfgs[0], steps[0], samplers[0])
    else:
        total = args.n * len(cfgs) * len(steps) * len(samplers) * len(caches)
        with tqdm(total=total, desc="prompts", disable=args.quiet, file=sys.stderr) as bar:
            report = evaluate(
                pipe,
                args.split,
                args.n,
                cfgs,
                steps,
                samplers,
                args.seeds,
                args.seed,
                bar.update,
                loras,
                shapes,
                words,
                caches,
            )
    report["decoder"] = pipe.codec.decoder
    return _print_report(report, args.out, "eval")


def _eval_image_prompts(args, pipe, cfg: float, steps: int, sampler: str) -> dict:
    from tqdm import tqdm

    from ldmkit.checkpoints.image_encoder_files import load_image_encoder
    from ldmkit.checkpoints.ip_adapter_files import find_image_encoder, read_ip_adapter
    from ldmkit.evaluation.image_prompt_eval import evaluate_image_prompts

    found = read_ip_adapter(args.ip_adapter)
    where = args.image_encoder or find_image_encoder(args.ip_adapter)
    if where is None:
        raise LdmkitError(f"--ip-adapter {args.ip_adapter} needs {found.encoder}: give --image-encoder DIR_OR_FILE")
    scales = _list(args.ip_scales, float, "ip-scales")
    with tqdm(total=args.n * len(scales), desc="prompts", disable=args.quiet, file=sys.stderr) as bar:
        return evaluate_image_prompts(
            pipe,
            found.adapter,
            load_image_encoder(where),
            args.split,
            args.n,
            scales,
            cfg,
            steps,
            sampler,
            args.seed,
            bar.update,
        )


def _eval_control(args, pipe, cfg: float, steps: int, sampler: str) -> dict:
    from tqdm import tqdm

    from ldmkit.bundled import bundled_controlnet
    from ldmkit.checkpoints.controlnet_files import load_controlnet
    from ldmkit.checkpoints.files import atomic_write
    from ldmkit.evaluation.control_eval import evaluate_control
    from ldmkit.training.loop import image_grid

    if args.control != "canny":
        raise LdmkitError(f"--control {args.control}: the control evaluation measures edges; allowed: canny")
    net = load_controlnet(args.controlnet or bundled_controlnet(pipe.path), base=pipe.model.unet.config)
    rows = 4 if args.grid else 0
    with tqdm(total=args.n, desc="prompts", disable=args.quiet, file=sys.stderr) as bar:
        report, pictures = evaluate_control(
            pipe, net, args.split, args.n, cfg, steps, sampler, args.control_strength, args.seed, bar.update, rows
        )
    if args.grid:
        grid = image_grid(pictures)  # one row per scene: control | without | with
        atomic_write(args.grid, lambda tmp: grid.save(tmp, format="PNG"))
    return report


def cmd_eval_emoji(args) -> int:
    from tqdm import tqdm

    from ldmkit.evaluation.emoji_eval import evaluate_emoji
    from ldmkit.pipelines import Pipeline

    cfgs = _list(args.cfg, float, "cfg")
    if min(args.fd_samples, args.steps, args.classifier_steps) <= 0:
        raise LdmkitError("--fd-samples, --steps, --classifier-steps: allowed: 1 or more")
    pipe = Pipeline.load(args.model)
    data = Path(args.data).expanduser()
    train, heldout = (len(list((data / split).glob("*.png"))) for split in ("train", "heldout"))
    total = (min(args.fd_samples, train) + heldout) * len(cfgs)
    with tqdm(total=total, desc="images", disable=args.quiet, file=sys.stderr) as bar:
        report = evaluate_emoji(
            pipe,
            data,
            args.fd_samples,
            cfgs,
            args.steps,
            args.sampler,
            args.classifier_steps,
            args.seed,
            bar.update,
        )
    return _print_report(report, args.out, "eval-emoji")


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="score a model's images of shapes-world prompts with the exact judge")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--cfg", help=f"comma-separated guidance scales; default: {DEFAULT_NOTE}")
    p.add_argument("--steps", help=f"comma-separated step counts; default: {DEFAULT_NOTE}")
    p.add_argument("--samplers", help=f"comma-separated sampler names; default: {DEFAULT_NOTE}")
    p.add_argument("--feature-cache", help="comma-separated DeepCache intervals to measure (default 1: off)")
    p.add_argument("--n", type=int, default=50, help="prompts per setting (default 50)")
    p.add_argument("--seeds", type=int, default=2, help="images per prompt, for diversity (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--split",
        default="val",
        help="train, val, heldout, or a novel colour or shape: pink, teal, diamond (default val)",
    )
    p.add_argument("--out", help="also write the report to this JSON file")
    p.add_argument(
        "--lora", action="append", metavar="FILE[:WEIGHT]", help="measure with this LoRA merged (repeatable)"
    )
    p.add_argument("--embedding", action="append", metavar="FILE", help="a textual-inversion file, used by its name")
    p.add_argument(
        "--word",
        action="append",
        metavar="OLD=NEW",
        help="measure prompts that say OLD (a colour or shape), saying NEW instead; the judge still checks OLD",
    )
    p.add_argument(
        "--novel-shapes",
        action="store_true",
        help="the judge may also see shapes no training split has (diamond) in every image, asked for or not",
    )
    p.add_argument("--control", help="measure a ControlNet instead: canny (edge F-score with and without control)")
    p.add_argument("--controlnet", help="the ControlNet to measure (default: the bundled model's own)")
    p.add_argument("--control-strength", type=float, default=1.0)
    p.add_argument("--grid", help="with --control: also write a picture, rows of control | without | with")
    p.add_argument("--tiny-decoder", metavar="FILE", help="decode the final images with this tiny decoder (TAESD)")
    p.add_argument("--ip-adapter", help="measure image prompts instead: this IP-Adapter, renders as the prompts")
    p.add_argument("--image-encoder", help="the tower the IP-Adapter reads (default: image_encoder/ beside it)")
    p.add_argument("--ip-scales", default="1", help="comma-separated IP-Adapter scales to measure (default 1)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)


def add_eval_emoji(sub) -> None:
    p = sub.add_parser("eval-emoji", help="measure an emoji model: recall of names, held-out pairs, Fréchet distance")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="the folder ldmkit emoji-data wrote (train/, heldout/)")
    p.add_argument(
        "--fd-samples", type=int, default=2000, help="training captions per guidance scale (distance and recall)"
    )
    p.add_argument("--cfg", default="1,3,5,7.5", help="guidance scales for the distance")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="dpmpp_2m_karras")
    p.add_argument("--classifier-steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_eval_emoji)
