"""torch.compile (inductor, freezing) of the SD 1.5 UNet in bf16, channels-last, against eager.

    python benchmarks/compile_unet.py [LATENT]   (default 64: a 512² image)

Random weights (seed 0, every layer given work), guidance pair (batch 2). Prints JSON: eager and
compiled seconds per call (median of 3 after a warm-up), the cold compile (first call) time, the
speed-up and the largest difference between the two outputs."""

import json
import sys
import time

import torch

from ldmkit.evaluation.bench import give_work, median_seconds
from ldmkit.models.presets import preset
from ldmkit.models.unet import UNetModel


def main():
    latent = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    torch.manual_seed(0)
    unet = give_work(UNetModel(preset("sd15").unet))
    unet = unet.to(torch.bfloat16).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, latent, latent).bfloat16().to(memory_format=torch.channels_last)
    t, ctx = torch.tensor([500, 500]), torch.randn(2, 77, 768).bfloat16()
    with torch.no_grad():
        ref = unet(x, t, ctx)
        eager = median_seconds(lambda: unet(x, t, ctx), 3)
        compiled = torch.compile(unet.forward, options={"freezing": True})
        start = time.perf_counter()
        out = compiled(x, t, ctx)
        cold = time.perf_counter() - start
        warm = median_seconds(lambda: compiled(x, t, ctx), 3)
    print(
        json.dumps(
            {
                "latent": latent,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "eager_s": round(eager, 3),
                "compiled_s": round(warm, 3),
                "first_call_with_compile_s": round(cold, 1),
                "speedup": round(eager / warm, 3),
                "max_abs_diff": float((out.float() - ref.float()).abs().max()),
                "output_max_abs": float(ref.float().abs().max()),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
