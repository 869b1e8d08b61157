"""Model files: inspect, convert, init-model."""

import json
from pathlib import Path

from ldmkit.cli.common import _add_model_options, _model_path, _overrides
from ldmkit.errors import LdmkitError


def cmd_inspect(args) -> int:
    from ldmkit.checkpoints.inspect import inspect_path

    info = inspect_path(
        _model_path(args.path), vae=args.vae, overrides=_overrides(args), text_encoders=args.text_encoders
    )
    print(json.dumps(info, indent=2))
    return 0


def cmd_convert(args) -> int:
    from ldmkit.checkpoints.diffusers_folder import save_diffusers
    from ldmkit.checkpoints.single_file import load_model, parse_dtype, save_single_file

    dtype = parse_dtype(args.dtype)
    src, dst = _model_path(args.src), Path(args.dst)
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
    model = load_model(src, vae=args.vae, overrides=_overrides(args), text_encoders=args.text_encoders)
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


def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="print what a checkpoint holds, as JSON")
    p.add_argument("path", help="a .safetensors/.ckpt file, a diffusers folder, or a bundled model's name")
    _add_model_options(p)
    p.set_defaults(func=cmd_inspect)


def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint between layouts")
    p.add_argument("src", help="the model or ControlNet to convert: a file, a diffusers folder or a bundled name")
    p.add_argument("dst")
    p.add_argument("--to", required=True, choices=["single-file", "diffusers"])
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="storage dtype (default: keep fp32)")
    _add_model_options(p)
    p.set_defaults(func=cmd_convert)


def add_init_model(sub) -> None:
    p = sub.add_parser("init-model", help="write a random-weight model of a named architecture (tests, benchmarks)")
    p.add_argument("out", help="output .safetensors path")
    p.add_argument("--preset", default="tiny", help="tiny, sd15, sd21, sd21-base")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_init_model)
