"""Peak memory of decoding a clip with Stable Video Diffusion's temporal decoder, whole or in chunks of frames.

Each (frames, chunk) runs in its own process: the decoder at SVD's size (widths 128-256-512-512, two blocks per
level; random weights: memory and time do not depend on their values), latents of `frames` frames, decoded
`chunk` frames at a time. Printed: the peak resident memory above the process's after building the model,
and the time. Usage: python benchmarks/video_decode_memory.py [HEIGHT WIDTH [FRAMES:CHUNK ...]] (default 256 448,
14 and 25 frames each whole and in chunks of 7, 2 and 1)."""

import json
import platform
import resource
import subprocess
import sys
import time


def one(frames: int, chunk: int, height: int, width: int) -> dict:
    import torch

    from ldmkit.models.autoencoder import AutoencoderConfig
    from ldmkit.models.video_autoencoder import TemporalAutoencoder

    torch.set_num_threads(1)
    vae = TemporalAutoencoder(AutoencoderConfig(channels=(128, 256, 512, 512))).eval()
    z = torch.randn(frames, 4, height // 8, width // 8)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with torch.no_grad():
        out = vae.decode(z, frames, chunk)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert out.shape == (frames, 3, height, width)
    return {
        "frames": frames,
        "chunk": chunk,
        "peak_mib_above_model": round((peak - base) / 1024),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--one":
        print(json.dumps(one(*map(int, sys.argv[2:]))))
        return
    height, width = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) >= 3 else (256, 448)
    runs = [tuple(map(int, a.split(":"))) for a in sys.argv[3:]] or [(f, c) for f in (14, 25) for c in (f, 7, 2, 1)]
    rows = []
    for frames, chunk in runs:
        cmd = [sys.executable, __file__, "--one", str(frames), str(chunk), str(height), str(width)]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
        print(json.dumps(rows[-1]), file=sys.stderr)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    report = {"size": f"{width}x{height}", "threads": 1, "cpu": cpu or platform.processor(), "rows": rows}
    report["command"] = "python benchmarks/video_decode_memory.py " + " ".join(sys.argv[1:])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
