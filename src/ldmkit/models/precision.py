"""Which precision a model computes in: fp32, or bf16 where the CPU has bf16 matrix units and the
model is big enough to gain (docs/performance.md)."""

import torch

from ldmkit.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")
# Below ~100M parameters bf16 gave nothing on the CPUs measured (docs/performance.md).
BF16_MIN_PARAMS = 100_000_000


def resolve_precision(precision: str, unet_params: int) -> str:
    """fp32 or bf16 for a requested precision; auto: bf16 when the CPU has bf16 matrix units and the
    UNet has at least BF16_MIN_PARAMS parameters."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if unet_params >= BF16_MIN_PARAMS and bf16_supported() else "fp32"
    return precision


def bf16_supported() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX-512 BF16 / AMX) that oneDNN uses."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
