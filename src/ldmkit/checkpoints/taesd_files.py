"""Tiny autoencoder (TAESD) files, in the layouts they are published in:

    original   madebyollin/taesd's taesd_decoder.pth / taesd_encoder.pth (or .safetensors): one part's
               nn.Sequential, keys by layer index ("1.weight", "3.conv.0.weight"). ComfyUI keeps them in
               models/vae_approx, the popular web UI in models/VAE-approx (as .pt), under these names:
               taesd_* for SD 1.x / 2.x, taesdxl_* for SDXL, taesd3_* for SD3, taef1_* for FLUX.
    module     the original TAESD module's state dict: encoder.N.* / decoder.N.*
    comfyui    ComfyUI's combined state dict: taesd_encoder.N.* / taesd_decoder.N.*, with vae_scale and
               vae_shift (the family's latent scale and shift, which ComfyUI applies to its raw latents)
    diffusers  an AutoencoderTiny folder (config.json, diffusion_pytorch_model.safetensors), or its
               weights alone: encoder.layers.N.* / decoder.layers.N.*, the decoder's indices one lower
               (diffusers applies the Clamp outside its Sequential)
    ours       the module layout in .safetensors, with the config and the family it was distilled for
               in the header (write_tiny_autoencoder; training/tiny_autoencoder.py makes them)

The architecture is read off the weights (latent channels, width, blocks per level); what they cannot
say (activation, upsampling mode and factor) is the original's unless a diffusers config says otherwise.
Loading is strict (components.strict_load): a missing, extra or misshapen weight is one line naming
the file. `.pth` / `.pt` files are read by the safe loader only (files.read_tensors): pickled code never
runs.

Which family a file decodes for: its latent channels say 4 (SD 1.x/2.x or SDXL) or 16 (SD3 or FLUX), and
within those only the published file name tells (taesd and taesdxl have the same shapes, as have taesd3
and taef1), or a combined file's vae_scale / vae_shift."""

import json
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from ldmkit.checkpoints.components import strict_load, strip_prefix
from ldmkit.checkpoints.families import FAMILIES, Family
from ldmkit.checkpoints.files import read_tensors, write_safetensors
from ldmkit.config import from_dict, to_dict
from ldmkit.errors import CheckpointError, ConfigError
from ldmkit.models.autoencoder import AutoencoderConfig
from ldmkit.models.tiny_autoencoder import TinyAutoencoder, TinyAutoencoderConfig

# layout: (encoder prefix, decoder prefix, how much lower the file's decoder indices are than the original's)
LAYOUTS = {
    "diffusers": ("encoder.layers.", "decoder.layers.", 1),  # before "module": its keys start alike
    "comfyui": ("taesd_encoder.", "taesd_decoder.", 0),
    "module": ("encoder.", "decoder.", 0),
}
COMBINED_EXTRAS = ("vae_scale", "vae_shift")  # ComfyUI's combined files: scalars beside the weights
FOLDER_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
)
METADATA_KEY = "ldmkit_tiny_autoencoder"  # ours: {"config": ..., "family": ..., "teacher": ...}
SUFFIXES = (".safetensors", ".pth", ".pt")  # safetensors first: it needs no unpickling at all
# The published tiny autoencoders (madebyollin/NAME): whom they are for, in words, and their latent
# channels (their families' autoencoders'). Which families read each is the family table's column.
PUBLISHED = {"taesd": ("SD 1.x/2.x", 4), "taesdxl": ("SDXL", 4), "taesd3": ("SD3", 16), "taef1": ("FLUX", 16)}
NO_TINY_DECODER = (
    "no tiny decoder is given: pass --tiny-decoder FILE_OR_DIR (in Python tiny_decoder=PATH), the model family's: "
    + ", ".join(
        f"{name}_decoder.* for {label}"
        for name, (label, _) in PUBLISHED.items()
        if any(f.supported for f in FAMILIES.values() if f.tiny_autoencoder == name)
    )
    + " (madebyollin/taesd), or the folder holding it"
)
CONFIG_FIELDS = {f.name for f in fields(TinyAutoencoderConfig)}
# AutoencoderTiny config fields that change no decode or encode (see TinyAutoencoderConfig), and
# block_out_channels, diffusers' copy of decoder_block_out_channels.
CONFIG_IGNORED = {"latent_magnitude", "latent_shift", "force_upcast", "block_out_channels"}


def published_names() -> list[str]:
    """The published names, longest first (taesdxl before taesd)."""
    return sorted(PUBLISHED, key=len, reverse=True)


