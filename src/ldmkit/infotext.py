"""The popular web UI's generation parameters text ("infotext"), as stored in a PNG `parameters`
chunk, and PNG writing. Format:

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x512, ..."""

import re
from pathlib import Path

from PIL import Image, PngImagePlugin

from ldmkit.checkpoints.files import atomic_write
from ldmkit.errors import ConfigError

_FIELD = re.compile(r'\s*([\w \-/().+]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def format_infotext(prompt: str, negative: str, fields: dict) -> str:
    def value(v):
        text = f"{v:g}" if isinstance(v, float) else str(v)  # "CFG scale: 7", as the web UI writes
        return '"' + text.replace('"', '\\"') + '"' if ("," in text or ":" in text) else text

    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{k}: {value(v)}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def parse_infotext(text: str) -> tuple[str, str, dict]:
    """(prompt, negative prompt, fields) from an infotext (the web UI's or ours)."""
    lines = text.strip().split("\n")
    last = lines[-1] if lines else ""
    fields = {}
    if len(_FIELD.findall(last)) >= 3:
        fields = {
            k.strip(): (v[1:-1].replace('\\"', '"') if v.startswith('"') else v.strip())
            for k, v in _FIELD.findall(last)
        }
        lines = lines[:-1]
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt).strip(), "\n".join(negative).strip(), fields


def write_png(path: str | Path, image: Image.Image, parameters: str) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_png_parameters(path: str | Path) -> str:
    from ldmkit.pipelines.images import load_image

    im = load_image(path, "PNG")
    text = im.info.get("parameters")
    if not text:
        raise ConfigError(f"{path}: has no 'parameters' text chunk (not written by ldmkit or the web UI)")
    return text
