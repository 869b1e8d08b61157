"""The `ldmkit` command: parses arguments, calls the library, maps errors to one line and exit 2."""

import argparse
import json
import logging
import sys
from pathlib import Path

from ldmkit.errors import LdmkitError

log = logging.getLogger("ldmkit")


def _overrides(args, skip: tuple[str, ...] = ()) -> dict:
    keys = ("prediction_type", "num_heads", "num_head_channels", "clip_skip")
    return {k: getattr(args, k) for k in keys if k not in skip and getattr(args, k, None) is not None}


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vae", help="a separate VAE file or folder that replaces the model's own")
    p.add_argument(
        "--prediction-type",
        choices=["epsilon", "v_prediction", "sample"],
        help="what the UNet predicts (SD 2.x files do not say; 768 models are v_prediction)",
    )
    p.add_argument("--num-heads", type=int, help="attention heads per UNet transformer (SD 1.x: 8)")
    p.add_argument("--num-head-channels", type=int, help="channels per attention head (SD 2.x: 64)")
    p.add_argument(
        "--clip-skip", type=int, help="1 = last text-encoder layer, 2 = one earlier (the web UI's convention)"
    )


def _sampler_names() -> list[str]:
    from ldmkit.diffusion.registry import SAMPLERS

    return list(SAMPLERS)


def cmd_inspect(args) -> int:
    from ldmkit.checkpoints.inspect import inspect_path

    print(json.dumps(inspect_path(args.path, vae=args.vae, overrides=_overrides(args)), indent=2))
    return 0


def cmd_convert(args) -> int:
    from ldmkit.checkpoints.diffusers_folder import save_diffusers
    from ldmkit.checkpoints.single_file import load_model, parse_dtype, save_single_file

    dtype = parse_dtype(args.dtype)
    src, dst = Path(args.src), Path(args.dst)
    if src.resolve() == dst.resolve():
        raise LdmkitError(f"{dst}: the destination is the source; choose another path")
    from ldmkit.checkpoints.controlnet_files import (
        family_of,
        is_controlnet_path,
        load_controlnet,
        save_controlnet,
        save_controlnet_diffusers,
    )

    if is_controlnet_path(src):
        net = load_controlnet(src)
        if args.to == "single-file":
            if dst.is_dir():
                raise LdmkitError(f"{dst}: is a folder; a single-file ControlNet needs a file path")
            save_controlnet(net, dst, dtype)
        else:
            save_controlnet_diffusers(net, dst, dtype)
        print(json.dumps({"written": str(dst), "format": args.to, "family": family_of(net.config)}))
        return 0
    model = load_model(src, vae=args.vae, overrides=_overrides(args))
    if args.to == "single-file":
        if dst.is_dir():
            raise LdmkitError(
                f"{dst}: is a folder; a single-file checkpoint needs a file path (e.g. model.safetensors)"
            )
        save_single_file(model, dst, dtype)
    else:
        save_diffusers(model, dst, dtype)
    print(json.dumps({"written": str(dst), "format": args.to, "family": model.config.family}))
    return 0


def cmd_init_model(args) -> int:
    import torch

    from ldmkit.checkpoints.single_file import save_single_file
    from ldmkit.models.ldm import LatentDiffusion
    from ldmkit.models.presets import preset

    torch.manual_seed(args.seed)
    model = LatentDiffusion(preset(args.preset))
    save_single_file(model, args.out)
    print(json.dumps({"written": args.out, "preset": args.preset, "weights": "random", "seed": args.seed}))
    return 0


GENERATE_DEFAULTS = {
    "negative_prompt": "",
    "steps": None,  # steps, cfg, sampler: the model's own choice (Pipeline.defaults) unless given
    "cfg": None,
    "sampler": None,
    "seed": -1,
    "width": None,
    "height": None,
    "batch": 1,
    "clip_skip": None,
    "strength": 0.75,
    "mask_blur": 4.0,
    "eta": 0.0,
    "guidance_rescale": 0.0,
    "prompt_mode": "webui",
    "feature_cache": 1,
}


