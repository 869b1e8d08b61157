"""`ldmkit bench`: ldmkit against its peers on the same model and the same CPU, measured side by side.

The SD 1.5 architecture with random weights (seed 0) is built once by us and written as a diffusers
folder (and, for stable-diffusion.cpp, as one original-layout `.safetensors` file), so every
implementation holds identical weights. Each implementation runs in a fresh process of its own (its own
allocator settings and memory, as a user runs it); each timing is the median of several calls after a
warm-up, and its peak resident memory is read at the end. The peers (`--vs`): diffusers (its own
pipeline), OpenVINO (diffusers' UNet and VAE decoder converted and compiled, evaluation/bench_peers.py)
and stable-diffusion.cpp (the whole image, bench_peers.py). Reported per row and peer: seconds, the
ratio ldmkit / peer (< 1: ldmkit is faster), the largest difference between the two outputs and
whether it is within this precision's tolerance (a peer that computes something else has a time that
means nothing), the UNet's FLOPs per call and the fraction of this machine's measured matmul peak each
reaches. Every report names the machine it was measured on (`describe_machine`): results from different
CPUs are never to be mixed. `--quick` uses the tiny preset: a smoke test, seconds not minutes."""

import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from ldmkit.errors import LdmkitError
from ldmkit.evaluation.bench_report import TOLERANCE, compare, describe_cpu

# mode -> what is measured. SDXL's whole image runs 4 steps (a 1024² step costs what 8 of SD 1.5's
# at 512² do, and a 20-step image per implementation and precision would take hours on 2 cores): its
# seconds per step are what to read; its UNet calls warm the kernels up instead of a first image.
SETTINGS = {
    "full": {"preset": "sd15", "sizes": (512, 256), "steps": 20, "runs": 3, "ctx": 768},
    "quick": {"preset": "tiny", "sizes": (64, 32), "steps": 4, "runs": 2, "ctx": 32},
    "sdxl": {"preset": "sdxl", "sizes": (1024,), "steps": 4, "runs": 1, "ctx": 2048, "image_warmup": False},
    "sdxl-quick": {"preset": "tiny-xl", "sizes": (64,), "steps": 2, "runs": 1, "ctx": 128, "image_warmup": False},
}
MODES = {("sd15", False): "full", ("sd15", True): "quick", ("sdxl", False): "sdxl", ("sdxl", True): "sdxl-quick"}
PROMPT = "a photograph of an astronaut riding a horse"
CFG = 7.5

# peer -> (the module whose `__main__` runs its child, the import it needs, the distribution and how to
# get it). Checked before anything is built, so a missing one costs a line, not a half-run bench.
PEERS = {
    "diffusers": ("ldmkit.evaluation.bench", "diffusers", "diffusers", "pip install 'ldmkit[test]'"),
    "openvino": ("ldmkit.evaluation.bench_peers", "openvino", "openvino", "pip install 'ldmkit[bench]'"),
    # ours, its UNet executed by OpenVINO (`--backend openvino`, models/openvino_backend.py)
    "ldmkit-openvino": ("ldmkit.evaluation.bench", "openvino", "openvino", "pip install 'ldmkit[openvino]'"),
    "sdcpp": (
        "ldmkit.evaluation.bench_peers",
        "stable_diffusion_cpp",
        "stable-diffusion-cpp-python",
        "pip install 'ldmkit[bench-sdcpp]': it compiles stable-diffusion.cpp, minutes",
    ),
}


def median_seconds(fn, runs: int) -> float:
    fn()  # warm-up: first-call allocations, oneDNN kernel selection
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak(dtype: torch.dtype, n_max: int = 2048, runs: int = 5, target: float = 0.05) -> float:
    """GFLOP/s of an n x n matmul, this machine's practical ceiling for the dtype. n doubles from 256 while
    one product takes under `target` seconds, up to n_max: a dtype the CPU only emulates (bf16 without
    AVX-512 BF16 or AMX, about 1 GFLOP/s) is measured in a second instead of minutes at 2048."""
    n = 256
    while True:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        start = time.perf_counter()
        a @ b
        if n >= n_max or time.perf_counter() - start >= target:
            break
        n *= 2
    return 2 * n**3 / median_seconds(lambda: a @ b, runs) / 1e9


