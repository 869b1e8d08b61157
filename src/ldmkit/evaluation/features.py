"""Measures for image sets with no exact judge (the emoji model): a small classifier trained on the
data's own labels gives a feature space; in it, nearest neighbours say which training image a
generation resembles (recall@k of the prompted name, memorisation), its style head says whether the
asked style was drawn, and the Fréchet distance compares whole sets (Heusel et al. 2017, with this
feature space in place of Inception's, which cannot be fetched here)."""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [n, d]:
    |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), the square roots through symmetric
    eigendecompositions (no scipy; stable for the positive semi-definite matrices covariances are)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)

    def sqrt_psd(m):
        w, v = np.linalg.eigh((m + m.T) / 2)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    root_a = sqrt_psd(s_a)
    cross = sqrt_psd(root_a @ s_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(cross))


class FeatureNet(nn.Module):
    """A small convolutional classifier for 64x64 RGB images with one head per label set; its
    penultimate activations are the feature space."""

    def __init__(self, heads: dict[str, int], width: int = 32, dim: int = 128):
        super().__init__()
        layers, ch = [], 3
        for mult in (1, 2, 4, 4):
            layers += [
                nn.Conv2d(ch, width * mult, 3, padding=1),
                nn.GroupNorm(8, width * mult),
                nn.SiLU(),
                nn.Conv2d(width * mult, width * mult, 3, padding=1, stride=2),
                nn.SiLU(),
            ]
            ch = width * mult
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, dim), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(dim, n) for name, n in heads.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x in [-1, 1], [B, 3, H, W] -> [B, dim]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {name: head(f) for name, head in self.heads.items()}


@dataclass
class Labelled:
    images: torch.Tensor  # [N, 3, H, W] in [-1, 1]
    labels: dict[str, torch.Tensor]  # head name -> [N] class indices
    classes: dict[str, list[str]]  # head name -> class names


def train_classifier(
    data: Labelled, steps: int = 2000, batch: int = 64, lr: float = 2e-3, seed: int = 0, flip: bool = True
) -> FeatureNet:
    """Train every head at once (summed cross-entropy), deterministic given the seed."""
    torch.manual_seed(seed)
    net = FeatureNet({k: len(v) for k, v in data.classes.items()})
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    n = len(data.images)
    net.train()
    for step in range(steps):
        idx = torch.randint(0, n, (min(batch, n),), generator=g)
        x = data.images[idx]
        if flip:
            x = torch.where(torch.rand(len(idx), 1, 1, 1, generator=g) < 0.5, x.flip(-1), x)
        out = net(x)
        loss = sum(F.cross_entropy(out[k], data.labels[k][idx]) for k in out)
        opt.zero_grad()
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + np.cos(np.pi * step / steps))
        opt.step()
    return net.eval()


@torch.no_grad()
def embed(net: FeatureNet, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([net.features(images[i : i + batch]) for i in range(0, len(images), batch)])


@torch.no_grad()
def accuracy(net: FeatureNet, data: Labelled, head: str) -> float:
    logits = torch.cat([net(data.images[i : i + 256])[head] for i in range(0, len(data.images), 256)])
    return float((logits.argmax(1) == data.labels[head]).float().mean())


def nearest(queries: torch.Tensor, keys: torch.Tensor, k: int = 5, exclude_self: bool = False):
    """(distances, indices) of the k nearest keys (Euclidean) of each query."""
    d = torch.cdist(queries, keys)
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    return d.topk(k, largest=False)


def recall_at(query_labels: torch.Tensor, key_labels: torch.Tensor, indices: torch.Tensor, k: int) -> float:
    """Share of queries whose label is among the labels of their k nearest keys."""
    hits = (key_labels[indices[:, :k]] == query_labels[:, None]).any(1)
    return float(hits.float().mean())
