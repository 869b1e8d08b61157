"""`ldmkit bench --model sd3.5-medium`: SD3.5 Medium's transformer (random weights) in ldmkit and in
diffusers, side by side on this CPU: one guidance pair (batch 2) at 1024² -- 4096 image tokens and 333
text tokens (77 CLIP + 256 T5) -- in fp32 and bf16, and each process's peak memory.

The weights are drawn once (seed 0) into diffusers' SD3Transformer2DModel and saved; each implementation
loads them in a fresh process of its own (ldmkit through checkpoints/mmdit_keys.py), so both hold the
same numbers. Reported as in evaluation/bench.py: seconds (median after a warm-up call), the ratio ldmkit
/ diffusers (< 1: ldmkit is faster), the largest output difference, FLOPs per call and the fraction of
this machine's matmul peak. `--quick`: a tiny transformer, a smoke test."""

import sys
import tempfile
from pathlib import Path

import torch

from ldmkit.evaluation.bench import give_work, matmul_peak, median_seconds, peak_rss_mb

# diffusers' transformer/config.json of stabilityai/stable-diffusion-3.5-medium
SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)  # fmt: skip
TINY = dict(SD35_MEDIUM, num_layers=2, num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=128,
            pooled_projection_dim=32, pos_embed_max_size=64, dual_attention_layers=(0,))  # fmt: skip
SETTINGS = {"sd3.5-medium": (SD35_MEDIUM, 1024, 333, 1), "sd3.5-medium-quick": (TINY, 256, 40, 2)}


def _build(config: dict, folder: Path) -> Path:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    give_work(SD3Transformer2DModel(**config)).save_pretrained(str(folder))
    return folder


def _load(impl: str, folder: Path, dtype: torch.dtype):
    if impl == "diffusers":
        from diffusers import SD3Transformer2DModel

        model = SD3Transformer2DModel.from_pretrained(str(folder)).to(dtype)
        return lambda x, t, ctx, y: model(x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t).sample
    from ldmkit.checkpoints import mmdit_keys
    from ldmkit.checkpoints.diffusers_text import component_weights, read_json
    from ldmkit.models.mmdit import MMDiT

    config = mmdit_keys.config_from_diffusers(read_json(folder / "config.json"))
    with torch.device("meta"):
        model = MMDiT(config).to(dtype)
    state = component_weights(folder, ("diffusion_pytorch_model.safetensors",), dtype)
    model.load_state_dict(mmdit_keys.diffusers_to_ours(state, config), assign=True)
    model.eval()
    return lambda x, t, ctx, y: model(x, t, ctx, y=y)


def child(impl: str, folder: str, mode: str, precision: str, out: str) -> None:
    """One implementation's guidance pair, in a process of its own; results saved to `out`."""
    config, size, tokens, runs = SETTINGS[mode]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    call = _load(impl, Path(folder), dtype)
    g = torch.Generator().manual_seed(0)
    latent = size // 8
    x = torch.randn(2, 16, latent, latent, generator=g).to(dtype)
    ctx = torch.randn(2, tokens, config["joint_attention_dim"], generator=g).to(dtype)
    y = torch.randn(2, config["pooled_projection_dim"], generator=g).to(dtype)
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        seconds = median_seconds(lambda: call(x, t, ctx, y), runs)
        out_tensor = call(x, t, ctx, y).float()
    torch.save({"seconds": seconds, "out": out_tensor, "peak_rss_mb": peak_rss_mb()}, out)


def transformer_flops(mode: str) -> float:
    """FLOPs of the pair: the linear layers counted by torch on the meta device, plus attention (4·L²·D
    per block and stream pass, which the counter does not see in the fused kernel)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ldmkit.checkpoints import mmdit_keys
    from ldmkit.models.mmdit import MMDiT

    config, size, tokens, _ = SETTINGS[mode]
    c = mmdit_keys.config_from_diffusers(dict(config, _class_name="SD3Transformer2DModel"))
    latent = size // 8
    with torch.device("meta"):
        model = MMDiT(c)
        x, ctx = torch.empty(2, 16, latent, latent), torch.empty(2, tokens, c.context_dim)
        with FlopCounterMode(display=False) as counter:
            model(x, torch.empty(2), ctx, y=torch.empty(2, c.pooled_dim))
    image = (latent // c.patch_size) ** 2
    joint = 4 * 2 * (image + tokens) ** 2 * c.hidden_size * c.depth
    dual = 4 * 2 * image**2 * c.hidden_size * len(c.dual_attention_layers)
    return counter.get_total_flops() + joint + dual


def run(quick: bool = False, vs_diffusers: bool = True, precisions=("fp32", "bf16"), progress=print) -> dict:
    from ldmkit.evaluation.bench import measure_module

    mode = "sd3.5-medium-quick" if quick else "sd3.5-medium"
    config, size, tokens, _ = SETTINGS[mode]
    flops = transformer_flops(mode)
    report: dict = {
        "mode": mode,
        "call": f"guidance pair (batch 2) at {size}x{size}, {tokens} text tokens",
        "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__},
        "peak_gflops": {"fp32": round(matmul_peak(torch.float32)), "bf16": round(matmul_peak(torch.bfloat16))},
        "tflop": round(flops / 1e12, 3),
        "results": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = _build(config, Path(tmp) / "transformer")
        for precision in precisions:
            peak = report["peak_gflops"][precision]
            row: dict = {}
            for impl in ("ldmkit", "diffusers") if vs_diffusers else ("ldmkit",):
                progress(f"{precision}: {impl}")
                r = measure_module("ldmkit.evaluation.bench_transformer", impl, folder, mode, precision)
                row[f"{impl}_s"] = round(r["seconds"], 3)
                row[f"{impl}_peak_rss_mb"] = round(r["peak_rss_mb"])
                row[f"{impl}_peak_fraction"] = round(flops / r["seconds"] / 1e9 / peak, 3)
                row.setdefault("outputs", []).append(r["out"])
            outs = row.pop("outputs")
            if vs_diffusers:
                row["ratio"] = round(row["ldmkit_s"] / row["diffusers_s"], 3)
                row["max_abs_diff"] = float((outs[0] - outs[1]).abs().max())
            progress(f"{precision}: {row}")
            report["results"][precision] = row
    return report


if __name__ == "__main__":
    child(*sys.argv[1:6])