def _from_png(path: str) -> dict:
    """Generation settings from a PNG's parameters: exact for ldmkit's own, best effort otherwise."""
    from ldmkit.diffusion.registry import from_webui
    from ldmkit.errors import ConfigError
    from ldmkit.images import parse_infotext, read_png_parameters

    prompt, negative, f = parse_infotext(read_png_parameters(path))
    ours = f.get("Version", "").startswith("ldmkit")
    if not ours:
        log.warning("%s was not written by ldmkit: its settings are reused, but the image will differ", path)
    out: dict = {"prompt": prompt, "negative_prompt": negative}
    if "ldmkit sampler" in f:
        out["sampler"] = f["ldmkit sampler"]
    elif "Sampler" in f:
        try:
            out["sampler"] = from_webui(f["Sampler"], f.get("Schedule type"))
        except ConfigError as e:
            raise LdmkitError(f"{path}: {e}") from None
    conv = {
        "Steps": ("steps", int),
        "CFG scale": ("cfg", float),
        "Seed": ("seed", int),
        "Clip skip": ("clip_skip", int),
        "Denoising strength": ("strength", float),
        "Mask blur": ("mask_blur", float),
        "Eta DDIM": ("eta", float),
        "Guidance rescale": ("guidance_rescale", float),
        "Prompt mode": ("prompt_mode", str),
        "Timestep spacing": ("timestep_spacing", str),
        "Feature cache": ("feature_cache", int),
    }
    try:
        for key, (name, kind) in conv.items():
            if key in f:
                out[name] = kind(f[key])
        if "Size" in f:
            out["width"], out["height"] = (int(v) for v in f["Size"].lower().split("x"))
    except ValueError as e:
        raise LdmkitError(f"{path}: unreadable generation parameters ({e})") from None
    return out


def _output_paths(out: str | None, seeds: list[int]) -> list[Path]:
    if out is None:
        return [Path("outputs") / f"ldmkit-{s}.png" for s in seeds]
    p = Path(out)
    if p.suffix.lower() != ".png":
        raise LdmkitError(f"-o {out}: the output must be a .png file")
    if len(seeds) == 1:
        return [p]
    return [p.with_name(f"{p.stem}-{s}{p.suffix}") for s in seeds]


def _parse_control(text: str) -> tuple[str, str, float]:
    """TYPE:IMAGE[:STRENGTH] -> (type, image path, strength)."""
    from ldmkit.pipelines.control import PREPROCESSORS

    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise LdmkitError(f"--control {text!r}: expected TYPE:IMAGE[:STRENGTH], e.g. canny:edges.png:0.8")
    if kind not in PREPROCESSORS:
        raise LdmkitError(f"--control type {kind!r}; allowed: {', '.join(PREPROCESSORS)}")
    path, strength = rest, 1.0
    head, sep, tail = rest.rpartition(":")
    if sep and head:
        try:
            path, strength = head, float(tail)
        except ValueError:
            pass  # a path with a colon in it
    return kind, path, strength


def _parse_lora(text: str) -> tuple[str, float]:
    """FILE[:WEIGHT]"""
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            pass  # a path with a colon in it
    if not Path(text).is_file():
        raise LdmkitError(f"--lora {text}: no such file (expected FILE[:WEIGHT])")
    return text, 1.0


