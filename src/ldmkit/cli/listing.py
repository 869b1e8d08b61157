"""`ldmkit models`: the bundled models with their chosen settings, what each file in a folder is for, and
where real checkpoints come from — as a table, or JSON."""

import json
from pathlib import Path

from ldmkit.errors import LdmkitError

# How each kind of file is given to `ldmkit generate` (and `serve`).
USE = {
    "model": "--model",
    "video-model": "ldmkit generate-video --model",
    "controlnet": "--controlnet",
    "lora": "--lora FILE[:WEIGHT], or --lora-dir FOLDER and <lora:NAME:W> in a prompt",
    "embedding": "--embeddings-dir FOLDER and its file name in a prompt",
    "vae": "--vae",
    "tiny-autoencoder": "--tiny-decoder (a decoder; or the folder it is in)",
    "upscaler": "--upscaler-dir FOLDER and --hires-upscaler NAME (its file name)",
    "ip-adapter": "--ip-adapter FILE[:SCALE] --ip-image IMAGE",
}


def cmd_models(args) -> int:
    from ldmkit.checkpoints.catalog import families_summary, scan

    for folder in args.folders:
        if not Path(folder).exists():
            raise LdmkitError(f"{folder}: no such file or folder")
    loads, not_yet = families_summary()
    report = {
        "bundled": _bundled(),
        "folders": [{"path": str(folder), "entries": _upscalers(scan(folder))} for folder in args.folders],
        "loads": loads,
        "recognised_not_supported": not_yet,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print("\n".join(_bundled_table(report["bundled"])))
    for folder in report["folders"]:
        print(f"\n{folder['path']}")
        print("\n".join(_folder_table(folder["entries"])) if folder["entries"] else "  (no weights files)")
    print(
        "\nReal checkpoints are .safetensors/.ckpt files or diffusers folders from Hugging Face or Civitai;"
        f" these load: {', '.join(loads)}; recognised but not supported yet: {', '.join(not_yet)}."
    )
    return 0


def _upscalers(entries: list[dict]) -> list[dict]:
    """Files the catalog does not recognise that spandrel recognises as model upscalers (ESRGAN...), from
    their headers; an old-style pickle stays unread, as the catalog leaves it."""
    from ldmkit.checkpoints.files import TORCH_LEGACY, sniff
    from ldmkit.errors import LdmkitError
    from ldmkit.pipelines.upscalers import SUFFIXES, describe

    out = []
    for e in entries:
        try:
            if e["kind"] == "unknown" and Path(e["path"]).suffix in SUFFIXES and sniff(e["path"]) != TORCH_LEGACY:
                found = describe(e["path"])
                e = {**e, "kind": "upscaler", "architecture": found.architecture, "scale": found.scale}
                e.pop("note", None)
        except LdmkitError:
            pass  # not an upscaler either: the catalog's reason stands
        out.append(e)
    return out


def _bundled() -> list[dict]:
    from ldmkit.bundled import BUNDLED, FAST, HERE, bundled_tiny_decoder
    from ldmkit.checkpoints.catalog import identify

    out = []
    fast_of = {fast: name for name, fast in FAST.items()}
    for name, entry in BUNDLED.items():
        found = identify(HERE / entry.file)
        controlnet = entry.controlnet if entry.controlnet and (HERE / entry.controlnet).is_file() else None
        out.append(
            {
                "name": name,
                "file": str(HERE / entry.file),
                "family": found.get("family"),
                "image_size": found.get("image_size"),
                "defaults": dict(entry.defaults),
                "size_bytes": found["size_bytes"],
                "controlnet": Path(controlnet).stem if controlnet else None,
                "fast": FAST.get(name),
                "fast_of": fast_of.get(name),
                "tiny_decoder": getattr(bundled_tiny_decoder(name), "stem", None),
                "recipe": entry.recipe,
                "note": found.get("note"),
            }
        )
    return out


def _size(n: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _bundled_table(models: list[dict]) -> list[str]:
    from ldmkit.bundled import DEFAULT

    rows = [["NAME", "FAMILY", "SIZE", "STEPS", "CFG", "SAMPLER", "DISK", "ALSO"]]
    for m in models:
        d, size = m["defaults"], m["image_size"]
        also = [f"ControlNet {m['controlnet']}"] if m["controlnet"] else []
        also += [f"--fast: {m['fast']}"] if m["fast"] else []
        also += [f"few-step version of {m['fast_of']}"] if m["fast_of"] else []
        also += [f"tiny decoder {m['tiny_decoder']} (--decoder tiny)"] if m["tiny_decoder"] else []
        also += [f"not readable: {m['note']}"] if m["family"] is None else []
        rows.append(
            [
                m["name"],
                m["family"] or "?",
                f"{size}x{size}" if size else "?",
                str(d.get("steps", "")),
                str(d.get("cfg", "")),
                d.get("sampler", ""),
                _size(m["size_bytes"]),
                "; ".join(also),
            ]
        )
    title = f"Bundled models (generate --model NAME; default {DEFAULT}; bundled:NAME always means these):"
    return [title, *_aligned(rows)]


def _what(e: dict) -> str:
    kind = e["kind"]
    if kind == "unknown":
        return f"not recognised: {e['note']}"
    if kind in ("model", "video-model"):
        if not e["supported"]:
            return f"{e['family']} model: {e['title']}, recognised but not supported yet"
        what = f"{e['family']} model: {e['title']}, {e['image_size']}x{e['image_size']}"
        if "text_encoders" in e:  # a file whose towers may be elsewhere (SD3): which it carries
            what += f", text encoders: {', '.join(e['text_encoders']) or 'none (--text-encoders DIR)'}"
        return what
    if kind == "vae":
        return "VAE (an autoencoder alone)"
    if kind == "upscaler":
        return f"{e['architecture']} upscaler, {e['scale']}x"
    if kind == "tiny-autoencoder":
        made_for = f" for {e['for']}" if e["for"] else " (its family unknown: name it as published, e.g. taesd_*)"
        return f"tiny autoencoder (TAESD) {' and '.join(e['parts'])}{made_for}"
    if kind == "ip-adapter":
        return f"IP-Adapter ({e['adapter']}) for {e['base family']}, reads {e['image encoder']}"
    name = {"controlnet": "ControlNet", "lora": "LoRA", "embedding": "embedding"}[kind]
    if kind == "embedding":
        name += f" of {e['vectors']} vector{'s' if e['vectors'] != 1 else ''}"
    if e["fits"]:
        return f"{name} for {', '.join(e['fits'])}"
    return f"{name} for no family ldmkit loads (width {e['width']})" if e["width"] else name


def _folder_table(entries: list[dict]) -> list[str]:
    rows = [["NAME", "DISK", "WHAT"]]
    for e in entries:
        usable = e["kind"] != "unknown" and (e["kind"] not in ("model", "video-model") or e["supported"])
        what = _what(e) + (f"; use with {USE[e['kind']]}" if usable else "")
        rows.append([e["name"], _size(e["size_bytes"]), what])
    return _aligned(rows)


def _aligned(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def add_models(sub) -> None:
    p = sub.add_parser(
        "models",
        help="list the bundled models, and what each file in the folders given is for (read from headers alone)",
    )
    p.add_argument(
        "folders", nargs="*", metavar="FOLDER", help="folders (searched 3 deep) or files: models, ControlNets, LoRAs..."
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=cmd_models)
