"""Open emoji art as a captioned image set: Google's Noto Emoji (Apache-2.0) and Twitter's Twemoji
(CC-BY-4.0) 64x64 PNGs from the npm packages emoji-datasource-google / -twitter (Apple's and
Facebook's sets are not openly licensed and are never used).

`npm pack` fetches the two archives (pinned versions, checked against their sha1) into a cache; the
images are composited onto one fixed background (a naive RGB conversion leaves fringes) and written as
an image folder with NAME.txt captions, the layout the training commands read:

    "dog face, animals & nature, twemoji style"
    "thumbs up, medium skin tone, people & body, noto style"

Some (emoji, style) pairs are held out (a fixed fraction of emoji, each in one of the two styles) and
written to heldout/ instead of train/. The dataset folder appears only when complete."""

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import zlib
from pathlib import Path

from PIL import Image

from ldmkit.errors import LdmkitError

VERSION = "16.0.0"
PACKAGES = {  # style word -> (package, sha1 of its npm tarball, image folder inside it)
    "noto": ("emoji-datasource-google", "a80ac3e8106cbd4d8648ce758aa099e8827b6157", "img/google/64"),
    "twemoji": ("emoji-datasource-twitter", "e2bd39a8acb77e158106f8249dd7b4cd93fa1b14", "img/twitter/64"),
}
SKIN_TONES = {
    "1F3FB": "light skin tone",
    "1F3FC": "medium-light skin tone",
    "1F3FD": "medium skin tone",
    "1F3FE": "medium-dark skin tone",
    "1F3FF": "dark skin tone",
}
CREDITS = """Emoji artwork in this dataset:
- Noto Emoji, Copyright Google Inc., Apache License 2.0 (via the npm package emoji-datasource-google {v})
- Twemoji, Copyright Twitter, Inc and other contributors, CC-BY 4.0 (via emoji-datasource-twitter {v})
Data (names, categories) from emoji-datasource {v}, MIT License, by Cal Henderson / iamcal.
"""


def fetch(cache: Path) -> dict[str, Path]:
    """The two archives, from the cache or `npm pack`; each checked against its pinned sha1."""
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for style, (package, sha1, _) in PACKAGES.items():
        path = cache / f"{package}-{VERSION}.tgz"
        if not path.exists():
            try:
                run = subprocess.run(
                    ["npm", "pack", f"{package}@{VERSION}", "--pack-destination", str(cache), "--silent"],
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
            except FileNotFoundError:
                raise LdmkitError("npm is not installed: it fetches the emoji archives from the npm registry") from None
            except subprocess.TimeoutExpired:
                raise LdmkitError(f"npm pack {package}@{VERSION}: no answer from the npm registry in 600 s") from None
            if run.returncode != 0 or not path.exists():
                last = (run.stderr.strip().splitlines() or ["no output"])[-1][:200]
                raise LdmkitError(f"npm pack {package}@{VERSION} failed (is the npm registry reachable?): {last}")
        digest = hashlib.sha1(path.read_bytes()).hexdigest()
        if digest != sha1:
            path.unlink()
            raise LdmkitError(f"{path}: damaged download (sha1 {digest}, expected {sha1}); removed, run again")
        out[style] = path
    return out


def _entries(emoji_json: list[dict]) -> list[dict]:
    """(key, image file, caption words, has-image flags) for every emoji and skin-tone variant."""
    rows = []
    for e in emoji_json:
        name = (e.get("name") or e["short_name"].replace("_", " ")).lower()
        category = e["category"].lower()
        variants = [(e["image"], name, e)]
        for tone, v in (e.get("skin_variations") or {}).items():
            words = ", ".join(SKIN_TONES.get(t, t) for t in tone.split("-"))
            variants.append((v["image"], f"{name}, {words}", v))
        for image, words, flags in variants:
            if category == "component":
                continue  # bare skin-tone swatches and hair pieces: not pictures of anything
            rows.append({"image": image, "words": words, "category": category, "flags": flags})
    return rows


def _heldout(image: str, fraction: float) -> str | None:
    """The style in which this emoji is held out, for a fixed `fraction` of emoji (by a hash of its file)."""
    h = zlib.crc32(image.encode())
    if (h % 10_000) / 10_000 >= fraction:
        return None
    return list(PACKAGES)[(h // 10_000) % 2]


def prepare(
    archives: dict[str, Path], out: Path, size: int = 64, background=(255, 255, 255), heldout_fraction: float = 0.05
) -> dict:
    """Write out/train and out/heldout (NAME.png + NAME.txt), out/NOTICE.txt and out/manifest.json,
    atomically: into a temporary folder renamed into place at the end."""
    from ldmkit.images import to_rgb

    if out.exists():
        raise LdmkitError(f"{out}: already exists; choose a new --out (or remove it)")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {"train": 0, "heldout": 0}
    try:
        for split in counts:
            (tmp / split).mkdir(parents=True)
        meta = None
        for style, path in archives.items():
            package, _, folder = PACKAGES[style]
            flag = "has_img_google" if style == "noto" else "has_img_twitter"
            try:
                with tarfile.open(path) as tar:
                    members = {m.name: m for m in tar.getmembers()}
                    if meta is None:
                        meta = json.load(tar.extractfile(members["package/emoji.json"]))
                    for row in _entries(meta):
                        member = members.get(f"package/{folder}/{row['image']}")
                        if not row["flags"].get(flag) or member is None:
                            continue
                        with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:
                            rgb = to_rgb(im, background)
                        if rgb.size != (size, size):
                            rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
                        split = "heldout" if _heldout(row["image"], heldout_fraction) == style else "train"
                        stem = f"{style}-{Path(row['image']).stem}"
                        rgb.save(tmp / split / f"{stem}.png")
                        (tmp / split / f"{stem}.txt").write_text(f"{row['words']}, {row['category']}, {style} style\n")
                        counts[split] += 1
            except (tarfile.TarError, KeyError, OSError, EOFError, json.JSONDecodeError) as e:
                raise LdmkitError(
                    f"{path}: damaged archive ({type(e).__name__}: {str(e)[:120]}); delete it and run again"
                ) from None
        (tmp / "NOTICE.txt").write_text(CREDITS.format(v=VERSION))
        manifest = {
            "version": VERSION,
            "size": size,
            "background": list(background),
            "images": counts,
            "heldout_fraction": heldout_fraction,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
