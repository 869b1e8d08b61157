"""The bench's peers beyond diffusers, each measured in a fresh process of its own (`python -m
ldmkit.evaluation.bench_peers PEER PATH MODE PRECISION WHAT OUT`, run by evaluation/bench.py).

OpenVINO: diffusers' UNet and VAE decoder, loaded from the bench's folder, are converted with
`openvino.convert_model` at static shapes (one UNet per size: the guidance pair, batch 2) and compiled
for "CPU" with the inference precision set explicitly both ways -- f32 for an fp32 row, bf16 for a bf16
one (left alone, OpenVINO runs bf16 by itself on CPUs with AMX, and an fp32 row would be a bf16 one).
Conversion and compilation are timed apart from the calls (`setup_seconds`). Its whole image is
diffusers' own loop: diffusers' text encoder (torch, fp32) and its DPM++ 2M scheduler -- the one the
diffusers peer runs, with the same settings -- driving the compiled UNet and decoder, so the image
differs from the diffusers peer's only in which runtime evaluates the two networks.

stable-diffusion.cpp (through stable-diffusion-cpp-python): the bench's weights written as one
original-layout `.safetensors` file, loaded with its weights in f32 or bf16, and one whole image made
with DPM++ 2M on exactly the sigmas diffusers' scheduler walks, and its torch-compatible CPU noise
generator, so the image can be compared with ours. It exposes no UNet or decoder call of its own; its
log's stage timings (text encoding, sampling, decoding) are reported with the image."""

import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ldmkit.evaluation.bench import CFG, PROMPT, SETTINGS, _theirs, median_seconds, peak_rss_mb, seeded_inputs


class _UNetPair(torch.nn.Module):
    """diffusers' UNet as a function of tensors alone (what tracing needs): (x, t, context) -> output."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, ctx):
        return self.unet(x, t, encoder_hidden_states=ctx, return_dict=False)[0]


class _Decoder(torch.nn.Module):
    """diffusers' VAE decode (post-quant conv and decoder) as a function of the latent alone."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z, return_dict=False)[0]


def openvino_child(folder: str, mode: str, precision: str, out: str, what: str = "all") -> None:
    """OpenVINO's rows, as bench.child measures ours: the same seeded inputs (rounded to the precision,
    as ours are, then given to OpenVINO in f32, its models' input type), the same medians."""
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints

    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # diffusers' shape asserts
    s = SETTINGS[mode]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    pipe = _theirs(Path(folder), torch.float32)  # converted from fp32: the hint decides the precision run
    core = ov.Core()
    config = {
        hints.inference_precision: ov.Type.bf16 if precision == "bf16" else ov.Type.f32,
        hints.performance_mode: hints.PerformanceMode.LATENCY,  # one request at a time, as the others run
        props.inference_num_threads: torch.get_num_threads(),  # the threads torch uses in the other children
    }

    def convert_and_compile(module: torch.nn.Module, example: tuple):
        t = time.perf_counter()
        with torch.no_grad():
            model = ov.convert_model(
                module, example_input=example, input=[ov.PartialShape(list(e.shape)) for e in example]
            )
        compiled = core.compile_model(model, "CPU", config)
        seconds = time.perf_counter() - t
        ran = compiled.get_property(hints.inference_precision)
        if ran != config[hints.inference_precision]:  # a row labelled fp32 must not run bf16, nor the reverse
            raise RuntimeError(f"OpenVINO compiled for {ran.get_type_name()}, not the {precision} asked for")
        return compiled, seconds

    r: dict = {}
    calls, z = seeded_inputs(s, pipe.vae_scale_factor, dtype)
    unets, setup = {}, {}
    for size, (x, t, ctx, _) in calls.items():
        if what == "image" and size != s["sizes"][0]:
            continue
        inputs = (x.float(), t, ctx.float())
        unets[size], setup[size] = convert_and_compile(_UNetPair(pipe.unet), inputs)
        if what in ("all", "unet"):
            arrays = [i.numpy() for i in inputs]

            def call(c=unets[size], arrays=arrays):
                return c(arrays)[0]

            r[f"unet_pair_{size}"] = {
                "seconds": median_seconds(call, s["runs"]),
                "out": torch.from_numpy(call()),
                "setup_seconds": setup[size],
            }
    if what != "unet":  # the UNet rows alone skip the decoder and the whole image
        _decode_and_image(r, pipe, unets[s["sizes"][0]], setup[s["sizes"][0]], convert_and_compile, z, s, what)
    compiled = unets[s["sizes"][0]]
    r["settings"] = {  # read back from the compiled model: what it runs, not what was asked
        "inference_precision": compiled.get_property(hints.inference_precision).get_type_name(),
        "execution_mode": compiled.get_property(hints.execution_mode).name,
        "threads": int(compiled.get_property(props.inference_num_threads)),
        "image": "diffusers' DPMSolverMultistepScheduler (dpmpp_2m settings) and text encoder (torch fp32)",
    }
    torch.save(r, out)


