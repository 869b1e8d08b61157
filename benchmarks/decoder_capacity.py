"""Is an autoencoder's decoder what loses the detail? Train a decoder of other widths on the frozen
latents of a trained autoencoder (its encoder unchanged: the latents stage 2 sees stay the same), with
the stage-1 L1 objective on shapes scenes in any colour, and judge its reconstructions of true renders
(val, 200 images, all five shapes) every 250 steps, beside the frozen autoencoder's own decoder.
Resumable: run it again and it continues from OUT/decoder.pt.

    python benchmarks/decoder_capacity.py ENCODER_CKPT OUT WIDTHS RES_BLOCKS STEPS
    python benchmarks/decoder_capacity.py ~/runs/shapes-f4-ae/kept/step-00004000.pt ~/runs/decoder-64 64,64,64 2 2000

ENCODER_CKPT: a training checkpoint (RUN/checkpoints/step-N.pt) of an autoencoder run. Prints one JSON
line per judged checkpoint; the decoders are kept as OUT/decoder-STEP.pt."""

import dataclasses
import json
import sys
from pathlib import Path

import torch
from autoencoder_ceiling import load  # the benchmark beside this one

from ldmkit.data.images import DataConfig, Order, load_batch, open_dataset
from ldmkit.data.shapes import ALL_SHAPES, sample_scene
from ldmkit.evaluation.shapes_eval import ceiling
from ldmkit.models.autoencoder import AutoencoderKL

BATCH, LR, WARMUP, EVERY = 16, 2e-4, 200, 250


class Paired(torch.nn.Module):
    """The frozen encoder's latents, the new decoder's images."""

    def __init__(self, encoder: AutoencoderKL, decoder: AutoencoderKL):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def encode(self, x, tile=None):
        return self.encoder.encode(x)

    def decode(self, z, tile=None):
        return self.decoder.decode(z)


def judged(vae, step: int, label: str) -> dict:
    c = ceiling(vae, [sample_scene("val", i) for i in range(200)], ALL_SHAPES)
    r = c["reconstructions"]
    return {
        "decoder": label,
        "step": step,
        "fully_correct": r["fully_correct"],
        "relation": r["by_kind"]["relation"]["fully_correct"],
        "misses": c["misses"],
        "psnr": c["psnr"],
    }


def main() -> None:
    ckpt, out, widths, res_blocks, steps = sys.argv[1:6]
    out, steps = Path(out).expanduser(), int(steps)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    frozen = load(ckpt)[0].requires_grad_(False)
    torch.manual_seed(0)
    config = dataclasses.replace(
        frozen.config, channels=tuple(int(w) for w in widths.split(",")), num_res_blocks=int(res_blocks)
    )
    wide = AutoencoderKL(config)
    params = [*wide.decoder.parameters(), *wide.post_quant_conv.parameters()]
    opt = torch.optim.Adam(params, lr=LR, betas=(0.5, 0.9))  # stage 1's optimiser
    data = open_dataset(DataConfig(kind="shapes", split="train", n=100000, size=64, colours="any"))
    order, start, state = Order(len(data), 1), 0, out / "decoder.pt"
    if state.exists():
        saved = torch.load(state, map_location="cpu", weights_only=True)
        wide.load_state_dict(saved["vae"])
        opt.load_state_dict(saved["opt"])
        start = saved["step"]
    else:
        print(json.dumps(judged(frozen, 0, "frozen autoencoder's own")), flush=True)
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = LR * min(1.0, (step + 1) / WARMUP)
        x = load_batch(data, order, range(step * BATCH, (step + 1) * BATCH), False, 1)[0]
        with torch.no_grad():
            posterior = frozen.encode(x)
            z = posterior.mean + posterior.std * torch.randn_like(posterior.std)
        loss = (x - wide.decode(z)).abs().sum() / x.shape[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % EVERY == 0:
            torch.save({"vae": wide.state_dict(), "opt": opt.state_dict(), "step": step + 1}, state)
            torch.save({"vae": wide.state_dict(), "step": step + 1}, out / f"decoder-{step + 1}.pt")
            with torch.no_grad():
                row = judged(Paired(frozen, wide.eval()), step + 1, f"{widths} x{res_blocks}")
            wide.train()
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