def published_name(path: str | Path) -> str | None:
    """The published name a file or folder is called by (taesd_decoder.pth -> taesd, a diffusers folder
    taesdxl -> taesdxl), or None."""
    stem = Path(path).name.lower()
    return next((n for n in published_names() if re.match(rf"{n}(?![a-z0-9])", stem)), None)


def families_for(name: str) -> list[Family]:
    return [f for f in FAMILIES.values() if f.tiny_autoencoder == name]


@dataclass
class TinyAutoencoderFile:
    autoencoder: TinyAutoencoder
    path: Path
    layout: str
    published: str | None  # the published name the file is called by, if any
    # ComfyUI's combined files: the (scale, shift) its raw latents are mapped with before the decoder,
    # i.e. the family's own; None where the file does not say.
    made_for: tuple[float, float] | None = None
    # ours: the family and the model whose autoencoder it was distilled from
    family: str | None = None
    teacher: str | None = None

    def name_for(self) -> str | None:
        """The published name of the latents this file is for: from its name, else from a combined file's
        scale and shift, else None (4 or 16 channels alone do not tell). A name whose files have other
        latent channels than this one's says nothing."""
        if self.published is not None and PUBLISHED[self.published][1] == self.autoencoder.config.latent_channels:
            return self.published
        if self.family is not None:
            return (FAMILIES[self.family].tiny_autoencoder or None) if self.family in FAMILIES else None
        if self.made_for is not None:
            for f in FAMILIES.values():
                if f.tiny_autoencoder and _close((f.vae_scale_factor, f.vae_shift_factor), self.made_for):
                    return f.tiny_autoencoder
        return None

    def describe(self) -> dict:
        """`ldmkit inspect`'s entry: kind, layout, parts, latent channels, and the families it is for."""
        c, name = self.autoencoder.config, self.name_for()
        if self.family is not None:  # ours
            rows = [FAMILIES[self.family]] if self.family in FAMILIES else []
            source = f"{self.teacher} ({self.family})" if self.teacher else f"a {self.family} model"
            note = f"a tiny autoencoder distilled from {source}: use it with --tiny-decoder"
        elif name is not None:
            rows = families_for(name)
            note = f"a tiny autoencoder ({name}) for {PUBLISHED[name][0]}: use it with --tiny-decoder"
        else:
            same = [n for n in PUBLISHED if PUBLISHED[n][1] == c.latent_channels]
            rows = [f for n in same for f in families_for(n)]
            which = f"{' and '.join(same)} files have these shapes alike and the file's name does not say which"
            note = (
                f"a tiny autoencoder for {c.latent_channels}-channel latents: "
                + (which if same else "no published one reads such latents")
                + " (use it with --tiny-decoder)"
            )
        return {
            "family": "tiny-autoencoder",
            "kind": "tiny autoencoder (TAESD)",
            "supported": True,
            "layout": self.layout,
            "parts": list(self.autoencoder.parts),
            "latent_channels": c.latent_channels,
            "parameters": {part: _params(getattr(self.autoencoder, part)) for part in self.autoencoder.parts},
            "upsample_factor": c.upsample_factor if self.autoencoder.decoder is not None else None,
            "published_name": name,
            "for_families": [f.name for f in rows],
            "note": note,
        }


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _close(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return all(abs(x - y) <= 1e-4 * max(1.0, abs(x)) for x, y in zip(a, b))


# --- the architecture from the weights -----------------------------------------------------------


def _layers(state: dict[str, torch.Tensor], part: str, where: str) -> list[tuple[int, str]]:
    """(index, "conv" | "block") of one part's weighted layers, in order (original indices)."""
    found: dict[int, str] = {}
    for key in state:  # every key starts with a layer index (_split)
        head, _, rest = key.partition(".")
        kind = "conv" if rest in ("weight", "bias") else "block"  # a block's own names are strict_load's to check
        if found.setdefault(int(head), kind) != kind:
            raise CheckpointError(f"{where}: {part} layer {head} mixes a convolution's and a block's weights")
    return sorted(found.items())


def _conv_shape(state: dict[str, torch.Tensor], index: int, part: str, where: str) -> tuple[int, ...]:
    w = state.get(f"{index}.weight")
    if w is None or w.ndim != 4:
        shape = "missing" if w is None else f"of shape {tuple(w.shape)}"
        raise CheckpointError(f"{where}: {part} layer {index} is no convolution (its weight is {shape})")
    return tuple(w.shape)


def _decoder_fields(state: dict[str, torch.Tensor], where: str) -> dict:
    """Clamp at 0, the first convolution at 1, blocks, a convolution after each upsampling, the last one."""
    layers = _layers(state, "decoder", where)
    if len(layers) < 2 or layers[0] != (1, "conv") or layers[-1][1] != "conv":
        raise CheckpointError(f"{where}: not a TAESD decoder (its layers should start with a convolution at index 1)")
    first, last = _conv_shape(state, 1, "decoder", where), _conv_shape(state, layers[-1][0], "decoder", where)
    blocks, widths = [0], []
    for index, kind in layers[1:]:
        if kind == "block":
            blocks[-1] += 1
            continue
        widths.append(_conv_shape(state, index, "decoder", where)[1])  # a level's width: its closing conv's input
        blocks.append(0)
    return dict(
        latent_channels=first[1],
        out_channels=last[0],
        decoder_block_out_channels=tuple(widths),
        num_decoder_blocks=tuple(blocks[:-1]),
    )


def _encoder_fields(state: dict[str, torch.Tensor], where: str) -> dict:
    """The first convolution at 0, blocks, a stride-2 convolution opening each further level, the last one."""
    layers = _layers(state, "encoder", where)
    if len(layers) < 2 or layers[0] != (0, "conv") or layers[-1][1] != "conv":
        raise CheckpointError(f"{where}: not a TAESD encoder (its layers should start with a convolution at index 0)")
    first, last = _conv_shape(state, 0, "encoder", where), _conv_shape(state, layers[-1][0], "encoder", where)
    blocks, widths = [], []
    for index, kind in layers[:-1]:
        if kind == "block":
            blocks[-1] += 1
            continue
        widths.append(_conv_shape(state, index, "encoder", where)[0])  # a level's width: its opening conv's output
        blocks.append(0)
    return dict(
        in_channels=first[1],
        latent_channels=last[0],
        encoder_block_out_channels=tuple(widths),
        num_encoder_blocks=tuple(blocks),
    )


def _build(parts: dict[str, dict], base: dict, where: str) -> TinyAutoencoder:
    """The autoencoder of `parts` (original-index states by part), its config from `base` (a diffusers
    config's fields, or {}) completed from the weights, loaded strictly."""
    read = {"encoder": _encoder_fields, "decoder": _decoder_fields}
    found = {part: read[part](state, where) for part, state in parts.items()}
    if len({f["latent_channels"] for f in found.values()}) > 1:
        raise CheckpointError(
            f"{where}: the encoder writes {found['encoder']['latent_channels']} latent channels, the decoder reads "
            f"{found['decoder']['latent_channels']}: not one tiny autoencoder"
        )
    fields_ = {**{k: v for f in found.values() for k, v in f.items()}, **base}
    try:
        config = TinyAutoencoderConfig(**fields_)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    model = TinyAutoencoder(config, encoder="encoder" in parts, decoder="decoder" in parts)
    for part, state in parts.items():
        strict_load(getattr(model, part), state, f"tiny {part}", where)
    return model.eval().requires_grad_(False)


# --- layouts -------------------------------------------------------------------------------------


def _renumber(state: dict[str, torch.Tensor], offset: int) -> dict[str, torch.Tensor]:
    """A part's keys with their layer index raised by `offset` (diffusers' decoder -> the original's)."""
    if not offset:
        return state
    out = {}
    for key, v in state.items():
        head, _, rest = key.partition(".")
        out[f"{int(head) + offset}.{rest}" if head.isdigit() else key] = v
    return out


def _split(state: dict[str, torch.Tensor], where: str) -> tuple[str, dict[str, dict], tuple[float, float] | None]:
    """(layout, original-index state of each part present, the combined file's (scale, shift) or None)."""
    keys = list(state)
    for layout, (enc, dec, offset) in LAYOUTS.items():
        if not any(k.startswith((enc, dec)) for k in keys):
            continue
        parts = {"encoder": strip_prefix(state, enc), "decoder": _renumber(strip_prefix(state, dec), offset)}
        foreign = sorted(k for part in parts.values() for k in part if not k.partition(".")[0].isdigit())
        if foreign:
            raise CheckpointError(
                f"{where}: not a tiny autoencoder (TAESD): {', '.join(foreign[:3])} under {enc} / {dec} are no "
                "layer indices (a full autoencoder goes to --vae)"
            )
        extras = COMBINED_EXTRAS if layout == "comfyui" else ()
        left = [k for k in keys if not k.startswith((enc, dec)) and k not in extras]
        if left:
            raise CheckpointError(
                f"{where}: unexpected key(s) beside the {layout} layout's: {', '.join(sorted(left)[:3])}"
            )
        made_for = None
        if any(k in state for k in extras):
            try:
                made_for = (float(state["vae_scale"]), float(state["vae_shift"]))
            except (KeyError, RuntimeError, ValueError):
                raise CheckpointError(f"{where}: vae_scale and vae_shift must both be single numbers") from None
        return layout, {p: s for p, s in parts.items() if s}, made_for
    if keys and all(k.partition(".")[0].isdigit() for k in keys):  # one part, the original's own file
        return "original", {"encoder" if "0.weight" in state else "decoder": state}, None
    raise CheckpointError(
        f"{where}: not a tiny autoencoder (TAESD) file: its keys ({', '.join(sorted(keys)[:3])}) are none of the "
        "published layouts (1.weight..., taesd_decoder.1.weight..., decoder.layers.0.weight...)"
    )


def _folder_config(folder: Path) -> dict:
    """A diffusers AutoencoderTiny config.json's fields, every one read or refused."""
    where = str(folder / "config.json")
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{where}: unreadable ({str(e).splitlines()[0][:100]})") from None
    if not isinstance(cfg, dict) or cfg.get("_class_name") != "AutoencoderTiny":
        name = cfg.get("_class_name") if isinstance(cfg, dict) else None
        raise CheckpointError(f"{where}: a {name!r}, not an AutoencoderTiny (a tiny autoencoder's diffusers folder)")
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in CONFIG_FIELDS | CONFIG_IGNORED)
    if unknown:
        raise CheckpointError(f"{where}: unknown AutoencoderTiny field(s) {', '.join(unknown)}")
    try:
        config = from_dict(TinyAutoencoderConfig, {k: v for k, v in cfg.items() if k in CONFIG_FIELDS}, where)
    except ConfigError as e:
        raise CheckpointError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
    return {k: getattr(config, k) for k in CONFIG_FIELDS}