def _decode_and_image(r: dict, pipe, unet, unet_setup: float, convert_and_compile, z, s: dict, what: str) -> None:
    """The VAE decode row (`what` "all") and the whole image: OpenVINO's decoder and `unet` in diffusers' loop."""
    decoder, decoder_setup = convert_and_compile(_Decoder(pipe.vae), (z.float(),))
    if what == "all":
        latent = [z.float().numpy()]
        r["vae_decode"] = {
            "seconds": median_seconds(lambda: decoder(latent)[0], s["runs"]),
            "out": torch.from_numpy(decoder(latent)[0]),
            "setup_seconds": decoder_setup,
        }
    seconds, image = _openvino_image(pipe, unet, decoder, s)
    r["image"] = {
        "seconds": seconds,
        "out": torch.from_numpy(image),
        "peak_rss_mb": peak_rss_mb(),  # conversion holds torch's and OpenVINO's copies at once: the peak
        "setup_seconds": unet_setup + decoder_setup,  # the UNet and decoder above, reused
    }


def _openvino_image(pipe, unet, decoder, s: dict):
    """One whole image at the first size, after a warm-up one: diffusers' loop (text encoder,
    scheduler, guidance, post-processing) around OpenVINO's UNet and decoder."""
    from ldmkit.diffusion.sampling import generators_for

    size, steps = s["sizes"][0], s["steps"]
    scheduler = pipe.scheduler

    @torch.no_grad()
    def run():
        cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True)
        ctx = torch.cat([uncond, cond]).float().numpy()  # diffusers' order: unconditional first
        scheduler.set_timesteps(steps)  # resets the multistep state of a previous image
        latents = pipe.prepare_latents(1, 4, size, size, torch.float32, "cpu", generators_for(0, 1))
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            out = unet([x.numpy(), np.full(2, int(t), dtype=np.int64), ctx])[0]
            eps_uncond, eps_cond = torch.from_numpy(out).chunk(2)
            latents = scheduler.step(eps_uncond + CFG * (eps_cond - eps_uncond), t, latents, return_dict=False)[0]
        pixels = torch.from_numpy(decoder([(latents / pipe.vae.config.scaling_factor).numpy()])[0])
        return pipe.image_processor.postprocess(pixels, output_type="pil")[0]

    run()
    t = time.perf_counter()
    image = run()
    return time.perf_counter() - t, np.asarray(image, dtype=np.float32)


# sd.cpp's log lines that time the stages of one image -> the report's names for them
SDCPP_STAGES = {
    "text_encode_s": re.compile(r"get_learned_condition completed, taking ([\d.]+)s"),
    "sampling_s": re.compile(r"sampling completed, taking ([\d.]+)s"),
    "decode_s": re.compile(r"decode_first_stage completed, taking ([\d.]+)s"),
}


def sdcpp_child(file: str, mode: str, precision: str, out: str, what: str = "all") -> None:
    """stable-diffusion.cpp's whole image (the only call it exposes), after a warm-up one. Its weights
    are the file's f32 ones, or converted to bf16 at load for a bf16 row; its noise comes from its
    torch-compatible CPU generator with our seed and its sigmas are diffusers' DPM++ 2M list, so the
    image is comparable with ours; threads as torch's in the other children."""
    import ctypes

    import stable_diffusion_cpp as sd_cpp
    from diffusers import DPMSolverMultistepScheduler
    from stable_diffusion_cpp import StableDiffusion

    from ldmkit.diffusion.registry import get_sampler

    s = SETTINGS[mode]
    size, steps = s["sizes"][0], s["steps"]
    scheduler = DPMSolverMultistepScheduler(**get_sampler("dpmpp_2m").diffusers_config)
    scheduler.set_timesteps(steps)
    sigmas = ",".join(f"{float(v):.9g}" for v in scheduler.sigmas)
    t = time.perf_counter()
    sd = StableDiffusion(
        model_path=file,
        wtype="bf16" if precision == "bf16" else "f32",
        rng_type="cpu",  # noise as torch.randn on the CPU draws it: our seed gives our initial latent
        sampler_rng_type="cpu",
        n_threads=torch.get_num_threads(),
        verbose=False,
    )
    setup = time.perf_counter() - t
    log: list[str] = []

    @sd_cpp.sd_log_callback
    def keep(level, text, data):  # its log is where it says how long each stage took
        log.append(text.decode("utf-8", errors="replace"))

    sd_cpp.sd_set_log_callback(keep, ctypes.c_void_p(0))

    def run():
        log.clear()
        return sd.generate_image(
            prompt=PROMPT,
            negative_prompt="",
            cfg_scale=CFG,
            width=size,
            height=size,
            sample_method="dpm++2m",
            sample_steps=steps,
            sigmas=sigmas,
            seed=0,
        )[0]

    run()
    t = time.perf_counter()
    image = run()
    seconds = time.perf_counter() - t
    stages = {}
    for line in log:
        for name, pattern in SDCPP_STAGES.items():
            if m := pattern.search(line):
                stages[name] = float(m.group(1))
    r = {
        "image": {
            "seconds": seconds,
            "out": torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)),
            "peak_rss_mb": peak_rss_mb(),
            "setup_seconds": setup,
            "detail": stages,
        },
        "settings": {
            "wtype": "bf16" if precision == "bf16" else "f32",
            "threads": torch.get_num_threads(),
            "image": "its own dpm++2m on diffusers' DPM++ 2M sigmas, its CPU (torch-compatible) noise",
        },
    }
    torch.save(r, out)


if __name__ == "__main__":
    peer, path, mode, precision, what, out = sys.argv[1:7]
    {"openvino": openvino_child, "sdcpp": sdcpp_child}[peer](path, mode, precision, out, what)