def _controls(args, pipe, controls: list[tuple[str, str, float]], images: list) -> list:
    """ControlInputs for --control / --controlnet: one ControlNet per control, one for all, or the
    bundled model's own."""
    from ldmkit.bundled import bundled_controlnet
    from ldmkit.checkpoints.controlnet_files import load_controlnet
    from ldmkit.pipelines.control import ControlInput

    files = list(args.controlnet or [])
    if not files:
        files = [bundled_controlnet(pipe.path)]
    if len(files) not in (1, len(controls)):
        raise LdmkitError(f"{len(files)} --controlnet files for {len(controls)} --control images; give one or one each")
    nets = {f: load_controlnet(f, base=pipe.model.unet.config) for f in set(map(str, files))}
    return [
        ControlInput(
            nets[str(files[i if len(files) > 1 else 0])],
            image,
            kind,
            strength,
            args.control_start,
            args.control_end,
            args.guess_mode,
            name=Path(files[i if len(files) > 1 else 0]).stem,
        )
        for i, ((kind, _, strength), image) in enumerate(zip(controls, images))
    ]


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from ldmkit.diffusion.registry import get_sampler
    from ldmkit.images import load_image, write_png
    from ldmkit.pipelines import Pipeline

    settings = dict(GENERATE_DEFAULTS)
    if args.from_png:
        settings.update(_from_png(args.from_png))
    for key in list(GENERATE_DEFAULTS) + ["prompt"]:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    if not settings.get("prompt") and settings.get("prompt") != "":
        raise LdmkitError("give a PROMPT (or --from-png FILE)")
    if args.mask and not args.init_image:
        raise LdmkitError("--mask needs --init-image")
    if args.fast:
        from ldmkit.bundled import DEFAULT, FAST

        name = args.model or DEFAULT
        if name not in FAST:
            which = f"only these bundled models have one: {', '.join(FAST)}" if FAST else "no bundled one ships yet"
            raise LdmkitError(
                f"--fast: a few-step version of {name}: {which}; "
                "distil your own with ldmkit distill-lcm and pass it with --model"
            )
        args.model = FAST[name]
    init = load_image(args.init_image, "--init-image") if args.init_image else None
    mask = load_image(args.mask, "--mask") if args.mask else None
    controls = [_parse_control(c) for c in args.control or []]
    loras = [_parse_lora(text) for text in args.lora or []]
    control_images = [load_image(path, "--control image") for _, path, _ in controls]
    if args.controlnet and not controls:
        raise LdmkitError("--controlnet needs --control TYPE:IMAGE[:STRENGTH]")
    if settings["sampler"] is not None:
        get_sampler(settings["sampler"])  # fail before loading a model
    if settings["steps"] is not None and settings["steps"] <= 0:
        raise LdmkitError(f"--steps {settings['steps']}: allowed: 1 or more")
    pipe = Pipeline.load(
        args.model, vae=args.vae, overrides=_overrides(args, skip=("clip_skip",)), precision=args.precision
    )
    bars = []  # drawn at the first step, so that a refused request prints its error line alone

    def progress(info):
        if not bars:
            bars.append(tqdm(total=info.steps, desc="sampling", unit="step", disable=args.quiet, file=sys.stderr))
        bars[0].update(info.step - bars[0].n)

    control = _controls(args, pipe, controls, control_images) if controls else None
    pipe.lora_dir = args.lora_dir
    if args.compile:
        pipe.compile()
    pipe.tiled_vae = {"auto": None, "on": True, "off": False}[args.tiled_vae]
    if args.embeddings_dir:
        pipe.embeddings.load_folder(args.embeddings_dir)
    prompt = settings.pop("prompt")
    result = pipe(prompt, init_image=init, mask=mask, callback=progress, control=control, loras=loras, **settings)
    for bar in bars:
        bar.close()
    paths = _output_paths(args.output, result.seeds)
    for path, image, text in zip(paths, result.images, result.infotexts):
        write_png(path, image, text)
    print(json.dumps({"written": [str(p) for p in paths], "seeds": result.seeds}))
    return 0


def _list(text: str, kind, name: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise LdmkitError(f"--{name} {text!r}: expected a comma-separated list of {kind.__name__} values") from None
    if not values:
        raise LdmkitError(f"--{name}: give at least one value")
    return values


def _print_report(report: dict, out: str | None, command: str) -> int:
    """Record the command that made a report, write it to `out` if asked, print it as JSON."""
    from ldmkit.checkpoints.files import write_json

    report["command"] = "ldmkit " + " ".join(sys.argv[1:]) if sys.argv else f"ldmkit {command}"
    if out:
        write_json(out, report)
    print(json.dumps(report, indent=2))
    return 0


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
    pipe = Pipeline.load(args.model)
    for path in args.embedding or []:
        pipe.embeddings.load(path)
    cfgs = cfgs or [pipe.defaults["cfg"]]
    steps = steps or [pipe.defaults["steps"]]
    samplers = samplers or [pipe.defaults["sampler"]]
    if args.control:
        report = _eval_control(args, pipe, cfgs[0], steps[0], samplers[0])
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
    return _print_report(report, args.out, "eval")


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


def cmd_bench(args) -> int:
    from ldmkit.evaluation.bench import run

    precisions = ("fp32", "bf16") if args.precision == "both" else (args.precision,)
    report = run(
        quick=args.quick,
        precisions=precisions,
        progress=(lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr)),
    )
    return _print_report(report, args.json, "bench")


