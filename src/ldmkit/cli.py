"""The `ldmkit` command: parses arguments, calls the library, maps errors to one line and exit 2."""

import argparse
import json
import logging
import sys
from pathlib import Path

from ldmkit.errors import LdmkitError

log = logging.getLogger("ldmkit")


def _overrides(args) -> dict:
    return {
        k: getattr(args, k)
        for k in ("prediction_type", "num_heads", "num_head_channels", "clip_skip")
        if getattr(args, k, None) is not None
    }


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

    p = sub.add_parser("init-model", help="write a random-weight model of a named architecture (tests, benchmarks)")
    p.add_argument("out", help="output .safetensors path")
    p.add_argument("--preset", default="tiny", help="tiny, sd15, sd21, sd21-base")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_init_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
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
