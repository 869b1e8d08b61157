"""Training images with captions, addressed by index so that the order of samples, and with it a
run, is a pure function of (seed, sample index): that is what makes resume and multi-process
training exact.

- ImageFolder: NAME.png (jpg, webp, ...) with a NAME.txt caption beside it, or a metadata.jsonl
  listing {"file_name": ..., "text": ...} (the common imagefolder convention).
- ShardData: tar shards in the webdataset layout (KEY.png + KEY.txt + ...), indexed once by member
  offsets so that any sample can be read directly: each process reads its own samples, and resume
  is exact, exactly as for folders.
- ShapesData: the shapes world, rendered on the fly.
Images are composited onto a background if they have alpha, resized (shorter side) and
centre-cropped; horizontal flips are off unless asked (a flip breaks "left"/"right" captions).
Unreadable images, and images whose header declares more than TRAINING_MAX_PIXELS pixels (refused
before they are decoded), are skipped with a warning and counted."""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldmkit.data.shapes import SPLITS, any_colours, canonical, caption_for, converse, sample_scene
from ldmkit.data.shapes import render as render_scene
from ldmkit.errors import ConfigError
from ldmkit.images import MAX_PIXELS, open_image, to_rgb

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
# The most pixels a training image may declare. Every image is scaled down to data.size (at most a
# thousand or so pixels a side) at once, so more pixels only cost memory: 64 MP is above a full-frame
# camera's photo (24-61 MP) and decodes to at most 256 MB (RGBA), one image at a time. A larger header
# is far more likely a decompression bomb (a few hundred bytes declaring gigapixels) than training data.
TRAINING_MAX_PIXELS = MAX_PIXELS


@dataclass
class DataConfig:
    kind: str = "shapes"  # shapes | folder | shards
    path: str | None = None  # folder of images (folder), or folder / glob of .tar files (shards)
    split: str = "train"  # shapes split
    n: int = 50000  # shapes: how many distinct scenes
    seed: int = 0  # shapes: scene seed
    size: int = 64
    captions: str = "required"  # required | optional (missing -> "")
    background: tuple[int, int, int] = (255, 255, 255)
    flip: bool = False
    # shapes: "named" draws the captions' colours; "any" gives each shape a random colour half the time
    # (autoencoders: a palette wide enough for colours taught later, e.g. pink and teal)
    colours: str = "named"
    # shapes: "both-ways" doubles the split, items n..2n-1 being scenes 0..n-1 captioned anew, a relation
    # stated the other way round ("X above Y" as "Y below X"): each image is seen with both statements;
    # "canonical" states every relation as "above" or "to the left of", so the shape named first is always
    # the upper or left one (word order alone says which is where)
    relations: str = "as-drawn"
    # shapes: the share of relation scenes captioned without their colours ("a star above a circle"), chosen
    # per scene; the shape named first is still the upper or left one with relations: canonical. Such a
    # caption says where each shape goes by word order alone, where a coloured one lets a model guess each
    # shape from its colour (training never shows a held-out colour with its shape).
    uncoloured: float = 0.0

    def __post_init__(self):
        if self.kind not in ("shapes", "folder", "shards"):
            raise ConfigError(f"data.kind: {self.kind!r}; allowed: shapes, folder, shards")
        if self.captions not in ("required", "optional"):
            raise ConfigError(f"data.captions: {self.captions!r}; allowed: required, optional")
        if self.colours not in ("named", "any"):
            raise ConfigError(f"data.colours: {self.colours!r}; allowed: named, any")
        if self.relations not in ("as-drawn", "both-ways", "canonical"):
            raise ConfigError(f"data.relations: {self.relations!r}; allowed: as-drawn, both-ways, canonical")
        if not 0.0 <= self.uncoloured <= 1.0:
            raise ConfigError(f"data.uncoloured: {self.uncoloured}; allowed: a share from 0 to 1")
        if self.kind != "shapes" and (self.colours, self.relations, self.uncoloured) != ("named", "as-drawn", 0.0):
            raise ConfigError(
                "data.colours, data.relations and data.uncoloured are options of the shapes world (kind: shapes)"
            )
        if self.kind in ("folder", "shards") and not self.path:
            raise ConfigError(f"data.path: needed with kind: {self.kind}")


def prepare(image: Image.Image, size: int, background=(255, 255, 255)) -> torch.Tensor:
    """[3, size, size] in [-1, 1]: alpha composited, shorter side resized, centre-cropped."""
    image = to_rgb(image, tuple(background))
    w, h = image.size
    scale = size / min(w, h)
    if (w, h) != (size, size):
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(arr).permute(2, 0, 1)


