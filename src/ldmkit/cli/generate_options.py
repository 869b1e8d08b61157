"""The generate command's options, in the order `ldmkit generate --help` lists them."""

import argparse

from ldmkit.cli.common import DEFAULT_NOTE, MODEL_HELP, _add_model_options
from ldmkit.cli.image_prompt import add_image_prompt_options


def _sampler_names() -> list[str]:
    from ldmkit.diffusion.registry import SAMPLERS

    return list(SAMPLERS)


def add_options(p: argparse.ArgumentParser) -> None:
    _add_sampling_options(p)
    _add_control_options(p)
    add_image_prompt_options(p)
    _add_hires_options(p)
    _add_micro_conditioning_options(p)
    _add_run_options(p)
    _add_model_options(p)


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    """What to draw and how to sample it."""
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (the web UI's emphasis syntax works)")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--negative-prompt")
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg", type=float, help=f"classifier-free guidance scale (1 = none); default: {DEFAULT_NOTE}")
    p.add_argument("--sampler", help="one of: " + ", ".join(_sampler_names()) + f"; default: {DEFAULT_NOTE}")
    p.add_argument("--seed", type=int, help="image i of a batch uses seed + i (default: random)")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--init-image", help="start from this image (image-to-image)")
    p.add_argument("--strength", type=float, help="how much of the init image to repaint, 0 to 1 (default 0.75)")
    p.add_argument("--mask", help="inpainting mask, the init image's size: white is repainted")
    p.add_argument("--mask-blur", type=float)
    p.add_argument(
        "--inpaint-blend",
        choices=["denoised", "noised"],
        help="how an ordinary model keeps the unmasked region: its prediction replaced by the original, as the"
        " web UI (default), or its latents by the noised original at every step, as diffusers",
    )
    p.add_argument("--eta", type=float, help="DDIM's eta (0 = deterministic)")
    p.add_argument("--guidance-rescale", type=float)
    p.add_argument(
        "--prompt-mode",
        choices=["webui", "truncate"],
        help="webui: emphasis syntax and 75-token chunks (default); truncate: as diffusers",
    )
    p.add_argument(
        "--timestep-spacing",
        choices=["leading", "trailing", "linspace", "sgm_uniform"],
        help="override the sampler's timestep spacing (as diffusers' scheduler option); sgm_uniform: the web UI's"
        " SGM Uniform schedule type, for few-step models (euler, euler_a, heun, dpmpp_2m, unipc)",
    )


def _add_control_options(p: argparse.ArgumentParser) -> None:
    """ControlNets, then the other additions to the model: LoRAs and embeddings."""
    p.add_argument(
        "--control",
        action="append",
        metavar="TYPE:IMAGE[:STRENGTH]",
        help="a control image for a ControlNet; TYPE is a preprocessor: canny, scribble, threshold, or none / depth /"
        " seg / normal / edges for maps used as given (repeatable)",
    )
    p.add_argument(
        "--controlnet",
        action="append",
        metavar="FILE",
        help="ControlNet file or diffusers folder: one for all --control images or one each (default: the bundled"
        " model's own)",
    )
    p.add_argument("--control-start", type=float, default=0.0, help="fraction of the steps where control starts")
    p.add_argument("--control-end", type=float, default=1.0, help="fraction of the steps where control ends")
    p.add_argument("--guess-mode", action="store_true", help="control on the prompt branch only, scaled by depth")
    p.add_argument(
        "--lora", dest="loras", action="append", metavar="FILE[:WEIGHT]", help="merge a LoRA for this run (repeatable)"
    )
    p.add_argument("--lora-dir", help="where <lora:NAME:WEIGHT> tags in the prompt look for NAME")
    p.add_argument("--embeddings-dir", help="textual-inversion embeddings, used by file name in prompts")


def _add_micro_conditioning_options(p: argparse.ArgumentParser) -> None:
    """SDXL's micro-conditioning (pipelines/micro_conditioning.py), in diffusers' names and order."""
    g = p.add_argument_group("SDXL: refiner and micro-conditioning (default: the output size, no crop)")
    for name in ("original-size", "target-size", "negative-original-size", "negative-target-size"):
        g.add_argument(f"--{name}", metavar="HEIGHT,WIDTH")
    for name in ("crops-coords-top-left", "negative-crops-coords-top-left"):
        g.add_argument(f"--{name}", metavar="TOP,LEFT")
    g.add_argument("--refiner", help="SDXL's refiner model, taking over at --refiner-switch-at")
    g.add_argument("--refiner-switch-at", type=float, help="the fraction of the steps the base model runs (0.8)")
    g.add_argument("--aesthetic-score", type=float, help="the refiner's (default 6)")
    g.add_argument("--negative-aesthetic-score", type=float, help="the refiner's (default 2.5)")


def _add_hires_options(p: argparse.ArgumentParser) -> None:
    """Hires fix, as the popular web UI's: a second pass at a larger size (pipelines/hires.py)."""
    from ldmkit.pipelines.hires import UPSCALERS

    p.add_argument(
        "--hires",
        dest="hires_scale",
        type=float,
        metavar="SCALE",
        help="hires fix: a second pass at SCALE x the size, of --strength (default 0.75), e.g. --hires 2",
    )
    p.add_argument("--hires-width", type=int, help="hires fix to this width instead of a scale")
    p.add_argument("--hires-height", type=int, help="hires fix to this height instead of a scale")
    p.add_argument(
        "--hires-upscaler",
        metavar="NAME",
        help=f"one of: {', '.join(UPSCALERS)}, or a model's name in --upscaler-dir (default: Latent, bilinear on the"
        " latents)",
    )
    p.add_argument(
        "--upscaler-dir",
        help="model upscalers (ESRGAN, Real-ESRGAN, SwinIR... .safetensors/.pth files) for --hires-upscaler NAME",
    )
    p.add_argument("--hires-steps", type=int, help="the second pass's steps (default: --steps)")
    p.add_argument("--hires-sampler", help="the second pass's sampler (default: --sampler)")
    p.add_argument("--hires-prompt", help="the second pass's prompt (default: the prompt)")
    p.add_argument("--hires-negative-prompt", help="the second pass's negative prompt")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Speed, memory, and where the settings come from and the images go."""
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "auto"],
        default="auto",
        help="bf16: UNet and autoencoder in bf16 (fast on CPUs with bf16 units); auto (default): bf16 for"
        " UNets of 100M parameters or more on such CPUs, fp32 otherwise",
    )
    p.add_argument(
        "--feature-cache",
        type=int,
        metavar="N",
        help="DeepCache: a full UNet call every N steps, the steps between reuse its deep features (1 = off)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow first call; faster steps)")
    p.add_argument(
        "--backend",
        choices=["torch", "openvino"],
        default="torch",
        help="what runs the UNet/transformer: torch (default), or openvino (converted once per set of weights and"
        " cached on disk, compiled per size; needs pip install 'ldmkit[openvino]')",
    )
    p.add_argument(
        "--tiled-vae",
        choices=["auto", "on", "off"],
        default="auto",
        help="decode in bands (same image, less memory), encode in tiles (auto: only when a whole pass would not "
        "fit in free memory)",
    )
    p.add_argument(
        "--decoder",
        choices=["full", "tiny"],
        help="what decodes the images: full, the model's autoencoder, or tiny, a TAESD decoder (fast, less detail;"
        " needs --tiny-decoder). Default: tiny when --tiny-decoder is given, full otherwise",
    )
    p.add_argument(
        "--tiny-decoder",
        metavar="FILE_OR_DIR",
        help="a TAESD decoder file (taesd_decoder.* for SD 1.x/2.x, taesdxl_decoder.* for SDXL, taesd3_decoder.*"
        " for SD3) or diffusers folder, or a folder holding them (ComfyUI's vae_approx): the model's is found by name",
    )
    p.add_argument(
        "--fast",
        nargs="?",
        const=True,
        metavar="LCM_LORA",
        help="alone: the bundled model's consistency-distilled version (4 steps). With an LCM-LoRA file"
        " (lcm-lora-sdv1-5 for SD 1.x models, lcm-lora-sdxl for SDXL): that LoRA merged at weight 1 into --model,"
        " run with the lcm sampler, 4 steps and guidance 1 unless --sampler, --steps or --cfg say otherwise",
    )
    p.add_argument("--from-png", help="reuse the settings stored in a PNG's parameters")
    p.add_argument("-o", "--output", help="output .png (with --batch N: one file per seed)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--n-iter",
        type=int,
        default=1,
        metavar="N",
        help="N batches one after the other, seeds continuing (as the web UI's batch count; 1 to 64)",
    )
    p.add_argument("--no-grid", action="store_true", help="no grid image of the run's images (OUT-grid.png)")
