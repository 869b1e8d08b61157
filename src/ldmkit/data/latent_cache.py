"""The latent cache: a dataset encoded once by a frozen autoencoder, so that training a latent model
costs no encoder pass per step.

Each image's posterior is kept, not one latent drawn from it: its mean and standard deviation (fp16,
half the memory), from which a training step draws a fresh latent each time, as the paper's code
samples. The cache is a file in the run folder (CACHE_FILE: {"mean": [R, C, h, w], "std": ...,
"readable": [N] bools, "row": [N]}, item i's posterior at row row[i]; items that show the same image,
as a dataset's `image_of` says, share a row), written atomically and read back by later runs and resumes
in that folder. A cache without "row" (written before rows were shared) has item i at row i."""

import logging
import signal
from collections.abc import Callable
from pathlib import Path

import torch

from ldmkit.checkpoints.files import atomic_write
from ldmkit.errors import Stopped

log = logging.getLogger(__name__)
CACHE_FILE = "latent-cache.pt"
BATCH = 64  # images per encoder pass


@torch.no_grad()
def load_or_encode(
    folder: Path, data, vae, size: int, progress: bool = False, stopping: Callable[[], int | None] = lambda: None
) -> dict[str, torch.Tensor]:
    """The cache of `data` in `folder`: read when the file is there, else encoded and written. An
    unreadable image (data.load gives None) is encoded as a black one, so that rows stay item indices,
    and marked unreadable, so that training leaves it out as it does without the cache. Encoding can
    take many minutes (100k images), so it shows a bar when `progress`, and when `stopping()` names a
    signal it stops between batches with nothing written."""
    from tqdm import tqdm

    path = folder / CACHE_FILE
    if path.exists():
        cache = torch.load(path, map_location="cpu", weights_only=True)
        if len(cache["readable"]) == len(data):
            return cache
        # a folder reused with other data (another n, both-ways captions): its rows are not these items
        log.warning("%s holds %d images, the data %d: encoding anew", path, len(cache["readable"]), len(data))
    n = len(data)
    shown = [data.image_of(i) for i in range(n)] if hasattr(data, "image_of") else list(range(n))
    distinct = sorted(set(shown))
    row_of = {item: r for r, item in enumerate(distinct)}
    means, stds, ok = [], [], []
    bar = tqdm(total=len(distinct), desc="latent cache", unit="image", disable=not progress)
    for start in range(0, len(distinct), BATCH):
        signum = stopping()
        if signum is not None:
            bar.close()
            name = signal.Signals(signum).name
            raise Stopped(
                f"stopped by {name} while encoding the latent cache ({start} of {len(distinct)} images): "
                "nothing written; the next run encodes it",
                signum,
            )
        items = [data.load(i) for i in distinct[start : start + BATCH]]
        images = torch.stack([it[0] if it is not None else torch.zeros(3, size, size) for it in items])
        post = vae.encode(images)
        means.append(post.mean.half())
        stds.append(post.std.half())
        ok += [it is not None for it in items]
        bar.update(len(items))
    bar.close()
    rows = [row_of[s] for s in shown]
    readable = torch.tensor([ok[r] for r in rows])
    cache = {"mean": torch.cat(means), "std": torch.cat(stds), "readable": readable, "row": torch.tensor(rows)}
    atomic_write(path, lambda tmp: torch.save(cache, tmp))
    return cache


def posterior(cache: dict[str, torch.Tensor], items: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the cached posteriors of dataset items, in fp32."""
    idx = torch.tensor(items)
    if "row" in cache:
        idx = cache["row"][idx]
    return cache["mean"][idx].float(), cache["std"][idx].float()


def readable(cache: dict[str, torch.Tensor], item: int) -> bool:
    """Whether dataset item `item` was readable when the cache was encoded (a cache written before
    unreadable images were marked counts every row as readable, as the run that wrote it did)."""
    return "readable" not in cache or bool(cache["readable"][item])
