"""Image generation: generate (text-to-image, image-to-image, inpainting, ControlNet, LoRA).

Its options are defined in generate_options.py, which keeps this file to what a run does."""

import json
import logging
import sys
from pathlib import Path

from ldmkit.cli.common import _overrides, _parse_lora
from ldmkit.cli.fast import bundled_fast, fast_lora_settings, plain_fast
from ldmkit.cli.generate_options import add_options
from ldmkit.cli.image_prompt import read_image_prompts
from ldmkit.errors import LdmkitError

log = logging.getLogger("ldmkit")
MAX_N_ITER = 64  # batches in one run, as many as the web UI's batch count slider offers


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
    settings = fast_lora_settings(settings, args)  # --fast FILE: the LCM-LoRA and its settings
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


def _grid_path(out: str | None, first_seed: int) -> Path:
    """Next to the images: OUT-grid.png, or outputs/ldmkit-grid-SEED.png (the run's first seed)."""
    if out is None:
        return Path("outputs") / f"ldmkit-grid-{first_seed}.png"
    p = Path(out)
    return p.with_name(f"{p.stem}-grid{p.suffix}")


def _seeded(params, n_iter: int):
    """The parameters with a concrete seed, drawn once (as the pipeline draws it) so that batch k starts
    at seed + k * batch, as the web UI numbers a run of n_iter batches."""
    import secrets
    from dataclasses import replace

    if not 1 <= n_iter <= MAX_N_ITER:
        raise LdmkitError(f"--n-iter {n_iter}; allowed: 1 to {MAX_N_ITER}")
    if params.seed < 0:
        params = replace(params, seed=secrets.randbelow(2**32))
    total = params.batch * n_iter
    if params.seed + total > 2**64:  # image i's generator takes seed + i
        raise LdmkitError(f"--seed {params.seed} for {total} images; allowed: below {2**64 - total + 1}")
    return params


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


def _upscalers(params, folder: str | None):
    """The pipeline's model upscaler cache, holding the hires fix's model upscaler already: a missing or
    unreadable one is refused before the model loads."""
    from ldmkit.pipelines import hires
    from ldmkit.pipelines.upscalers import UpscalerCache

    cache = UpscalerCache()
    if params.hires and not hires.is_builtin(params.hires_upscaler):
        cache.get(hires.model_upscaler(params.hires_upscaler, folder))
    return cache


def _tiny_decoder(args) -> str | None:
    """--tiny-decoder's file or folder; --decoder tiny needs one, or a bundled model's own."""
    if args.decoder == "tiny" and not args.tiny_decoder:
        from ldmkit.bundled import bundled_tiny_decoder
        from ldmkit.checkpoints.taesd_files import NO_TINY_DECODER

        own = bundled_tiny_decoder(args.model)
        if own is None:
            raise LdmkitError(f"--decoder tiny: {NO_TINY_DECODER}")
        return str(own)
    return args.tiny_decoder


def cmd_generate(args) -> int:
    from dataclasses import replace

    from tqdm import tqdm

    from ldmkit.checkpoints.files import check_writable
    from ldmkit.images import image_grid, load_image, write_png
    from ldmkit.pipelines import Pipeline
    from ldmkit.pipelines.refiner import DEFAULT_SWITCH

    if plain_fast(args):  # not --fast FILE, an LCM-LoRA (cli/fast.py)
        args.model = bundled_fast(args.model)
    params = _seeded(_params(args), args.n_iter)  # every check that needs no model runs here, before one is loaded
    if args.refiner and params.refiner_switch_at is None:
        params = replace(params, refiner_switch_at=DEFAULT_SWITCH)
    if params.refiner_switch_at is not None and not args.refiner:
        raise LdmkitError("--refiner-switch-at needs --refiner MODEL")
    seeds = [params.seed + i for i in range(params.batch * args.n_iter)]
    paths = _output_paths(args.output, seeds)
    grid = _grid_path(args.output, seeds[0]) if len(seeds) > 1 and not args.no_grid else None
    for path in paths[:1] + ([grid] if grid else []):
        check_writable(path)
    controls = [_parse_control(c) for c in args.control or []]
    control_images = [load_image(path, "--control image") for _, path, _ in controls]
    if args.controlnet and not controls:
        raise LdmkitError("--controlnet needs --control TYPE:IMAGE[:STRENGTH]")
    params = replace(params, image_prompts=tuple(read_image_prompts(args)))
    upscalers = _upscalers(params, args.upscaler_dir)
    if args.backend == "openvino":
        from ldmkit.models.openvino_backend import require_openvino

        require_openvino()  # refused in one line before the model is read
    pipe = Pipeline.load(
        args.model,
        vae=args.vae,
        overrides=_overrides(args, skip=("clip_skip",)),
        precision=args.precision,
        text_encoders=args.text_encoders,
        tiny_decoder=_tiny_decoder(args),  # --decoder tiny without a file is refused before the model loads
    )
    bars = []  # drawn at the first step, so that a refused request prints its error line alone
    done = [0]  # the steps of the batches before this one: one bar for the whole run

    def progress(info):
        if not bars:
            total = info.steps * args.n_iter
            bars.append(tqdm(total=total, desc="sampling", unit="step", disable=args.quiet, file=sys.stderr))
        bars[0].update(done[0] + info.step - bars[0].n)

    if controls:
        params = replace(params, control=_controls(args, pipe, controls, control_images))
    if args.refiner:
        pipe.refiner = Pipeline.load(args.refiner, precision=args.precision)
    pipe.lora_dir = args.lora_dir
    pipe.upscaler_dir, pipe.upscalers = args.upscaler_dir, upscalers
    if args.compile:
        pipe.compile()
    pipe.set_backend(args.backend)
    pipe.tiled_vae = {"auto": None, "on": True, "off": False}[args.tiled_vae]
    pipe.codec.decoder = args.decoder or ("tiny" if args.tiny_decoder else "full")  # a bundled one: only asked
    if args.embeddings_dir:
        pipe.embeddings.load_folder(args.embeddings_dir)
    images, infotexts = [], []
    for k in range(args.n_iter):
        result = pipe(replace(params, seed=params.seed + k * params.batch), callback=progress)
        done[0] = bars[0].n if bars else 0
        # each batch written as it is done: an interrupted run keeps the batches it finished
        for path, image, text in zip(paths[len(images) :], result.images, result.infotexts):
            write_png(path, image, text)
        images += result.images
        infotexts += result.infotexts
    for bar in bars:
        bar.close()
    report = {"written": [str(p) for p in paths], "seeds": seeds}
    if grid:
        write_png(grid, image_grid(images), infotexts[0])  # the web UI's grids carry the first image's infotext
        report["grid"] = str(grid)
    print(json.dumps(report))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("generate", help="generate images from a prompt (text-to-image, image-to-image, inpainting)")
    add_options(p)
    p.set_defaults(func=cmd_generate)