def _decode(dataset, source, where: str, caption: str) -> tuple[torch.Tensor, str] | None:
    """Open source() as an image and prepare it; an unreadable one, or one declaring more than
    TRAINING_MAX_PIXELS pixels (refused from its header, before decoding), is skipped, warned and counted."""
    try:
        image = open_image(source(), where, TRAINING_MAX_PIXELS)
        return prepare(image, dataset.config.size, dataset.config.background), caption
    # OSError: source() itself (a shard that went away); ValueError: a mode that does not convert to RGB
    except (ConfigError, OSError, ValueError) as e:
        dataset.skipped += 1
        reason = str(e).removeprefix(f"{where}: ").splitlines()[0][:120]
        log.warning("skipping unreadable image %s (%s); %d skipped so far", where, reason, dataset.skipped)
        return None


class ImageFolder:
    def __init__(self, config: DataConfig):
        self.config = config
        folder = Path(config.path).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"data.path {folder}: no such folder")
        meta = folder / "metadata.jsonl"
        entries: list[tuple[Path, str]] = []
        if meta.exists():
            for n, line in enumerate(meta.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    entries.append((folder / row["file_name"], str(row.get("text", ""))))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ConfigError(f'{meta}:{n}: expected {{"file_name": ..., "text": ...}}') from None
        else:
            for p in sorted(folder.iterdir()):
                if p.suffix.lower() not in IMAGE_SUFFIXES or ".edges." in p.name or ".mask." in p.name:
                    continue
                caption_file = p.with_suffix(".txt")
                if caption_file.exists():
                    entries.append((p, caption_file.read_text().strip()))
                elif config.captions == "required":
                    raise ConfigError(
                        f"{p}: no caption file {caption_file.name} (captions: required; "
                        "set data.captions: optional to train with empty captions)"
                    )
                else:
                    entries.append((p, ""))
        if not entries:
            raise ConfigError(f"data.path {folder}: no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        self.entries = entries
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.entries)

    def caption(self, i: int) -> str:
        return self.entries[i][1]

    def load(self, i: int) -> tuple[torch.Tensor, str] | None:
        path, caption = self.entries[i]
        return _decode(self, lambda: path, str(path), caption)


class ShapesData:
    def __init__(self, config: DataConfig):
        self.config = config
        self.skipped = 0

    def __len__(self) -> int:
        return self.config.n * (2 if self.config.relations == "both-ways" else 1)

    def _scene(self, i: int):
        """(scene, caption) of item i; seeded by the item alone, like the scene itself, so that resume
        and multi-process runs stay exact."""
        c = self.config
        scene = sample_scene(c.split, i % c.n, c.seed, c.size)
        intent, key = scene.intent, None  # key: which stream of the item's seed draws a new caption
        if c.relations == "canonical" and (restated := canonical(scene.intent)) is not scene.intent:
            intent, key = restated, 3
        elif i >= c.n:
            intent, key = converse(scene.intent), 2
        rng = np.random.default_rng
        uncoloured = scene.intent.relation is not None and c.uncoloured > 0
        uncoloured = uncoloured and rng([SPLITS[c.split], c.seed, i, 4]).random() < c.uncoloured
        if key is None and not uncoloured:
            return scene, scene.caption
        return scene, caption_for(intent, rng([SPLITS[c.split], c.seed, i, key or 3]), colours=not uncoloured)

    def caption(self, i: int) -> str:
        return self._scene(i)[1]

    def image_of(self, i: int) -> int:
        """The item whose image item i shows: with both-ways captions and named colours, items n..2n-1
        draw scenes 0..n-1 again exactly (only the caption differs), so a latent cache encodes them once."""
        c = self.config
        return i % c.n if c.colours == "named" else i

    def load(self, i: int) -> tuple[torch.Tensor, str]:
        c = self.config
        scene, caption = self._scene(i)
        colours = None
        if c.colours == "any":
            colours = any_colours(scene, np.random.default_rng([SPLITS[c.split], c.seed, i, 1]))
        return prepare(render_scene(scene, colours=colours), c.size), caption


class ShardData:
    def __init__(self, config: DataConfig):
        import tarfile

        self.config = config
        p = Path(config.path).expanduser()
        tars = sorted(p.glob("*.tar")) if p.is_dir() else sorted(p.parent.glob(p.name))
        if not tars:
            raise ConfigError(f"data.path {p}: no .tar shards")
        self.entries: list[tuple[Path, int, int, str]] = []  # (shard, image offset, image size, caption)
        for tar_path in tars:
            try:
                with tarfile.open(tar_path) as tar:
                    samples: dict[str, dict] = {}
                    for m in tar.getmembers():
                        if not m.isfile() or "." not in m.name:
                            continue
                        key, ext = m.name.split(".", 1)
                        samples.setdefault(key, {})[ext.lower()] = m
                    for key, parts in samples.items():
                        image = next((parts[e] for e in ("png", "jpg", "jpeg", "webp") if e in parts), None)
                        if image is None:
                            continue
                        caption = (
                            tar.extractfile(parts["txt"]).read().decode("utf-8").strip() if "txt" in parts else None
                        )
                        if caption is None and config.captions == "required":
                            raise ConfigError(f"{tar_path}: sample {key} has no .txt caption (captions: required)")
                        self.entries.append((tar_path, image.offset_data, image.size, caption or ""))
            except (tarfile.TarError, OSError) as e:
                raise ConfigError(f"{tar_path}: not a readable tar shard ({e})") from None
        if not self.entries:
            raise ConfigError(f"data.path {p}: the shards hold no images")
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.entries)

    def caption(self, i: int) -> str:
        return self.entries[i][3]

    def load(self, i: int) -> tuple[torch.Tensor, str] | None:
        import io

        path, offset, size, caption = self.entries[i]

        def member():
            with open(path, "rb") as f:
                f.seek(offset)
                return io.BytesIO(f.read(size))

        return _decode(self, member, f"sample {i} of {path}", caption)


