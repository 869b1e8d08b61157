"""The latent cache: a dataset encoded once by a frozen autoencoder, so that training a latent model
costs no encoder pass per step.

Each image's posterior is kept, not one latent drawn from it: its mean and standard deviation (fp16,
half the memory), from which a training step draws a fresh latent each time, as the paper's code
samples. The cache is a file in the run folder (CACHE_FILE: {"mean": [N, C, h, w], "std": ...,
"readable": [N] bools}, item i of the dataset at row i), written atomically and read back by later runs
and resumes in that folder."""

import logging
from pathlib import Path

import torch

from ldmkit.checkpoints.files import atomic_write

log = logging.getLogger(__name__)
CACHE_FILE = "latent-cache.pt"
BATCH = 64  # images per encoder pass


@torch.no_grad()
def load_or_encode(folder: Path, data, vae, size: int) -> dict[str, torch.Tensor]:
    """The cache of `data` in `folder`: read when the file is there, else encoded and written. An
    unreadable image (data.load gives None) is encoded as a black one, so that rows stay item indices,
    and marked unreadable, so that training leaves it out as it does without the cache."""
    path = folder / CACHE_FILE
    if path.exists():
        cache = torch.load(path, map_location="cpu", weights_only=True)
        if len(cache["readable"]) == len(data):
            return cache
        # a folder reused with other data (another n, both-ways captions): its rows are not these items
        log.warning("%s holds %d images, the data %d: encoding anew", path, len(cache["readable"]), len(data))
    means, stds, readable = [], [], []
    n = len(data)
    for start in range(0, n, BATCH):
        items = [data.load(i) for i in range(start, min(n, start + BATCH))]
        images = torch.stack([it[0] if it is not None else torch.zeros(3, size, size) for it in items])
        post = vae.encode(images)
        means.append(post.mean.half())
        stds.append(post.std.half())
        readable += [it is not None for it in items]
    cache = {"mean": torch.cat(means), "std": torch.cat(stds), "readable": torch.tensor(readable)}
    atomic_write(path, lambda tmp: torch.save(cache, tmp))
    return cache


def posterior(cache: dict[str, torch.Tensor], items: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the cached posteriors of dataset items, in fp32."""
    idx = torch.tensor(items)
    return cache["mean"][idx].float(), cache["std"][idx].float()


def readable(cache: dict[str, torch.Tensor], item: int) -> bool:
    """Whether dataset item `item` was readable when the cache was encoded (a cache written before
    unreadable images were marked counts every row as readable, as the run that wrote it did)."""
    return "readable" not in cache or bool(cache["readable"][item])
