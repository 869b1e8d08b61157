"""Reading tensors from files safely, and writing them atomically.

A file's format is recognised from its content, never from its extension: a `.safetensors` name
on a pickle is still read as a pickle -- and a pickle is only ever read by
`torch.load(weights_only=True)` with the small allow-list of inert classes below, so pickled code
never runs whatever the file is called."""

import hashlib
import json
import os
import pickle
import re
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ldmkit.errors import CheckpointError

SAFETENSORS, TORCH_ZIP, TORCH_LEGACY, DIFFUSERS = "safetensors", "torch-zip", "torch-legacy", "diffusers"


def sniff(path: str | Path) -> str:
    """The format of `path` from its first bytes (or, for a folder, from its files)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    if p.is_dir():
        if (p / "model_index.json").exists() or (p / "unet" / "config.json").exists():
            return DIFFUSERS
        if (p / "config.json").exists():
            return DIFFUSERS
        raise CheckpointError(f"{p}: a folder but not a diffusers model (no model_index.json, unet/ or config.json)")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(9)
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and n <= size - 8:
            return SAFETENSORS
        if head[8:9] == b"{":
            raise CheckpointError(f"{p}: truncated safetensors file (header says {n} bytes, file has {size - 8})")
    if head.startswith(b"PK\x03\x04"):
        return TORCH_ZIP
    if head[:1] == b"\x80":
        return TORCH_LEGACY
    raise CheckpointError(f"{p}: not a checkpoint (neither safetensors nor a PyTorch zip/pickle file)")


class _InertRecord:
    """Stand-in for objects that training frameworks pickle next to the weights (a
    `ModelCheckpoint` callback's settings). Built from plain data only, never called."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


_numpy_scalar = (getattr(np, "_core", None) or np.core).multiarray.scalar  # numpy 2 moved it

# Classes that real SD/LDM `.ckpt` files pickle besides tensors. Everything else is refused.
ALLOWED_GLOBALS: list[tuple[Callable, str]] = [
    (_InertRecord, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (_InertRecord, "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint"),
    (_InertRecord, "pytorch_lightning.callbacks.early_stopping.EarlyStopping"),
    (_numpy_scalar, "numpy.core.multiarray.scalar"),
    (_numpy_scalar, "numpy._core.multiarray.scalar"),
    (np.dtype, "numpy.dtype"),
] + [
    (type(np.dtype(t)), f"numpy.dtypes.{type(np.dtype(t)).__name__}")
    for t in ("float64", "float32", "float16", "int64", "int32", "bool")
]


def safe_torch_load(p: Path):
    """torch.load with weights_only=True and the allow-list of inert classes: pickled code never runs."""
    try:
        # A file object, not a path: torch.load picks a reader by file extension when given a path.
        with open(p, "rb") as f, torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = found.group(1) if found else "a non-tensor object"
        raise CheckpointError(
            f"{p}: refused to load: the file pickles {what}, which is not an inert tensor container "
            "(pickled code is never run; convert the file to .safetensors with a tool you trust)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(
            f"{p}: truncated or corrupt PyTorch checkpoint ({str(e).splitlines()[0][:120]})"
        ) from None


def _load_pickle(p: Path) -> dict[str, torch.Tensor]:
    obj = safe_torch_load(p)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        meta = {k: v for k, v in obj.items() if k in ("global_step", "epoch") and isinstance(v, int)}
        obj = obj["state_dict"]
    else:
        meta = {}
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{p}: a PyTorch file, but it holds no state dict of tensors")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    state["__meta__"] = meta  # type: ignore[assignment]
    return state


SAFETENSORS_TORCH = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _header(f) -> tuple[dict, int]:
    """A safetensors file's JSON header and the offset where its data starts."""
    (n,) = struct.unpack("<Q", f.read(8))
    return json.loads(f.read(n)), 8 + n


def _read_safetensors_as(f, header: dict, base: int, dtype_for) -> dict[str, torch.Tensor]:
    """Each tensor read with plain file reads and converted at once to dtype_for(name) (None: as
    stored), so converting never holds the file's pages and the converted copies together: mapping
    the file (safetensors' loader) keeps every page read in this process until the last tensor goes.
    Loading SD 1.5 in bf16 (python benchmarks/load_memory.py FOLDER bf16): peak 6.2 GB mapped, 3.5 GB
    this way (docs/performance.md)."""
    size = os.fstat(f.fileno()).st_size
    state = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_TORCH.get(info.get("dtype"))
        shape, (start, end) = info.get("shape"), info.get("data_offsets", (0, -1))
        if dtype is None or not isinstance(shape, list):
            raise ValueError(f"tensor {name}: unsupported dtype {info.get('dtype')!r} or shape")
        count = int(np.prod(shape, dtype=np.int64))
        if not 0 <= start <= end <= size - base or end - start != count * dtype.itemsize:
            raise ValueError(f"tensor {name}: data offsets {start}..{end} do not fit its shape or the file")
        f.seek(base + start)
        t = torch.empty(shape, dtype=dtype)  # uninitialised: the read fills it
        raw = t.reshape(-1).view(torch.uint8)
        if end > start and f.readinto(memoryview(raw.numpy()).cast("B")) != end - start:
            raise ValueError(f"tensor {name}: the file ends early")
        target = dtype_for(name) if t.is_floating_point() else None
        state[name] = t.to(target) if target is not None and target != dtype else t
    return state


def read_tensors(
    path: str | Path, dtype_for: Callable[[str], torch.dtype | None] | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a single checkpoint file, whatever its extension. dtype_for: for a
    safetensors file, the dtype each floating tensor is converted to as it is read (None: as stored);
    without it the tensors are mapped from the file (safetensors' own loader)."""
    p = Path(path)
    fmt = sniff(p)
    if fmt == DIFFUSERS:
        raise CheckpointError(f"{p}: a folder; expected a single checkpoint file")
    if fmt == SAFETENSORS:
        try:
            with open(p, "rb") as f:
                header, base = _header(f)
                state = _read_safetensors_as(f, header, base, dtype_for) if dtype_for else load_file(str(p))
        except (SafetensorError, OSError, ValueError, RuntimeError, struct.error) as e:
            raise CheckpointError(f"{p}: corrupt safetensors file ({str(e).splitlines()[0][:120]})") from None
        return state, dict(header.get("__metadata__") or {})
    state = _load_pickle(p)
    meta = state.pop("__meta__")  # type: ignore[arg-type]
    return state, {k: str(v) for k, v in meta.items()}  # type: ignore[union-attr]


def safetensors_dtypes(path: str | Path) -> set[str]:
    """Floating-point dtypes stored in a safetensors file, read from its header alone."""
    with open(path, "rb") as f:
        header, _ = _header(f)
    stored = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return {
        str(SAFETENSORS_TORCH[d]).removeprefix("torch.")
        for d in stored
        if d in SAFETENSORS_TORCH and SAFETENSORS_TORCH[d].is_floating_point
    }


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file's bytes as 64 hex digits, read in 16 MiB blocks (never the whole file at once)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def check_writable(path: str | Path) -> None:
    """Refuse, before any work, a file path that atomic_write could not write: a folder, under a file,
    or in a folder this process may not write to."""
    p = Path(path)
    if p.is_dir():
        raise CheckpointError(f"{p}: is a folder; give a file path")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CheckpointError(f"{p}: cannot be written ({parent} is a file, not a folder)")
    try:  # a real probe: permissions alone do not say (root in /proc, read-only mounts)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise CheckpointError(f"{p}: cannot be written in {parent} ({e.strerror or e})") from None


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temporary file beside `path`, then rename it into place: a crash leaves
    either the old file or the new one, never half of one."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    except OSError as e:
        raise CheckpointError(f"{p}: cannot be written ({e.strerror or e})") from None
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)  # mkstemp makes the file private; give it the mode a plain open() would
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_folder(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temporary folder beside `path`, then rename it into place (replacing an old
    folder there): an interrupted conversion never leaves a half-written model."""
    dest = Path(path)
    if dest.exists() and not dest.is_dir():
        raise CheckpointError(f"{dest}: exists and is not a folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        write(tmp)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    seen, out = set(), {}
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        if v.numel() and v.data_ptr() in seen:  # safetensors refuses tensors that share memory
            v = v.clone()
        seen.add(v.data_ptr())
        out[k] = v
    tensors = out
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def write_json(path: str | Path, data: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


# --- files named by users inside a folder (LoRAs, upscalers) ------------------------------------------

LISTED = 20  # a refusal lists at most this many names: a folder may hold thousands, the line goes to clients


def _folder_root(folder: str | Path | None) -> Path | None:
    try:
        return Path(folder).expanduser().resolve() if folder is not None else None
    except (OSError, RuntimeError):
        return None


def _inside(name: str, root: Path, suffixes: tuple[str, ...]) -> Path | None:
    """root/NAME+suffix if NAME is a plain file name and that file, after symlinks, is inside root. Names
    come from prompts and requests, so anything that could point elsewhere (separators, `..`, drives,
    NUL) is no name; a symlink is followed only as far as the folder."""
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\:\0"):
        return None
    for suffix in suffixes:
        path = root / f"{name}{suffix}"
        try:
            if path.resolve().is_relative_to(root) and path.is_file():
                return path
        except (OSError, ValueError, RuntimeError):  # too long, a symlink loop: not a file here
            continue
    return None


def file_in_folder(name: str, folder: str | Path | None, suffixes: tuple[str, ...]) -> Path | None:
    """NAME's file (any of `suffixes`) directly in `folder`, or None: a name that would leave the folder
    is not told apart from a missing one, so a refusal never says whether something exists outside."""
    root = _folder_root(folder)
    path = _inside(name, root, suffixes) if root is not None and root.is_dir() else None
    return Path(folder).expanduser() / path.name if path is not None else None


def names_in_folder(folder: str | Path | None, suffixes: tuple[str, ...]) -> list[str]:
    """The names file_in_folder accepts: files directly in the folder, not symlinks leading out of it."""
    root = _folder_root(folder)
    if root is None or not root.is_dir():
        return []
    try:
        stems = {p.stem for p in root.iterdir() if p.suffix in suffixes}
    except OSError:  # an unreadable folder offers nothing
        return []
    return sorted(s for s in stems if _inside(s, root, suffixes) is not None)


def listed(names: list[str]) -> str:
    """Names for a one-line message: at most LISTED of them."""
    return ", ".join(names[:LISTED]) + (f" and {len(names) - LISTED} more" if len(names) > LISTED else "")