def read_tiny_autoencoder(path: str | Path) -> TinyAutoencoderFile:
    """A tiny autoencoder file (any layout above) or diffusers folder."""
    p = Path(path)
    if p.is_dir():
        weights = next((p / w for w in FOLDER_WEIGHTS if (p / w).is_file()), None)
        if not (p / "config.json").is_file() or weights is None:
            raise CheckpointError(
                f"{p}: a tiny autoencoder's diffusers folder needs config.json and {FOLDER_WEIGHTS[0]}"
            )
        base = _folder_config(p)
        state, _ = read_tensors(weights)
        layout, parts, _ = _split(state, str(weights))
        if layout != "diffusers":
            raise CheckpointError(f"{weights}: the {layout} layout in a diffusers folder (expected decoder.layers.N)")
        return TinyAutoencoderFile(_build(parts, base, str(weights)), p, "diffusers", published_name(p))
    return tiny_autoencoder_from_state(*read_tensors(p), p)


def tiny_autoencoder_from_state(
    state: dict[str, torch.Tensor], metadata: dict, path: str | Path
) -> TinyAutoencoderFile:
    """The tiny autoencoder of a file's tensors and header (read already)."""
    layout, parts, made_for = _split(state, str(path))
    if METADATA_KEY not in metadata:
        return TinyAutoencoderFile(_build(parts, {}, str(path)), Path(path), layout, published_name(path), made_for)
    try:  # ours: what the weights cannot say is in the header
        ours = json.loads(metadata[METADATA_KEY])
        config = from_dict(TinyAutoencoderConfig, ours["config"], f"{path} header")
        family, teacher = str(ours.get("family") or "") or None, str(ours.get("teacher") or "") or None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable {METADATA_KEY} header ({e})") from None
    model = _build(parts, {k: getattr(config, k) for k in CONFIG_FIELDS}, str(path))
    return TinyAutoencoderFile(model, Path(path), "ours", published_name(path), made_for, family, teacher)


