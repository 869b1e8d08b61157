"""What each prediction type means in training: the loss's target, the inverse that recovers x0 and ε
from an output, and the Min-SNR weight's scale. Keys: models.ldm.PREDICTION_TYPES."""

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Prediction:
    """One UNet parameterisation, for z_t = a·x0 + s·ε with a = sqrt(ᾱ_t), s = sqrt(1 − ᾱ_t)."""

    target: Callable  # (x0, eps, a, s) -> what the UNet learns to output
    inverse: Callable  # (out, z_t, a, s) -> (x0, eps) the output stands for
    # Squared output error per unit of squared x0 error, as a function of SNR = a²/s². Min-SNR
    # weighting (Hang et al. 2023) is min(SNR, γ) on the x0 error, so a loss in this space is
    # weighted by min(SNR, γ) / x0_error_scale(SNR).
    x0_error_scale: Callable


# The one place that says what each prediction type means in training (the loss's target, the Min-SNR
# weight, and the inverse for code that needs x0 or ε from an output). Keys: models.ldm.PREDICTION_TYPES.
PREDICTIONS = {
    "epsilon": Prediction(
        target=lambda x0, eps, a, s: eps,
        inverse=lambda out, z, a, s: ((z - s * out) / a, out),
        x0_error_scale=lambda snr: snr,
    ),
    # v = a·ε − s·x0 (Salimans & Ho 2022); since a² + s² = 1, a·z_t − s·v = x0 and s·z_t + a·v = ε.
    "v_prediction": Prediction(
        target=lambda x0, eps, a, s: a * eps - s * x0,
        inverse=lambda out, z, a, s: (a * z - s * out, s * z + a * out),
        x0_error_scale=lambda snr: snr + 1,
    ),
    "sample": Prediction(
        target=lambda x0, eps, a, s: x0,
        inverse=lambda out, z, a, s: (out, (z - a * out) / s),
        x0_error_scale=lambda snr: torch.ones_like(snr),
    ),
    # Rectified flow's velocity v = ε − x0 (Liu et al. 2022), for z = a·x0 + s·ε with a + s = 1 there
    # (diffusion/flow.py); the inverse holds for any a, s: x0 = (z − s·v)/(a + s).
    "flow": Prediction(
        target=lambda x0, eps, a, s: eps - x0,
        inverse=lambda out, z, a, s: ((z - s * out) / (a + s), out + (z - s * out) / (a + s)),
        x0_error_scale=lambda snr: (snr.sqrt() + 1) ** 2,
    ),
}