def unet_flops(unet, x, t, ctx, **kwargs) -> float:
    """FLOPs of one call: torch's counter, plus attention, which it does not count on CPU (the fused
    kernel has no formula): 4 * B * L * S * channels per attention."""
    from torch.utils.flop_counter import FlopCounterMode

    from ldmkit.nn.attention import CrossAttention

    extra = []

    def hook(module, args, kwargs, out):
        q = args[0]
        context = args[1] if len(args) > 1 else kwargs.get("context")
        s = context.shape[1] if context is not None else q.shape[1]
        extra.append(4 * q.shape[0] * q.shape[1] * s * module.to_q.out_features)

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in unet.modules() if isinstance(m, CrossAttention)]
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            unet(x, t, ctx, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return counter.get_total_flops() + sum(extra)


def _build(preset_name: str, folder: Path, single_file: Path | None = None):
    """The bench's model, written as a diffusers folder (and as one original-layout file when
    `single_file` is given: stable-diffusion.cpp reads only that), the same numbers in both."""
    from ldmkit.checkpoints.diffusers_folder import save_diffusers
    from ldmkit.models.ldm import LatentDiffusion
    from ldmkit.models.presets import preset

    torch.manual_seed(0)
    model = give_work(LatentDiffusion(preset(preset_name)))
    save_diffusers(model, folder)
    if single_file is not None:
        from ldmkit.checkpoints.single_file import save_single_file

        save_single_file(model, single_file)
    return folder


@torch.no_grad()
def give_work(module: torch.nn.Module) -> torch.nn.Module:
    """The bench's random weights (from the global seed): default inits leave zero layers, so every
    matrix gets N(0, 0.02), biases 0 and norms scale 1, and every layer does real work."""
    for p in module.parameters():
        p.normal_(0, 0.02) if p.ndim > 1 else p.zero_()
    for m in module.modules():  # group, layer and RMS norms (diffusers' own classes too), where they scale
        if "norm" in type(m).__name__.lower() and isinstance(getattr(m, "weight", None), torch.Tensor):
            m.weight.fill_(1.0)
    return module


def _ours(folder: Path, precision: str):
    from ldmkit.pipelines import Pipeline

    return Pipeline.load(folder, precision=precision)


def _theirs(folder: Path, dtype: torch.dtype):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from ldmkit.diffusion.registry import get_sampler

    if (folder / "text_encoder_2").is_dir():
        pipe = StableDiffusionXLPipeline.from_pretrained(str(folder))
    else:
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler(**get_sampler("dpmpp_2m").diffusers_config)
    pipe.to(dtype)  # diffusers' bf16 path: every component converted, as its docs do it
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(impl: str, pipe, s: dict):
    """One whole image at the first size, after a warm-up one: (seconds, image as a float array)."""
    import numpy as np

    from ldmkit.diffusion.sampling import generators_for

    size, steps = s["sizes"][0], s["steps"]
    if impl.startswith("ldmkit"):

        def run():
            return pipe(
                PROMPT,
                steps=steps,
                cfg=CFG,
                sampler="dpmpp_2m",
                seed=0,
                width=size,
                height=size,
                prompt_mode="truncate",
            ).images[0]
    else:

        def run():
            return pipe(
                PROMPT,
                num_inference_steps=steps,
                guidance_scale=CFG,
                width=size,
                height=size,
                generator=generators_for(0, 1),
            ).images[0]

    if s.get("image_warmup", True):
        run()
    t = time.perf_counter()
    image = run()
    return time.perf_counter() - t, np.asarray(image, dtype=np.float32)


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM, which exec resets. (ru_maxrss does not: Linux carries
    the forking parent's peak into the child, so a child of a big process reports the parent's.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def seeded_inputs(s: dict, f: int, dtype: torch.dtype, added=None) -> tuple[dict, torch.Tensor]:
    """The inputs every implementation is measured on, drawn from one seeded generator in one order (so
    every child, whatever it runs, sees the same numbers): per size the guidance pair's latents, timesteps,
    context and `added(size, g)` (SDXL's vectors; {} without), then the one latent to decode."""
    g = torch.Generator().manual_seed(0)
    calls = {}
    for size in s["sizes"]:
        x = torch.randn(2, 4, size // f, size // f, generator=g).to(dtype)
        ctx = torch.randn(2, 77, s["ctx"], generator=g).to(dtype)
        calls[size] = (x, torch.tensor([500, 500]), ctx, added(size, g) if added is not None else {})
    z = torch.randn(1, 4, s["sizes"][0] // f, s["sizes"][0] // f, generator=g).to(dtype)
    return calls, z


def child(impl: str, folder: str, mode: str, precision: str, out: str, what: str = "all") -> None:
    """Everything measured for one implementation, in a fresh process of its own: its allocator
    settings, memory and thread state are its own, as when a user runs it. The UNet calls at each size
    and one VAE decode on seeded inputs (the same in every child), then a whole image; outputs and
    seconds are saved to `out` for the parent to compare, and the process's peak resident memory."""
    s = SETTINGS[mode]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    ours = impl.startswith("ldmkit")
    pipe = _ours(Path(folder), precision) if ours else _theirs(Path(folder), dtype)
    backend = None
    if impl == "ldmkit-openvino":
        cache = tempfile.TemporaryDirectory()  # a fresh cache: its conversion is part of the setup measured
        pipe.set_backend("openvino", Path(cache.name))
        backend = pipe.model.unet.forward
    unet, vae = (pipe.model.unet, pipe.model.vae) if ours else (pipe.unet, pipe.vae)
    f = pipe.vae_scale_factor if impl == "diffusers" else vae.config.downsample_factor
    r: dict = {}
    calls, z = seeded_inputs(s, f, dtype, lambda size, g: _added(unet, impl, size, g, dtype))
    with torch.no_grad():
        for size, (x, t, ctx, extra) in calls.items() if what in ("all", "unet") else ():

            def call():
                y = unet(x, t, ctx, **extra)
                return y if ours else y.sample

            set_up = sum(backend.seconds.values()) if backend else 0.0
            r[f"unet_pair_{size}"] = {"seconds": median_seconds(call, s["runs"]), "out": call().float()}
            if impl == "ldmkit":
                r[f"unet_pair_{size}"]["flops"] = unet_flops(unet, x, t, ctx, **extra)
            if backend:  # the first call converted (at the first size) and compiled: reported apart
                r[f"unet_pair_{size}"]["setup_seconds"] = sum(backend.seconds.values()) - set_up

        def decode():
            y = vae.decode(z)
            return y if ours else y.sample

        if what == "all":
            r["vae_decode"] = {"seconds": median_seconds(decode, s["runs"]), "out": decode().float()}
    if what != "unet":  # the UNet rows alone skip the whole image
        seconds, image = _image(impl, pipe, s)
        r["image"] = {"seconds": seconds, "out": torch.from_numpy(image), "peak_rss_mb": peak_rss_mb()}
        if backend:
            r["image"]["setup_seconds"] = sum(backend.seconds.values())
    torch.save(r, out)


def _added(unet, impl: str, size: int, g: torch.Generator, dtype) -> dict:
    """SDXL's addition-embedding inputs for a guidance pair at `size` (the same numbers in both children):
    ldmkit's y, or diffusers' text_embeds and time_ids; nothing for other models."""
    time_dim = unet.config.addition_time_embed_dim
    if not time_dim:
        return {}
    from ldmkit.nn.embedding import size_embedding

    ours = impl.startswith("ldmkit")
    adm = unet.config.adm_in_channels if ours else unet.config.projection_class_embeddings_input_dim
    pooled = torch.randn(2, adm - 6 * time_dim, generator=g)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)
    if ours:
        return {"y": torch.cat([pooled, size_embedding(time_ids, time_dim)], dim=-1).to(dtype)}
    return {"added_cond_kwargs": {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}}


def measure(impl: str, folder: Path, mode: str, precision: str, env: dict | None = None, what: str = "all") -> dict:
    """`impl`'s child (ldmkit or a peer) in a fresh process (with `env` added to this one's environment);
    its results. `what`: "all", or "image" for the whole image alone."""
    module = PEERS[impl][0] if impl in PEERS else "ldmkit.evaluation.bench"
    return measure_module(module, impl, folder, mode, precision, what, env=env)


def measure_module(module: str, impl: str, folder: Path, *args: str, env: dict | None = None) -> dict:
    """`python -m module impl folder *args OUT` in a fresh process; the results it saved to OUT."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.pt"
        done = subprocess.run(
            [sys.executable, "-m", module, impl, str(folder), *args, str(out)],
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
        )
        if done.returncode != 0:
            raise RuntimeError(f"bench child {impl} {' '.join(args)} failed:\n{done.stderr[-4000:]}")
        return torch.load(out, weights_only=True)


def describe_machine() -> dict:
    """describe_cpu, the threads torch uses and this machine's measured matmul peaks (GFLOP/s)."""
    return {
        **describe_cpu(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "peak_gflops": {"fp32": round(matmul_peak(torch.float32)), "bf16": round(matmul_peak(torch.bfloat16))},
    }


def check_peers(vs, model: str = "sd15", quick: bool = False) -> tuple[str, ...]:
    """The peers asked for, refused in one line before anything is built when one is unknown, not
    installed, or cannot run this model."""
    vs = tuple(dict.fromkeys(v.strip() for v in vs if v.strip()))
    unknown = [v for v in vs if v not in PEERS]
    if unknown or not vs:
        raise LdmkitError(f"--vs {','.join(unknown) or '(empty)'}: unknown peer; allowed: {', '.join(PEERS)}")
    for v in vs:
        if v != "diffusers" and model != "sd15":
            raise LdmkitError(f"--vs {v}: only with --model sd15 (its {model} child is not written)")
        if v == "sdcpp" and quick:
            # sd.cpp builds the real SD architectures from a file's keys: the tiny preset is none of them
            raise LdmkitError("--vs sdcpp: not with --quick (stable-diffusion.cpp loads only real SD shapes)")
        module, package, dist, how = PEERS[v]
        if importlib.util.find_spec(package) is None:
            raise LdmkitError(f"--vs {v}: needs the {dist} package, which is not installed ({how})")
    return vs


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def run(
    quick: bool = False,
    vs=("diffusers",),
    precisions=("fp32", "bf16"),
    progress=print,
    model: str = "sd15",
    rows: str = "all",
) -> dict:
    """rows: "all", or "unet" for the UNet rows alone (minutes instead of an hour at 512²)."""
    vs = check_peers(vs, model, quick)
    if rows == "unet" and "sdcpp" in vs:
        raise LdmkitError("--vs sdcpp: not with --rows unet (stable-diffusion.cpp is timed on whole images only)")
    mode = MODES[(model, quick)]
    s = SETTINGS[mode]
    machine = describe_machine()
    for peer in vs:
        machine[peer] = _version(PEERS[peer][2])
    report: dict = {
        "mode": mode,
        "model": s["preset"],
        "image_steps": s["steps"],
        "image_size": s["sizes"][0],
        "cfg": CFG,
        "machine": machine,
        "vs": list(vs),
        "rows": rows,
        "tolerance": TOLERANCE,
        "results": {},
        "peer_settings": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        single_file = Path(tmp) / "model.safetensors" if "sdcpp" in vs else None
        folder = _build(s["preset"], Path(tmp) / "model", single_file)
        for precision in precisions:
            progress(f"{precision}: ldmkit")
            ours = measure("ldmkit", folder, mode, precision, what=rows)
            theirs = {}
            for peer in vs:
                progress(f"{precision}: {peer}")
                theirs[peer] = measure(peer, single_file if peer == "sdcpp" else folder, mode, precision, what=rows)
                settings = theirs[peer].pop("settings", None)
                if settings:
                    report["peer_settings"].setdefault(precision, {})[peer] = settings
            r = compare(ours, theirs, machine["peak_gflops"][precision], precision)
            for name, row in r.items():
                progress(f"{precision}: {name}: {row}")
            report["results"][precision] = r
    report["disagreements"] = [
        f"{precision} {name} {peer}"
        for precision, rows in report["results"].items()
        for name, row in rows.items()
        for peer in vs
        if row.get(peer, {}).get("agrees") is False
    ]
    return report


if __name__ == "__main__":
    impl, folder, mode, precision, what, out = sys.argv[1:7]
    child(impl, folder, mode, precision, out, what)
