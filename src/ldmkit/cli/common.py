"""What several commands share: model options, list and LoRA parsing, JSON reports, logging to stderr."""

import argparse
import json
import logging
import sys
from pathlib import Path

from ldmkit.errors import LdmkitError

MODEL_HELP = (
    "a .safetensors/.ckpt file, a diffusers folder, or a bundled model's name (default: shapes; ldmkit models lists"
    " them; bundled:NAME means the bundled one even where a file of that name exists)"
)
DEFAULT_NOTE = "the bundled model's chosen setting; for other models steps 20, cfg 7, dpmpp_2m_karras"


def _overrides(args, skip: tuple[str, ...] = ()) -> dict:
    keys = ("prediction_type", "num_heads", "num_head_channels", "clip_skip")
    return {k: getattr(args, k) for k in keys if k not in skip and getattr(args, k, None) is not None}


def _model_path(text: str) -> Path:
    """A model argument as the file or folder to read: a bundled model's name, bundled:NAME, or a path."""
    from ldmkit.bundled import resolve

    return resolve(text)[0]


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vae", help="a separate VAE file or folder that replaces the model's own")
    p.add_argument(
        "--text-encoders",
        metavar="DIR",
        help="SD3 / SD3.5 single files: where the text encoders the file lacks are (clip_l.safetensors,"
        " clip_g.safetensors, t5xxl_fp16.safetensors as ComfyUI keeps them, or a diffusers SD3 folder)",
    )
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


def _parse_lora(text: str, option: str = "--lora") -> tuple[str, float]:
    """FILE[:WEIGHT]"""
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            pass  # a path with a colon in it
    if not Path(text).is_file():
        raise LdmkitError(f"{option} {text}: no such file (expected FILE[:WEIGHT])")
    return text, 1.0


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


class _Lowercase(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def _log_to_stderr(level: int, formatter: logging.Formatter | None = None) -> None:
    """Library warnings as `warning: ...` lines on stderr (the stream current at this call), or as a
    command's own `formatter` shapes them."""
    logger = logging.getLogger("ldmkit")
    for h in [h for h in logger.handlers if getattr(h, "_ldmkit_cli", False)]:
        logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._ldmkit_cli = True
    handler.setFormatter(formatter or _Lowercase())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