def open_dataset(config: DataConfig):
    return {"shapes": ShapesData, "folder": ImageFolder, "shards": ShardData}[config.kind](config)


def validation_images(val: DataConfig | None, n: int, size: int) -> torch.Tensor:
    """The first `n` readable images of a held-out set: `val`, or the shapes world's val split."""
    dataset = open_dataset(val or DataConfig(kind="shapes", split="val", n=n, size=size))
    items = [dataset.load(i) for i in range(min(n, len(dataset)))]
    return torch.stack([item[0] for item in items if item is not None])


class Order:
    """Which item is global sample g: a fresh permutation of the dataset each epoch, from the seed."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def item(self, g: int) -> int:
        epoch, pos = divmod(g, self.n)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return int(self._perm[pos])


class PriorMix:
    """Instance images with regularisation ("prior") images, for training an adapter on a few dozen
    images without forgetting what the base model drew (DreamBooth's prior preservation, kohya's reg
    images): items 0..n-1 are the instance set, the rest the prior set; `MixedOrder` alternates them."""

    def __init__(self, instance, prior):
        self.instance, self.prior = instance, prior

    def __len__(self) -> int:
        return len(self.instance) + len(self.prior)

    def _which(self, i: int):
        n = len(self.instance)
        return (self.instance, i) if i < n else (self.prior, i - n)

    def caption(self, i: int) -> str:
        data, j = self._which(i)
        return data.caption(j)

    def load(self, i: int):
        data, j = self._which(i)
        return data.load(j)


class MixedOrder:
    """Even global samples from the instance set, odd ones from the prior set, each in its own epochs:
    every batch is half of each, whatever the sets' sizes (the loss weighs both halves equally)."""

    def __init__(self, mix: PriorMix, seed: int):
        self.n = len(mix.instance)
        self.instance, self.prior = Order(len(mix.instance), seed), Order(len(mix.prior), seed + 1)

    def item(self, g: int) -> int:
        half, odd = divmod(g, 2)
        return self.n + self.prior.item(half) if odd else self.instance.item(half)


def sample_generator(seed: int, g: int) -> torch.Generator:
    """The random stream of global sample g (its noise, timestep, dropout): independent of batch
    size, of the process count and of where a run was resumed."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, g]).generate_state(1)[0]))


def load_batch(dataset, order: Order, indices: range, flip: bool, seed: int):
    """(images [b, 3, H, W], captions, global indices) for the global sample indices given; unreadable
    images are left out."""
    images, captions, kept = [], [], []
    for g in indices:
        item = dataset.load(order.item(g))
        if item is None:
            continue
        image, caption = item
        if flip and torch.rand((), generator=sample_generator(seed + 1, g)) < 0.5:
            image = image.flip(-1)
        images.append(image)
        captions.append(caption)
        kept.append(g)
    if not images:
        return None
    return torch.stack(images), captions, kept
