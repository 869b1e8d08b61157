"""GroupNorm on bf16 activations on CPU: the fp32 round trip GroupNorm32 used to take against the
kernel's own mixed-precision path (bf16 in and out, fp32 affine weights, fp32 statistics inside).

    python benchmarks/group_norm_bf16.py

SD 1.5's shapes at a 64x64 latent (batch 2), both memory layouts. Prints JSON: milliseconds (median
of 7 after warm-up) and the largest difference from the fp32 round trip, in bf16 steps of the value."""

import json

import torch
import torch.nn.functional as F

from ldmkit.evaluation.bench import median_seconds


def main():
    rows = []
    for channels in (320, 640, 960):
        for layout in (torch.contiguous_format, torch.channels_last):
            g = torch.Generator().manual_seed(channels)
            x = (torch.randn(2, channels, 64, 64, generator=g) * 4 + 1).bfloat16().contiguous(memory_format=layout)
            w, b = torch.randn(channels, generator=g), torch.randn(channels, generator=g)

            def round_trip():
                return F.group_norm(x.float(), 32, w, b, 1e-5).to(torch.bfloat16)

            def direct():
                return F.group_norm(x, 32, w, b, 1e-5)

            ref = F.group_norm(x.float(), 32, w, b, 1e-5)
            steps = ((direct().float() - ref).abs() / (ref.abs() * 2**-8 + 1e-12)).max()
            rows.append(
                {
                    "channels": channels,
                    "layout": "channels_last" if layout == torch.channels_last else "default",
                    "round_trip_ms": round(median_seconds(round_trip, 7) * 1e3, 2),
                    "direct_ms": round(median_seconds(direct, 7) * 1e3, 2),
                    "largest_diff_bf16_steps": round(float(steps), 2),
                }
            )
    print(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
