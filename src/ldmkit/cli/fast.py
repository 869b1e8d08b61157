"""`generate --fast FILE`: any model made few-step by an LCM-LoRA (latent consistency LoRA, Luo et al. 2023:
latent-consistency/lcm-lora-sdv1-5 for SD 1.x, lcm-lora-sdxl for SDXL), merged at weight 1 and run with the
settings its authors give (diffusers' LCM-LoRA guide): the lcm sampler, 4 steps, guidance 1 -- no
unconditional pass, the LoRA adds no guidance embedding. Each setting only where the user gave none (on the
command line or in --from-png's parameters). Plain `--fast` keeps its meaning, the bundled model's distilled
version (bundled_fast). The file is checked against the model as every LoRA is
(checkpoints/lora_files.read_lora): one that is not a LoRA, or whose layers are not the model's, is refused
in one line naming it."""

from pathlib import Path

from ldmkit.errors import LdmkitError

LCM_LORA_SETTINGS = {"sampler": "lcm", "steps": 4, "cfg": 1.0}


def plain_fast(args) -> bool:
    """Whether --fast was given alone (the bundled model's distilled version). `--fast FILE` puts the file
    on `args.fast_lora` instead (fast_lora_settings). --fast took no value before, so `generate --fast
    "a cat"` hands argparse the prompt as FILE: a value that is no file and does not look like one, given
    without a prompt, is the prompt."""
    from ldmkit.checkpoints.lora_files import FILE_SUFFIXES  # here: `ldmkit --help` loads no torch

    args.fast_lora, value = None, args.fast
    if not isinstance(value, str):
        return bool(value)
    path = Path(value)
    if path.is_file():
        args.fast_lora = path
        return False
    if args.prompt is None and path.suffix.lower() not in FILE_SUFFIXES:
        args.prompt = value
        return True
    raise LdmkitError(f"--fast {value}: no such file (give an LCM-LoRA file, or --fast alone for a bundled model)")


def bundled_fast(model: str | None) -> str:
    """Plain --fast: the bundled model's few-step version (bundled.FAST), or a line saying there is none."""
    from ldmkit.bundled import DEFAULT, FAST

    name = (model or DEFAULT).removeprefix("bundled:")
    if name not in FAST:
        which = f"only these bundled models have one: {', '.join(FAST)}" if FAST else "no bundled one ships yet"
        raise LdmkitError(
            f"--fast: a few-step version of {name}: {which}; "
            "distil your own with ldmkit distill-lcm and pass it with --model, or give an LCM-LoRA: --fast FILE"
        )
    return FAST[name]


def fast_lora_settings(settings: dict, args) -> dict:
    """GenerationParams fields with --fast FILE's LCM-LoRA at weight 1 and LCM_LORA_SETTINGS where the
    fields given (options, --from-png) have none."""
    if getattr(args, "fast_lora", None) is None:
        return settings
    return {**LCM_LORA_SETTINGS, **settings, "loras": [*settings.get("loras", ()), (args.fast_lora, 1.0)]}
