"""Time to a good image: a 512² image from the SD 1.5 architecture the way CPU users make one fast -- an
LCM-LoRA merged at weight 1, 4 LCM steps at guidance 1 (no unconditional pass) and the tiny decoder --
against the default, 20 guided DPM++ 2M steps and the full decoder, in one warm process (each run once to
warm up, then timed; the median of `runs`, by the bench's median_seconds). Weights are random (the
bench's, seed 0), the LCM-LoRA is a random rank-64 one over the layers lcm-lora-sdv1-5 adapts and the
tiny decoder a random TAESD of the published shape: their time is what is measured, not their pictures
(docs/performance.md).

    python benchmarks/time_to_image.py [fp32|bf16] [RUNS] [PRESET SIZE]    (defaults: fp32 2 sd15 512;
                                                                            tiny 64 is a smoke test)
"""

import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ldmkit.checkpoints.taesd_files import write_tiny_autoencoder
from ldmkit.evaluation.bench import _build, describe_machine, give_work, median_seconds
from ldmkit.models.tiny_autoencoder import TinyAutoencoder, TinyAutoencoderConfig
from ldmkit.pipelines import Pipeline

PROMPT = "a photograph of an astronaut riding a horse"
RANK = 64  # lcm-lora-sdv1-5's
# the layers diffusers' LCM-LoRA distillation adapts, by the last part of our module names
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TARGETS += ("in_layers.2", "out_layers.3", "skip_connection", "emb_layers.1", "op", "conv")


def random_lcm_lora(unet: torch.nn.Module, path: Path) -> int:
    """A kohya-layout LoRA (lora_unet_<module path>) over the adapted layers; returns its parameter count."""
    g, state = torch.Generator().manual_seed(0), {}
    for name, m in unet.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or not name.endswith(TARGETS):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        if isinstance(m, torch.nn.Linear):
            down, up = (RANK, m.in_features), (m.out_features, RANK)
        else:
            down, up = (RANK, m.in_channels, *m.kernel_size), (m.out_channels, RANK, 1, 1)
        state[f"{key}.lora_down.weight"] = (torch.randn(down, generator=g) * 0.01).half()
        state[f"{key}.lora_up.weight"] = (torch.randn(up, generator=g) * 0.01).half()
        state[f"{key}.alpha"] = torch.tensor(float(RANK)).half()
    save_file(state, str(path))
    return sum(t.numel() for t in state.values())


def main() -> None:
    precision = sys.argv[1] if len(sys.argv) > 1 else "fp32"
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    preset, side = (sys.argv[3], int(sys.argv[4])) if len(sys.argv) > 4 else ("sd15", 512)
    with tempfile.TemporaryDirectory() as tmp:
        folder = _build(preset, Path(tmp) / "model")
        pipe = Pipeline.load(folder, precision=precision)
        lora, tiny = Path(tmp) / "lcm-lora.safetensors", Path(tmp) / "taesd_decoder.safetensors"
        lora_parameters = random_lcm_lora(pipe.model.unet, lora)
        torch.manual_seed(0)
        levels = pipe.model.vae.config.downsample_factor.bit_length()  # SD's f = 8: TAESD's 4 levels
        shape = TinyAutoencoderConfig(  # the published TAESD's, with as many levels as the factor needs
            encoder_block_out_channels=(64,) * levels,
            decoder_block_out_channels=(64,) * levels,
            num_encoder_blocks=(1,) + (3,) * (levels - 1),
            num_decoder_blocks=(3,) * (levels - 1) + (1,),
        )
        write_tiny_autoencoder(give_work(TinyAutoencoder(shape)), tiny, pipe.model.config.family)
        pipe.codec.set_tiny_decoder(tiny)
        size = dict(width=side, height=side, seed=0)

        def default():
            pipe.codec.decoder = "full"
            pipe(PROMPT, steps=20, cfg=7.5, sampler="dpmpp_2m", **size)

        def fast():
            pipe.codec.decoder = "tiny"
            pipe(PROMPT, steps=4, cfg=1.0, sampler="lcm", loras=[(str(lora), 1.0)], **size)

        report = {
            "machine": describe_machine(),
            "precision": precision,
            "runs": runs,
            "model": preset,
            "size": side,
            "lcm_lora_parameters": lora_parameters,
            "default_s": round(median_seconds(default, runs), 2),  # 20 steps DPM++ 2M, cfg 7.5, full decoder
            "fast_s": round(median_seconds(fast, runs), 2),  # the LCM-LoRA, 4 steps LCM, cfg 1, tiny decoder
        }
    report["ratio"] = round(report["default_s"] / report["fast_s"], 2)
    report["command"] = "python benchmarks/time_to_image.py " + " ".join(sys.argv[1:])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
