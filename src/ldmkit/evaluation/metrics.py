"""Image metrics, written out: PSNR, SSIM (Wang et al. 2004, Gaussian window 11, sigma 1.5), and
the edge F-score with a distance tolerance used to measure ControlNets."""

import numpy as np
import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image, for tensors in [0, 1] shaped [B, C, H, W]."""
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(1.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM per image, for tensors in [0, 1] shaped [B, C, H, W] (channels averaged)."""
    c = a.shape[1]
    x = torch.arange(window, dtype=torch.float32) - window // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = (g / g.sum())[None]
    kernel = (g.T @ g)[None, None].repeat(c, 1, 1, 1).to(a)

    def blur(t):
        return F.conv2d(t, kernel, groups=c)

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def edge_fscore(pred: np.ndarray, ref: np.ndarray, tolerance: float = 2.0) -> dict:
    """Precision, recall and F of predicted edge pixels against reference ones (boolean [H, W]): a
    pixel counts as matched when an edge of the other map lies within `tolerance` pixels (Euclidean),
    as boundary benchmarks score edges. Two empty maps agree fully; one empty map scores 0."""
    import cv2

    pred, ref = pred.astype(bool), ref.astype(bool)
    if not pred.any() and not ref.any():
        return {"precision": 1.0, "recall": 1.0, "f": 1.0}
    if not pred.any() or not ref.any():
        return {"precision": float(not pred.any()), "recall": float(not ref.any()), "f": 0.0}

    def distance_to(edges):  # distance of every pixel to the nearest edge pixel
        return cv2.distanceTransform((~edges).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)

    precision = float((distance_to(ref)[pred] <= tolerance).mean())
    recall = float((distance_to(pred)[ref] <= tolerance).mean())
    f = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f": f}
