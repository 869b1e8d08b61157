"""Does long-sequence attention need chunking on CPU? Peak memory of one scaled_dot_product_attention
call (the op our UNet and VAE attention use) against the size its score matrix would have.

    python benchmarks/attention_memory.py [TOKENS ...]   (default 4096 16384 65536: SD 1.5's first
                                                          level at 512², 1024², 2048²)

Each size in a fresh process: batch 2 x 8 heads x 40 channels, bf16 (the UNet's fast path). Prints
JSON per size: the inputs' MB, the peak resident memory the call added (VmHWM after - before) and what
the fp32 score matrix alone would take if it were materialised, and the seconds."""

import json
import subprocess
import sys

CHILD = """
import time, torch, torch.nn.functional as F
from ldmkit.evaluation.bench import peak_rss_mb
n = {n}
q, k, v = (torch.randn(2, 8, n, 40).bfloat16() for _ in range(3))
before = peak_rss_mb()
t = time.perf_counter()
out = F.scaled_dot_product_attention(q, k, v)
seconds = time.perf_counter() - t
print(peak_rss_mb() - before, seconds)
"""


def main():
    sizes = [int(a) for a in sys.argv[1:]] or [4096, 16384, 65536]
    rows = []
    for n in sizes:
        out = subprocess.run([sys.executable, "-c", CHILD.format(n=n)], capture_output=True, text=True, check=True)
        added, seconds = (float(x) for x in out.stdout.split())
        rows.append(
            {
                "tokens": n,
                "inputs_mb": round(3 * 2 * 8 * n * 40 * 2 / 2**20, 1),
                "peak_added_mb": round(added, 1),
                "score_matrix_fp32_mb": round(2 * 8 * n * n * 4 / 2**20),
                "seconds": round(seconds, 2),
            }
        )
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
