"""The generate command's image prompts: --ip-adapter FILE[:SCALE] (repeatable), --ip-image IMAGE
(repeatable: with one adapter every image is its prompt, side by side; with several, one image each, in
order), --ip-start / --ip-end, and --image-encoder (else the image_encoder/ folder the published adapters
keep beside them or one folder up). Files and images are read before the model loads, so a bad one is
refused first; the checks against the model run where every generation's run (pipelines/params.py)."""

import argparse
from pathlib import Path

from ldmkit.cli.common import _parse_lora
from ldmkit.errors import LdmkitError


def add_image_prompt_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("image prompts (IP-Adapter)")
    g.add_argument(
        "--ip-adapter",
        action="append",
        metavar="FILE[:SCALE]",
        help="an IP-Adapter (.safetensors or .bin, the published layout), at SCALE (default 1; repeatable)",
    )
    g.add_argument(
        "--ip-image",
        action="append",
        metavar="IMAGE",
        help="a prompt image: with one --ip-adapter all of them are its prompt; with several, one each, in order",
    )
    g.add_argument("--ip-start", type=float, default=0.0, help="fraction of the steps where image prompts start")
    g.add_argument("--ip-end", type=float, default=1.0, help="fraction of the steps where image prompts end")
    g.add_argument(
        "--image-encoder",
        metavar="DIR_OR_FILE",
        help="the CLIP vision tower the adapters read (default: image_encoder/ beside the adapter or one folder up)",
    )


def read_image_prompts(args) -> list:
    """ImagePromptInputs for the options, files and images read (the model checks them at generation)."""
    from ldmkit.checkpoints.image_encoder_files import load_image_encoder
    from ldmkit.checkpoints.ip_adapter_files import find_image_encoder, read_ip_adapter
    from ldmkit.images import load_image
    from ldmkit.pipelines.image_prompt import ImagePromptInput

    given, images = args.ip_adapter or [], args.ip_image or []
    if not given:
        if images or args.image_encoder:
            raise LdmkitError("--ip-image and --image-encoder need --ip-adapter FILE[:SCALE]")
        return []
    if not images:
        raise LdmkitError("--ip-adapter needs --ip-image IMAGE")
    if len(given) > 1 and len(images) != len(given):
        raise LdmkitError(f"{len(images)} --ip-image for {len(given)} --ip-adapter; give one image per adapter")
    pictures = [load_image(path, "--ip-image") for path in images]
    encoders: dict[str, object] = {}
    inputs = []
    for i, text in enumerate(given):
        path, scale = _parse_lora(text, "--ip-adapter")
        adapter = read_ip_adapter(path)
        where = args.image_encoder or find_image_encoder(path)
        if where is None:
            raise LdmkitError(
                f"--ip-adapter {path} needs {adapter.encoder}: give --image-encoder DIR_OR_FILE (no image_encoder/ "
                "folder beside it or one folder up)"
            )
        if str(where) not in encoders:
            encoders[str(where)] = load_image_encoder(where)
        own = pictures if len(given) == 1 else [pictures[i]]
        name = Path(path).stem
        inputs.append(
            ImagePromptInput(adapter.adapter, encoders[str(where)], own, scale, args.ip_start, args.ip_end, name)
        )
    return inputs