def write_tiny_autoencoder(tiny: TinyAutoencoder, path: str | Path, family: str = "", teacher: str = "") -> None:
    """Ours, atomically: the module layout (encoder.N.* / decoder.N.*, which the popular UIs' loaders of
    the original files read part by part), the config and the family it decodes for in the header."""
    header = {"config": to_dict(tiny.config), "family": family, "teacher": teacher}
    write_safetensors(path, tiny.state_dict(), {METADATA_KEY: json.dumps(header)})


def is_tiny_autoencoder_folder(path: str | Path) -> bool:
    """Whether a folder is a diffusers AutoencoderTiny folder (its config says so)."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("_class_name") == "AutoencoderTiny"
    except (OSError, ValueError, AttributeError):
        return False


def is_tiny_autoencoder_state(state: dict[str, torch.Tensor]) -> bool:
    """Whether a file's tensors are laid out as a tiny autoencoder's: one of the layouts above, with layer
    indices under its prefixes (a full autoencoder's encoder.down.* is not)."""
    try:
        _split(state, "")
    except CheckpointError:
        return False
    return True


def listing_summary(state: dict[str, torch.Tensor], metadata: dict, where: str) -> dict:
    """What `ldmkit models` says of a tiny autoencoder file from its keys and header alone: its parts and the
    family it decodes for (our header's, or the published file name's), or CheckpointError if it is none."""
    _, parts, _ = _split({k: v for k, v in state.items() if k not in COMBINED_EXTRAS}, where)
    family = ""
    if METADATA_KEY in metadata:
        try:
            family = json.loads(metadata[METADATA_KEY]).get("family", "")
        except (ValueError, AttributeError):
            raise CheckpointError(f"{where}: its {METADATA_KEY} header is not a JSON object") from None
    name = published_name(where)
    made_for = family or (PUBLISHED[name][0] if name else "")
    return {"kind": "tiny-autoencoder", "parts": sorted(parts), "for": made_for}


# --- a model's tiny decoder ----------------------------------------------------------------------


def find_tiny_decoder(folder: str | Path, family: str) -> Path:
    """The family's published tiny decoder in `folder` (NAME_decoder.safetensors / .pth / .pt, a
    combined NAME_combined file, or a diffusers folder NAME), or one line saying what to put there."""
    row = FAMILIES.get(family)
    name = row.tiny_autoencoder if row else ""
    if not name:
        raise ConfigError(
            f"--tiny-decoder {folder}: no tiny decoder is published for {family} models; give the file itself"
        )
    stems = (f"{name}_decoder", f"{name}_combined")
    for candidate in [Path(folder) / f"{stem}{suffix}" for stem in stems for suffix in SUFFIXES]:
        if candidate.is_file():
            return candidate
    if (Path(folder) / name / "config.json").is_file():
        return Path(folder) / name
    raise ConfigError(
        f"--tiny-decoder {folder}: no {name}_decoder.safetensors / .pth / .pt nor a diffusers folder {name} there "
        f"(the tiny decoder for {row.title}: madebyollin/{name})"
    )


def check_fits(tiny: TinyAutoencoderFile, family: str, vae: AutoencoderConfig, where: str) -> None:
    """Refuse, in one line, a tiny decoder that cannot decode the latents of a model of `family` with
    this autoencoder: no decoder, other latent channels or upsampling, no RGB output, or a file that
    names (or was combined or distilled for) another family."""
    c = tiny.autoencoder.config
    row = FAMILIES.get(family)
    if tiny.autoencoder.decoder is None:
        raise ConfigError(f"{where}: a tiny encoder alone; a decoder is needed (NAME_decoder.*)")
    if c.latent_channels != vae.embed_dim:
        raise ConfigError(
            f"{where}: decodes {c.latent_channels}-channel latents; this model's have {vae.embed_dim}"
            + (f" (its tiny decoder: {row.tiny_autoencoder}_decoder)" if row and row.tiny_autoencoder else "")
        )
    if c.upsample_factor != vae.downsample_factor or c.out_channels != 3:
        raise ConfigError(
            f"{where}: makes {c.out_channels}-channel images {c.upsample_factor}x the latents' size; this model's "
            f"autoencoder makes RGB at {vae.downsample_factor}x"
        )
    name = tiny.name_for()
    if name is not None and row is not None and row.tiny_autoencoder and name != row.tiny_autoencoder:
        raise ConfigError(
            f"{where}: a tiny decoder for {PUBLISHED[name][0]} ({name}); this model is {row.title}: "
            f"give {row.tiny_autoencoder}_decoder"
        )
    # ours: distilled for another family, whose latents are not known to be this one's (SD 1 and SD 2 share them)
    same_latents = name is not None and row is not None and name == row.tiny_autoencoder
    if tiny.family is not None and tiny.family != family and not same_latents:
        raise ConfigError(
            f"{where}: distilled for {FAMILIES[tiny.family].title if tiny.family in FAMILIES else tiny.family} models"
            f"{f' ({tiny.teacher})' if tiny.teacher else ''}; this model is {row.title if row else repr(family)}"
        )
    if tiny.made_for is not None and not _close((vae.scale_factor, vae.shift_factor), tiny.made_for):
        raise ConfigError(
            f"{where}: combined for latents scaled by {tiny.made_for[0]:g} and shifted by {tiny.made_for[1]:g}; this "
            f"model's are scaled by {vae.scale_factor:g} and shifted by {vae.shift_factor:g}"
        )
