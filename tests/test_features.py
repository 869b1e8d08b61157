"""Measures for sets with no exact judge: the Fréchet distance against its closed forms, a feature
classifier that learns separable labels, nearest-neighbour recall."""

import numpy as np
import torch

from ldmkit.evaluation.features import (
    Labelled,
    accuracy,
    embed,
    frechet_distance,
    nearest,
    recall_at,
    train_classifier,
)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20000, 4))
    assert frechet_distance(a, a) < 1e-9
    shifted = a + np.array([1.0, 2.0, 0.0, 0.0])
    assert abs(frechet_distance(a, shifted) - 5.0) < 1e-6  # same covariance: |mu_a - mu_b|^2
    b = rng.standard_normal((20000, 4)) * 3.0  # N(0, I) vs N(0, 9I): d (1 - 3)^2 = 16
    assert abs(frechet_distance(a, b) - 16.0) < 0.5
    assert frechet_distance(a, rng.standard_normal((20000, 4))) < 0.01  # two samples of one law


def test_classifier_features_and_recall():
    g = torch.Generator().manual_seed(0)
    n = 96
    colour = torch.randint(0, 3, (n,), generator=g)
    side = torch.randint(0, 2, (n,), generator=g)
    images = torch.full((n, 3, 32, 32), -1.0)
    for i in range(n):  # a coloured block on the left or the right
        x0 = 2 if side[i] == 0 else 18
        images[i, colour[i], 8:24, x0 : x0 + 12] = 1.0
    images += 0.1 * torch.randn(images.shape, generator=g)
    data = Labelled(images, {"colour": colour, "side": side}, {"colour": ["r", "g", "b"], "side": ["l", "r"]})
    net = train_classifier(data, steps=150, batch=32, flip=False)
    assert accuracy(net, data, "colour") == 1.0 and accuracy(net, data, "side") == 1.0
    f = embed(net, images)
    _, idx = nearest(f, f, k=5, exclude_self=True)
    assert recall_at(colour, colour, idx, 1) >= 0.9
    assert recall_at(colour, colour, idx, 5) >= recall_at(colour, colour, idx, 1)
