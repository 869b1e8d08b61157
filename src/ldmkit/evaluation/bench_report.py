"""What a bench report says: the machine it was measured on, each row's comparison of ldmkit with each
peer (seconds, ratio, how far apart the outputs are and whether that is within the precision's tolerance),
and the table people read. The measuring is evaluation/bench.py's."""

import os
from pathlib import Path

# The largest output difference from ldmkit's that still means "the same computation" (a guidance-pair
# UNet call or a decode: largest absolute difference; a whole image: mean absolute difference in levels
# of 255). ldmkit and diffusers measured 0.0 / 6e-5 in fp32 and 0.06 in bf16 at SD size, and an image
# 0.0008 / 2.7 levels: these bounds are several times that, so only a peer that computes something else
# fails them -- and then its time is not comparable.
TOLERANCE = {"fp32": {"call": 1e-3, "image_mean": 1.0}, "bf16": {"call": 0.25, "image_mean": 8.0}}
# The CPU features that decide what fp32 and bf16 cost here (AMX and AVX-512 BF16: native bf16 matmuls).
ISA_FLAGS = ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx2")


def _against(name: str, entry: dict, other: dict, peak: float, tolerance: dict) -> dict:
    """One peer's columns of one row: its seconds, ldmkit / peer, and how far its output is from ours."""
    col = {"s": other["seconds"], "ratio": round(entry["seconds"] / other["seconds"], 3)}
    if "setup_seconds" in other:  # OpenVINO's convert + compile, sd.cpp's load: paid once, not per call
        col["setup_s"] = round(other["setup_seconds"], 3)
    if "flops" in entry:
        col["peak_fraction"] = round(entry["flops"] / other["seconds"] / 1e9 / peak, 3)
    if "peak_rss_mb" in other:
        col["peak_rss_mb"] = round(other["peak_rss_mb"])
    col.update(other.get("detail", {}))  # sd.cpp's stage timings
    if other["out"].shape != entry["out"].shape:
        col["agrees"] = False
        col["shape"] = list(other["out"].shape)
        return col
    diff = (entry["out"] - other["out"]).abs()
    if name == "image":
        col["max_abs_pixel_diff"] = float(diff.max())
        col["mean_abs_pixel_diff"] = float(diff.mean())
        col["agrees"] = col["mean_abs_pixel_diff"] <= tolerance["image_mean"]
    else:
        col["max_abs_diff"] = float(diff.max())
        col["agrees"] = col["max_abs_diff"] <= tolerance["call"]
    return col


def compare(a: dict, peers: dict[str, dict], peak: float, precision: str = "fp32") -> dict:
    """Rows of the report from the ldmkit child's results `a` and each peer's (peer -> results; a peer
    measures the rows it can: sd.cpp only the whole image)."""
    r: dict = {}
    for name, entry in a.items():
        row = {"ldmkit_s": entry["seconds"]}
        if "flops" in entry:
            row["tflop"] = round(entry["flops"] / 1e12, 3)
            row["ldmkit_peak_fraction"] = round(entry["flops"] / entry["seconds"] / 1e9 / peak, 3)
        if name == "image":
            row["ldmkit_peak_rss_mb"] = round(entry["peak_rss_mb"])
        for peer, results in peers.items():
            if name in results:
                row[peer] = _against(name, entry, results[name], peak, TOLERANCE[precision])
        r[name] = row
    return r


def describe_cpu() -> dict:
    """The CPU by name and by the features that decide fp32 and bf16 speed, and the cores: measurements
    taken on CPUs that differ here are never compared with one another."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first processor's: they are alike
    except OSError:  # not Linux: the name platform gives, features unknown
        import platform

        fields["model name"] = platform.processor() or "unknown"
    flags = set(fields.get("flags", "").split())
    cpu_id = " ".join(f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields)
    return {
        "cpu": fields.get("model name", "unknown"),
        # a VM often names its CPU generically ("Intel(R) Xeon(R) Processor"): family/model tell it apart
        "cpu_id": cpu_id,
        "isa": [f for f in ISA_FLAGS if f in flags],
        "cores": os.cpu_count(),
    }


MEASUREMENTS = {"vae_decode": "VAE decode", "image": "whole image"}


def machine_line(m: dict, peers=()) -> str:
    """One line that says which machine a report comes from."""
    parts = [
        f"machine: {m.get('cpu')} ({m.get('cpu_id') or 'no id'})",
        "isa: " + (" ".join(m.get("isa", [])) or "none of " + " ".join(ISA_FLAGS)),
        f"{m.get('threads')} threads of {m.get('cores')} cores",
    ]
    if "peak_gflops" in m:
        parts.append(f"matmul peak fp32 {m['peak_gflops']['fp32']:,} / bf16 {m['peak_gflops']['bf16']:,} GFLOP/s")
    parts.append(", ".join(f"{k} {m[k]}" for k in ("torch", *peers) if k in m))
    return "; ".join(parts)


def format_table(report: dict) -> str:
    """The report as a table for people: the machine first, then one line per row and peer (seconds,
    ldmkit / peer, the largest output difference, and '!' where the peer's outputs disagree with ours
    beyond the tolerance, so that its time means nothing)."""
    lines = [
        machine_line(report["machine"], report["vs"]),
        f"model: {report['model']} (random weights), whole image: {report['image_steps']} steps DPM++ 2M at"
        f" {report['image_size']}², cfg {report['cfg']}",
        "",
        f"{'precision':<9} {'measurement':<16} {'ldmkit s':>9} {'peer':<15} {'peer s':>9} {'ldmkit/peer':>11}"
        f" {'largest diff':>13} {'setup s':>8}",
    ]
    for precision, rows in report["results"].items():
        for name, row in rows.items():
            label = MEASUREMENTS.get(name, name.replace("unet_pair_", "UNet pair ") + ("²" if "unet" in name else ""))
            for peer in [p for p in report["vs"] if p in row] or ["-"]:  # sd.cpp measures the image alone
                col = row.get(peer, {})
                diff = col.get("mean_abs_pixel_diff", col.get("max_abs_diff"))
                cells = [
                    f"{col['s']:.4g}" if "s" in col else "-",
                    f"{col['ratio']:.3f}" if "ratio" in col else "-",
                    ("-" if diff is None else f"{diff:.3g}") + ("!" if col.get("agrees") is False else " "),
                    str(col.get("setup_s", "")),
                ]
                lines.append(
                    f"{precision:<9} {label:<16} {row['ldmkit_s']:>9.4g} {peer:<15} {cells[0]:>9} {cells[1]:>11}"
                    f" {cells[2]:>13} {cells[3]:>8}"
                )
    lines.append("largest diff: of the outputs; for the whole image the mean, in levels of 255")
    if report.get("disagreements"):
        lines.append("! outputs disagree beyond the tolerance: those times compare different computations")
    return "\n".join(lines)
