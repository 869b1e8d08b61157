"""Does a shapes model read where to draw from its caption, or from the noise? Two measurements per model:

1. How much of the layout survives its schedule's noisiest training steps: a linear probe (the mean
   latent of "on the left" scenes minus that of "on the right" ones, from 100 training scenes each) tells
   100 other scenes apart from z_t alone. At pure noise it can do no better than 50 %; well above that,
   the U-Net can learn the layout from z_t and need not learn the position words (Lin et al. 2024, "Common
   diffusion noise schedules and sample steps are flawed": a schedule whose last step is not pure noise).
2. How much the U-Net's output moves when the caption's position word changes ("on the left" against
   "on the right", "at the top" against "at the bottom"), against how much it moves for a colour ("a red
   circle" against "a blue circle"): mean absolute difference of its outputs on one noisy latent, at four
   noise levels. A model that ignores position words has a ratio near 0. The same for two shapes: the
   relation word changed ("a red circle above a blue square" against "... below ..."), and the two nouns
   swapped between the colours; a model that binds neither draws both prompts alike.

    python benchmarks/layout_from_noise.py NAME=MODEL [NAME=MODEL ...]
"""

import sys

import torch

from ldmkit.checkpoints.single_file import load_model
from ldmkit.data.images import DataConfig, ShapesData
from ldmkit.diffusion.schedule import NoiseSchedule
from ldmkit.models.prompts import encode_prompts

PROBE_STEPS = (999, 950, 900, 800)
RESPONSE_STEPS = (999, 950, 700, 400)
PAIRS = {
    "left/right": ("a red circle on the left", "a red circle on the right"),
    "top/bottom": ("a red circle at the top", "a red circle at the bottom"),
    "red/blue": ("a red circle", "a blue circle"),
    "above/below": ("a red circle above a blue square", "a red circle below a blue square"),
    "nouns swapped": ("a red circle above a blue square", "a red square above a blue circle"),
}


def position_images(per_side: int = 200) -> dict[str, torch.Tensor]:
    data = ShapesData(DataConfig(kind="shapes", split="train", n=100000, size=64))
    items = {"left": [], "right": []}
    for i in range(len(data)):
        caption = data.caption(i)
        for side, found in items.items():
            if caption.endswith("on the " + side) and len(found) < per_side:
                found.append(i)
        if all(len(found) == per_side for found in items.values()):
            break
    return {side: torch.stack([data.load(i)[0] for i in found]) for side, found in items.items()}


@torch.no_grad()
def probe(model, schedule, images: dict[str, torch.Tensor]) -> list[float]:
    """Share of held-back scenes whose side the linear probe tells from z_t, per PROBE_STEPS."""
    z = {side: model.vae.scale(model.vae.encode(x).mean) for side, x in images.items()}
    half = len(z["left"]) // 2
    left, right = z["left"][:half].mean(0), z["right"][:half].mean(0)
    direction, middle = left - right, (left + right) / 2
    g = torch.Generator().manual_seed(0)
    shares = []
    for t in PROBE_STEPS:
        ab = schedule.alphas_cumprod[t]
        a, s = ab.sqrt(), (1 - ab).sqrt()
        correct = 0
        for side, sign in (("left", 1), ("right", -1)):
            x = z[side][half:]
            zt = a * x + s * torch.randn(x.shape, generator=g)
            score = ((zt - a * middle) * direction).flatten(1).sum(1)
            correct += int(((score * sign) > 0).sum())
        shares.append(correct / (2 * (len(z["left"]) - half)))
    return shares


@torch.no_grad()
def responses(model, side: int) -> dict[str, list[float]]:
    """Mean |output difference| for each pair of captions, per RESPONSE_STEPS."""
    prompts = [p for pair in PAIRS.values() for p in pair]
    context = encode_prompts(model.text_encoder, prompts, None, mode="truncate").context
    z = torch.randn(1, model.unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(0))
    out = {}
    for k, name in enumerate(PAIRS):
        diffs = []
        for t in RESPONSE_STEPS:
            a, b = (model.unet(z, torch.tensor([t]), context[2 * k + j : 2 * k + j + 1]) for j in (0, 1))
            diffs.append((a - b).abs().mean().item())
        out[name] = diffs
    return out


def main(specs: list[str]) -> None:
    images = position_images()
    print(
        f"| model | latent | probe on z_t at t = {' / '.join(map(str, PROBE_STEPS))} | "
        + " | ".join(f"{name} at t = {' / '.join(map(str, RESPONSE_STEPS))}" for name in PAIRS)
        + " |"
    )
    print("|---" * (3 + len(PAIRS)) + "|")
    for spec in specs:
        name, path = spec.split("=", 1)
        model = load_model(path).eval()
        schedule = NoiseSchedule.from_config(model.config.schedule, model.alphas_cumprod)
        shares = probe(model, schedule, images)
        side = images["left"].shape[-1] // model.vae.config.downsample_factor
        moved = responses(model, side)
        cells = [" / ".join(f"{v:.4f}" for v in moved[p]) for p in PAIRS]
        probed = " / ".join(f"{100 * v:.0f}%" for v in shares)
        print(f"| {name} | {side}x{side} | {probed} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
