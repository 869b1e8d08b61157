"""Image generation: generate (text-to-image, image-to-image, inpainting, ControlNet, LoRA).

Its options are defined in generate_options.py, which keeps this file to what a run does."""

import json
import logging
import sys
from pathlib import Path

from ldmkit.cli.common import _overrides, _parse_lora
from ldmkit.cli.generate_options import add_options
from ldmkit.errors import LdmkitError

log = logging.getLogger("ldmkit")


def _from_png(path: str) -> dict:
    """GenerationParams fields from a PNG's parameters: exact for ldmkit's own, best effort otherwise."""
    from ldmkit.errors import ConfigError
    from ldmkit.images import read_png_parameters
    from ldmkit.pipelines.params import from_infotext

    try:
        text = read_png_parameters(path)  # its messages name the file already
    except ConfigError as e:
        raise LdmkitError(f"--from-png: {e}") from None
    try:
        settings, ours = from_infotext(text)
    except ConfigError as e:
        raise LdmkitError(f"{path}: {e}") from None
    if not ours:
        log.warning("%s was not written by ldmkit: its settings are reused, but the image will differ", path)
    return settings


def _params(args):
    """The run's GenerationParams: a PNG's (--from-png), then every option given. The options are
    named after the fields (generate_options.py), so a new field is a new option and nothing more;
    the files (init image, mask, LoRAs) are read here, ControlNets once the model is loaded."""
    from ldmkit.images import load_image
    from ldmkit.pipelines.params import PARAM_NAMES, GenerationParams

    settings = _from_png(args.from_png) if args.from_png else {}
    settings.update({name: getattr(args, name) for name in PARAM_NAMES if getattr(args, name, None) is not None})
    if settings.get("prompt") is None:
        raise LdmkitError("give a PROMPT (or --from-png FILE)")
    if args.mask and not args.init_image:
        raise LdmkitError("--mask needs --init-image")
    if args.init_image:
        settings["init_image"] = load_image(args.init_image, "--init-image")
    if args.mask:
        settings["mask"] = load_image(args.mask, "--mask")
    settings["loras"] = [_parse_lora(text) for text in args.loras or []]
    settings["control"] = ()  # ControlInputs need the model: _controls
    return GenerationParams(**settings)


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
    from dataclasses import replace

    from tqdm import tqdm

    from ldmkit.checkpoints.files import check_writable
    from ldmkit.images import load_image, write_png
    from ldmkit.pipelines import Pipeline

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
    params = _params(args)  # every check that needs no model runs here, before one is loaded
    for path in _output_paths(args.output, [0]):
        check_writable(path)
    controls = [_parse_control(c) for c in args.control or []]
    control_images = [load_image(path, "--control image") for _, path, _ in controls]
    if args.controlnet and not controls:
        raise LdmkitError("--controlnet needs --control TYPE:IMAGE[:STRENGTH]")
    pipe = Pipeline.load(
        args.model, vae=args.vae, overrides=_overrides(args, skip=("clip_skip",)), precision=args.precision
    )
    bars = []  # drawn at the first step, so that a refused request prints its error line alone

    def progress(info):
        if not bars:
            bars.append(tqdm(total=info.steps, desc="sampling", unit="step", disable=args.quiet, file=sys.stderr))
        bars[0].update(info.step - bars[0].n)

    if controls:
        params = replace(params, control=_controls(args, pipe, controls, control_images))
    pipe.lora_dir = args.lora_dir
    if args.compile:
        pipe.compile()
    pipe.tiled_vae = {"auto": None, "on": True, "off": False}[args.tiled_vae]
    if args.embeddings_dir:
        pipe.embeddings.load_folder(args.embeddings_dir)
    result = pipe(params, callback=progress)
    for bar in bars:
        bar.close()
    paths = _output_paths(args.output, result.seeds)
    for path, image, text in zip(paths, result.images, result.infotexts):
        write_png(path, image, text)
    print(json.dumps({"written": [str(p) for p in paths], "seeds": result.seeds}))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("generate", help="generate images from a prompt (text-to-image, image-to-image, inpainting)")
    add_options(p)
    p.set_defaults(func=cmd_generate)