def cmd_emoji_data(args) -> int:
    from ldmkit.data.emoji import fetch, prepare

    if args.size <= 0 or not 0 <= args.heldout_fraction < 1:
        raise LdmkitError("--size: allowed 1 or more; --heldout-fraction: allowed 0 <= f < 1")
    out = Path(args.out).expanduser()
    if out.exists():
        raise LdmkitError(f"{out}: already exists; choose a new --out (or remove it)")
    archives = fetch(Path(args.cache).expanduser())
    manifest = prepare(archives, out, args.size, heldout_fraction=args.heldout_fraction)
    print(json.dumps({"written": str(out), **manifest}))
    return 0


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


def cmd_shapes(args) -> int:
    import time

    from ldmkit.data.shapes import export

    t = time.perf_counter()
    info = export(args.out, args.split, args.n, args.seed, args.size, args.format, args.shard_size, args.extras)
    info["seconds"] = round(time.perf_counter() - t, 2)
    print(json.dumps(info))
    return 0


def _train(args, config_class, task_class, product, adjust=None) -> int:
    """The training commands: join the process group, read the config, run, report. product: the
    file the run ends with, or a function of the config giving it (LoRAs and embeddings are named)."""
    from ldmkit.config import load_yaml, to_dict
    from ldmkit.training.distributed import init_from_env, shutdown
    from ldmkit.training.loop import Trainer

    init_from_env()
    config = load_yaml(config_class, args.config)
    if args.run_dir:
        config.run.dir = args.run_dir
    if adjust:
        adjust(config)
    trainer = Trainer(task_class(config), config.run, resume=args.resume, config_record=to_dict(config))
    last = trainer.fit(progress=not args.quiet)
    shutdown()
    key = task_class.name if callable(product) else product.split(".")[0]
    product = product(config) if callable(product) else product
    if trainer.main:
        print(
            json.dumps(
                {
                    "run": str(trainer.dir),
                    "step": trainer.step,
                    "last": last,
                    key: str(trainer.dir / product),
                }
            )
        )
    return 0


def cmd_train_autoencoder(args) -> int:
    from ldmkit.training.autoencoder import AutoencoderTask, AutoencoderTrainConfig

    return _train(args, AutoencoderTrainConfig, AutoencoderTask, "autoencoder.safetensors")


def cmd_train(args) -> int:
    from ldmkit.training.ldm import LDMTask, LDMTrainConfig

    def init_from(config):
        if args.init_from:
            config.init_from, config.autoencoder = args.init_from, None

    return _train(args, LDMTrainConfig, LDMTask, "model.safetensors", init_from)


def cmd_train_controlnet(args) -> int:
    from ldmkit.training.controlnet import ControlNetTask, ControlNetTrainConfig

    return _train(args, ControlNetTrainConfig, ControlNetTask, "controlnet.safetensors")


def cmd_train_lora(args) -> int:
    from ldmkit.training.lora import LoraTask, LoraTrainConfig

    return _train(args, LoraTrainConfig, LoraTask, lambda c: f"{c.name}.safetensors")


def cmd_train_embedding(args) -> int:
    from ldmkit.training.embedding import EmbeddingTask, EmbeddingTrainConfig

    return _train(args, EmbeddingTrainConfig, EmbeddingTask, lambda c: f"{c.word}.safetensors")


def cmd_distill_lcm(args) -> int:
    from ldmkit.training.lcm import DistillConfig, DistillTask

    return _train(args, DistillConfig, DistillTask, "model.safetensors")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def cmd_serve(args) -> int:
    import uvicorn

    from ldmkit.server.app import Limits, ServeConfig, create_app

    if args.api_auth and ":" not in args.api_auth:
        raise LdmkitError("--api-auth: expected USER:PASS")
    if args.host not in LOOPBACK and not (args.api_key or args.api_auth or args.insecure):
        raise LdmkitError(
            f"--host {args.host}: binding beyond this machine needs --api-key KEY or --api-auth USER:PASS "
            "(or --insecure to serve without credentials)"
        )
    for name in ("max_pixels", "max_steps", "max_images", "max_prompt_chars"):
        if getattr(args, name) <= 0:
            raise LdmkitError(f"--{name.replace('_', '-')}: allowed: 1 or more")
    limits = Limits(args.max_pixels, args.max_steps, args.max_images, args.max_prompt_chars)
    config = ServeConfig(
        args.model,
        args.models_dir,
        list(args.controlnet or []),
        args.lora_dir,
        args.embeddings_dir,
        args.outputs,
        args.api_key,
        args.api_auth,
        limits,
    )
    from ldmkit.bundled import resolve

    resolve(args.model)  # a missing model is one line now, not a failure inside the server
    app = create_app(config)
    app.state.ready.result()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


