"""Where a UNet call's time goes, per operator kind, in PyTorch and in OpenVINO: the same module (our SD 1.5 UNet
with random weights, the guidance pair at one size), profiled with torch.profiler (self time of each operator)
and with OpenVINO's per-node counters (PERF_COUNT) after `--backend openvino`'s conversion. Prints JSON: seconds
per kind for each, and the whole call.

    python benchmarks/unet_operator_profile.py [SIZE] [fp32|bf16]      (default 512 fp32)
"""

import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from ldmkit.evaluation.bench import give_work
from ldmkit.evaluation.bench_report import describe_cpu
from ldmkit.models.openvino_backend import converted_model
from ldmkit.models.presets import sd15
from ldmkit.models.unet import UNetModel

# operator name fragments -> kind; the first match wins, so attention's own matmuls count as attention
TORCH_KINDS = [
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("convolution", ("convolution", "conv2d")),
    ("matmul", ("addmm", "aten::mm", "bmm", "matmul", "linear")),
    ("normalization", ("group_norm", "layer_norm", "native_batch_norm")),
    ("activation", ("gelu", "silu", "sigmoid")),
    ("elementwise", ("add", "mul", "div", "sub", "copy_", "cat", "fill_", "clone")),
]
# OpenVINO's CPU plugin fuses the attention pattern and chains of elementwise operations into "Subgraph"
# nodes (its Snippets code generator): their time is attention and elementwise work together.
OV_KINDS = [
    ("attention + elementwise (fused)", ("Subgraph",)),
    ("attention", ("ScaledDotProductAttention", "ScaledAttn", "SDPA")),
    ("convolution", ("Convolution",)),
    ("matmul", ("MatMul", "FullyConnected", "Gemm")),
    ("normalization", ("MVN", "GroupNormalization", "NormalizeL2")),
    ("activation", ("Gelu", "Swish", "Sigmoid")),
    ("elementwise", ("Eltwise", "Add", "Multiply", "Subtract", "Divide", "Concat")),
    ("other (layout, reshape, reorder)", ("Reorder", "Transpose", "Reshape", "VariadicSplit", "Split")),
]


def kind_of(name: str, table) -> str:
    for kind, fragments in table:
        if any(f.lower() in name.lower() for f in fragments):
            return kind
    return "other (layout, reshape, reorder)"


def torch_profile(unet, args) -> tuple[dict, float]:
    with torch.no_grad():
        unet(*args)  # warm-up
        started = time.perf_counter()
        unet(*args)
        whole = time.perf_counter() - started
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            unet(*args)
    kinds: dict = defaultdict(float)
    for e in prof.key_averages():
        kinds[kind_of(e.key, TORCH_KINDS)] += e.self_cpu_time_total / 1e6
    return dict(kinds), whole


def openvino_profile(unet, args, precision: str) -> tuple[dict, float, dict]:
    import openvino as ov

    with tempfile.TemporaryDirectory() as tmp:
        model, _, _ = converted_model(unet.forward, unet, args, ("x", "t", "context"), Path(tmp))
        model.reshape({model.inputs[i]: ov.PartialShape(list(a.shape)) for i, a in enumerate(args)})
        config = {
            "PERF_COUNT": "YES",
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        }
        compiled = ov.Core().compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    arrays = [a.float().numpy() for a in args]
    request.infer(arrays)  # warm-up
    started = time.perf_counter()
    request.infer(arrays)
    whole = time.perf_counter() - started
    kinds: dict = defaultdict(float)
    types: dict = defaultdict(float)
    for node in request.get_profiling_info():
        kinds[kind_of(node.node_type, OV_KINDS)] += node.real_time.total_seconds()
        types[node.node_type] += node.real_time.total_seconds()
    top = dict(sorted(((k, round(v, 3)) for k, v in types.items()), key=lambda kv: -kv[1])[:12])
    return dict(kinds), whole, top


def main() -> None:
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 512
    precision = sys.argv[2] if len(sys.argv) > 2 else "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    unet = give_work(UNetModel(sd15().unet)).eval().to(dtype)
    g = torch.Generator().manual_seed(0)
    args = (
        torch.randn(2, 4, size // 8, size // 8, generator=g).to(dtype),
        torch.tensor([500.0, 500.0]),
        torch.randn(2, 77, 768, generator=g).to(dtype),
    )
    ours, ours_whole = torch_profile(unet, args)
    theirs, theirs_whole, node_types = openvino_profile(unet, args, precision)
    report = {
        "machine": {**describe_cpu(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "call": f"SD 1.5 UNet, guidance pair at {size}², {precision}",
        "whole_call_s": {"pytorch": round(ours_whole, 3), "openvino": round(theirs_whole, 3)},
        "openvino_node_types_s": node_types,
        "per_kind_s": {
            kind: {"pytorch": round(ours.get(kind, 0.0), 3), "openvino": round(theirs.get(kind, 0.0), 3)}
            for kind in sorted(set(ours) | set(theirs), key=lambda k: -ours.get(k, 0.0))
        },
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
