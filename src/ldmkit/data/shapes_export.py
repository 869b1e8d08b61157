"""The shapes world written out: an image folder (NAME.png + NAME.txt, metadata.jsonl with the full
records) or webdataset tar shards, byte for byte the same for the same seed (`ldmkit shapes-data`)."""

import io
import json
import tarfile
from pathlib import Path

from PIL import Image

from ldmkit.data.shapes import edge_map, render, sample_scene, scene_mask
from ldmkit.errors import ConfigError


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def export(
    out: str | Path,
    split: str,
    n: int,
    seed: int = 0,
    size: int = 64,
    fmt: str = "folder",
    shard_size: int = 1000,
    extras: bool = False,
) -> dict:
    """Write n scenes as an image folder (NAME.png + NAME.txt caption, metadata.jsonl with the full
    records) or as webdataset tar shards (KEY.png, KEY.txt, KEY.json). `extras` adds the edge map
    and mask of each image (ControlNet work)."""
    if fmt not in ("folder", "shards"):
        raise ConfigError(f"format {fmt!r}; allowed: folder, shards")
    if n <= 0:
        raise ConfigError(f"n: {n}; allowed: 1 or more")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    tar = None
    meta = open(out / "metadata.jsonl.tmp", "w") if fmt == "folder" else None
    try:
        for i in range(n):
            scene = sample_scene(split, i, seed, size)
            image, masks = render(scene, with_masks=True)
            key = f"{split}-{i:06d}"
            record = {"file_name": f"{key}.png", "text": scene.caption, **scene.to_json()}
            blobs = {"png": _png_bytes(image), "txt": scene.caption.encode(), "json": json.dumps(record).encode()}
            if extras:
                blobs["edges.png"] = _png_bytes(edge_map(image))
                blobs["mask.png"] = _png_bytes(scene_mask(masks, size))
            if fmt == "folder":
                for ext in ("png", "txt", "edges.png", "mask.png"):
                    if ext in blobs:
                        (out / f"{key}.{ext}").write_bytes(blobs[ext])
                meta.write(json.dumps(record) + "\n")
            else:
                if i % shard_size == 0:
                    if tar is not None:
                        tar.close()
                        files[-1].with_suffix(".tmp").rename(files[-1])
                    files.append(out / f"{split}-{len(files):06d}.tar")
                    tar = tarfile.open(files[-1].with_suffix(".tmp"), "w")
                for ext, data in blobs.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    info.mtime = 0  # same seed, same bytes
                    tar.addfile(info, io.BytesIO(data))
    finally:
        if tar is not None:
            tar.close()
            files[-1].with_suffix(".tmp").rename(files[-1])
        if meta is not None:
            meta.close()
            (out / "metadata.jsonl.tmp").rename(out / "metadata.jsonl")
    shards = [str(f) for f in files]
    return {"out": str(out), "split": split, "n": n, "seed": seed, "size": size, "format": fmt, "shards": shards}