MODEL_HELP = "a .safetensors/.ckpt file, a diffusers folder, or a bundled model's name (default: shapes)"
DEFAULT_NOTE = "the bundled model's chosen setting; for other models steps 20, cfg 7, dpmpp_2m_karras"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldmkit", description="Latent diffusion models, written to be read.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="print what a checkpoint holds, as JSON")
    p.add_argument("path", help="a .safetensors/.ckpt file or a diffusers folder")
    _add_model_options(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="convert a checkpoint between layouts")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", required=True, choices=["single-file", "diffusers"])
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="storage dtype (default: keep fp32)")
    _add_model_options(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="generate images from a prompt (text-to-image, image-to-image, inpainting)")
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (the web UI's emphasis syntax works)")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--negative-prompt")
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg", type=float, help=f"classifier-free guidance scale (1 = none); default: {DEFAULT_NOTE}")
    p.add_argument("--sampler", help="one of: " + ", ".join(_sampler_names()) + f"; default: {DEFAULT_NOTE}")
    p.add_argument("--seed", type=int, help="image i of a batch uses seed + i (default: random)")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--init-image", help="start from this image (image-to-image)")
    p.add_argument("--strength", type=float, help="how much of the init image to repaint, 0 to 1 (default 0.75)")
    p.add_argument("--mask", help="inpainting mask, the init image's size: white is repainted")
    p.add_argument("--mask-blur", type=float)
    p.add_argument("--eta", type=float, help="DDIM's eta (0 = deterministic)")
    p.add_argument("--guidance-rescale", type=float)
    p.add_argument(
        "--prompt-mode",
        choices=["webui", "truncate"],
        help="webui: emphasis syntax and 75-token chunks (default); truncate: as diffusers",
    )
    p.add_argument(
        "--timestep-spacing",
        choices=["leading", "trailing", "linspace"],
        help="override the sampler's timestep spacing (as diffusers' scheduler option)",
    )
    p.add_argument(
        "--control",
        action="append",
        metavar="TYPE:IMAGE[:STRENGTH]",
        help="a control image for a ControlNet; TYPE is a preprocessor: canny, scribble, threshold, or none / depth /"
        " seg / normal / edges for maps used as given (repeatable)",
    )
    p.add_argument(
        "--controlnet",
        action="append",
        metavar="FILE",
        help="ControlNet file or diffusers folder: one for all --control images or one each (default: the bundled"
        " model's own)",
    )
    p.add_argument("--control-start", type=float, default=0.0, help="fraction of the steps where control starts")
    p.add_argument("--control-end", type=float, default=1.0, help="fraction of the steps where control ends")
    p.add_argument("--guess-mode", action="store_true", help="control on the prompt branch only, scaled by depth")
    p.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]", help="merge a LoRA for this run (repeatable)")
    p.add_argument("--lora-dir", help="where <lora:NAME:WEIGHT> tags in the prompt look for NAME")
    p.add_argument("--embeddings-dir", help="textual-inversion embeddings, used by file name in prompts")
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "auto"],
        default="auto",
        help="bf16: UNet and autoencoder in bf16 (fast on CPUs with bf16 units); auto (default): bf16 for"
        " UNets of 100M parameters or more on such CPUs, fp32 otherwise",
    )
    p.add_argument(
        "--feature-cache",
        type=int,
        metavar="N",
        help="DeepCache: a full UNet call every N steps, the steps between reuse its deep features (1 = off)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow first call; faster steps)")
    p.add_argument(
        "--tiled-vae",
        choices=["auto", "on", "off"],
        default="auto",
        help="decode in bands (same image, less memory), encode in tiles (auto: only when a whole pass would not "
        "fit in free memory)",
    )
    p.add_argument("--fast", action="store_true", help="the bundled model's consistency-distilled version (4 steps)")
    p.add_argument("--from-png", help="reuse the settings stored in a PNG's parameters")
    p.add_argument("-o", "--output", help="output .png (with --batch N: one file per seed)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_model_options(p)
    p.set_defaults(func=cmd_generate)

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
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="serve the popular web UI's HTTP API and a web page")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--models-dir", help="a folder of checkpoints to offer in the model list")
    p.add_argument("--controlnet", action="append", help="a ControlNet file to offer by name (repeatable)")
    p.add_argument("--lora-dir", help="LoRA folder: /sdapi/v1/loras lists it, prompts use <lora:NAME:WEIGHT>")
    p.add_argument("--embeddings-dir", help="textual-inversion embeddings, used by file name in prompts")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--api-key", help="require this key (Authorization: Bearer KEY, or X-API-Key)")
    p.add_argument("--api-auth", help="require HTTP Basic credentials USER:PASS")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without credentials")
    p.add_argument("--outputs", default="outputs", help="where every image is saved (default ./outputs)")
    p.add_argument("--max-pixels", type=int, default=1024 * 1024, help="largest width x height")
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--max-images", type=int, default=16, help="largest batch_size x n_iter")
    p.add_argument("--max-prompt-chars", type=int, default=4000)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="measure ldmkit against diffusers on the SD 1.5 architecture, side by side")
    p.add_argument("--vs", default="diffusers", choices=["diffusers"])
    p.add_argument("--quick", action="store_true", help="the tiny preset: a smoke test, not a measurement")
    p.add_argument("--precision", default="both", choices=["both", "fp32", "bf16"])
    p.add_argument("--json", help="also write the report here")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("emoji-data", help="fetch and prepare the open emoji image sets (Noto, Twemoji) with captions")
    p.add_argument("--out", required=True, help="new dataset folder (train/, heldout/, NOTICE.txt)")
    p.add_argument("--cache", default="~/.cache/ldmkit-emoji", help="where the npm archives are kept")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--heldout-fraction", type=float, default=0.05, help="emoji held out, each in one style")
    p.set_defaults(func=cmd_emoji_data)

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

    p = sub.add_parser("shapes", help="write shapes-world images with captions (folder or tar shards)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--split", default="train", choices=["train", "val", "heldout"])
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--format", default="folder", choices=["folder", "shards"])
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--extras", action="store_true", help="also write each image's edge map and mask")
    p.set_defaults(func=cmd_shapes)

    for name, func, text in [
        ("train-autoencoder", cmd_train_autoencoder, "stage 1: train a KL autoencoder"),
        ("train", cmd_train, "stage 2: train a text-conditioned latent diffusion model"),
        (
            "train-controlnet",
            cmd_train_controlnet,
            "train a ControlNet for a frozen model (hints made from the images)",
        ),
        ("distill-lcm", cmd_distill_lcm, "latent consistency distillation: a few-step student of a model"),
        ("train-lora", cmd_train_lora, "train a LoRA for a frozen model (saved in the kohya and diffusers layouts)"),
        ("train-embedding", cmd_train_embedding, "textual inversion: train a new word's vectors for a frozen model"),
    ]:
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", required=True, help="YAML file (see configs/)")
        p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
        if name == "train":
            p.add_argument("--init-from", help="fine-tune this model (SD 1.x/2.x file, diffusers folder, or ours)")
        p.add_argument("--run-dir", help="override run.dir")
        p.add_argument("-q", "--quiet", action="store_true")
        p.set_defaults(func=func)

    p = sub.add_parser("init-model", help="write a random-weight model of a named architecture (tests, benchmarks)")
    p.add_argument("out", help="output .safetensors path")
    p.add_argument("--preset", default="tiny", help="tiny, sd15, sd21, sd21-base")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_init_model)
    return parser


class _Lowercase(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def _log_to_stderr(level: int) -> None:
    """Library warnings as `warning: ...` lines on stderr (the stream current at this call)."""
    logger = logging.getLogger("ldmkit")
    for h in [h for h in logger.handlers if getattr(h, "_ldmkit_cli", False)]:
        logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._ldmkit_cli = True
    handler.setFormatter(_Lowercase())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _log_to_stderr(logging.INFO if args.verbose else logging.WARNING)
    try:
        return args.func(args)
    except LdmkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
