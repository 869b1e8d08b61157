"""Shared helpers: tiny random-weight diffusers components (the reference) and ours built from them."""

import csv
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

# LDMKIT_TEST_THREADS=1 leaves a core to a training run in the background
torch.set_num_threads(int(os.environ.get("LDMKIT_TEST_THREADS", 0)) or min(2, os.cpu_count() or 1))


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Random weights everywhere (default inits leave zero-initialised output layers, which would
    make a parity test blind to them)."""
    g = torch.Generator().manual_seed(seed)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g) * std
                # Norm scales near 1, as trained models have them; elsewhere plain noise.
                p.copy_(1 + noise if isinstance(m, norms) and name == "weight" else noise)
    return module.eval()


def tiny_diffusers_unet(**overrides):
    from diffusers import UNet2DConditionModel

    cfg = dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
    )
    cfg.update(overrides)
    return randomize(UNet2DConditionModel(**cfg))


def tiny_diffusers_vae(block_out_channels=(16, 32), layers_per_block=1, **overrides):
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    cfg = dict(
        block_out_channels=block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=layers_per_block,
        sample_size=64,
    )
    cfg.update(overrides)
    return randomize(AutoencoderKL(**cfg), seed=1)


def write_tiny_decoder(path, latent_channels: int = 4, seed: int = 0) -> Path:
    """A random two-level tiny decoder (2x, as the tiny preset's autoencoder) in the original published
    layout (taesd_decoder.*'s keys), for the tiny models of the server and browser tests."""
    from safetensors.torch import save_file

    from ldmkit.models.tiny_autoencoder import TinyAutoencoder, TinyAutoencoderConfig

    config = TinyAutoencoderConfig(
        decoder_block_out_channels=(8, 8), num_decoder_blocks=(1, 1), latent_channels=latent_channels
    )
    decoder = randomize(TinyAutoencoder(config, encoder=False).decoder, seed=seed, std=0.2)
    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, str(path))
    return Path(path)


def tiny_clip(hidden_act="quick_gelu", layers=3, hidden=32, heads=4):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        projection_dim=hidden,
    )
    return randomize(CLIPTextModel(cfg), seed=2, std=0.05)


def tiny_pipeline(
    folder,
    *,
    unet=None,
    vae=None,
    text_encoder=None,
    pad_token="<|endoftext|>",
    prediction_type="epsilon",
    tokenizer=None,
    scheduler=None,
):
    """A diffusers StableDiffusionPipeline folder made of tiny random components (by default CLIP's
    tokenizer and SD's PNDM scheduler config)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from ldmkit.models.tokenizers import clip_vocab_and_merges

    if tokenizer is None:
        vocab, merges = clip_vocab_and_merges()
        tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=77)
    if scheduler is None:
        scheduler = PNDMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            skip_prk_steps=True,
            steps_offset=1,
            prediction_type=prediction_type,
        )
    pipe = StableDiffusionPipeline(
        unet=unet or tiny_diffusers_unet(),
        vae=vae or tiny_diffusers_vae(),
        text_encoder=text_encoder or tiny_clip(),
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder))
    return pipe


@pytest.fixture
def tiny_pipe(tmp_path):
    folder = tmp_path / "pipe"
    pipe = tiny_pipeline(folder)
    return pipe, folder


def sd_like_config(kind: str = "clip", in_channels: int = 4):
    """A small model whose shapes follow the SD family rules that detection applies to files
    without our metadata (SD 1: 8 heads, CLIP-style 64 channels per text head; SD 2: 64 channels
    per UNet head, linear projections, OpenCLIP text tower read at its penultimate layer)."""
    from ldmkit.models.autoencoder import AutoencoderConfig
    from ldmkit.models.ldm import ModelConfig, ScheduleConfig
    from ldmkit.models.text import TextEncoderConfig
    from ldmkit.models.unet import UNetConfig

    sd2 = kind == "openclip"
    text = TextEncoderConfig(
        kind=kind,
        hidden_size=64,
        intermediate_size=96,
        num_layers=3,
        num_heads=1,
        hidden_act="gelu" if sd2 else "quick_gelu",
        pad_token="!" if sd2 else "<|endoftext|>",
        skip_last_layers=1 if sd2 else 0,
    )
    unet = UNetConfig(
        in_channels=in_channels,
        channels=(64, 128),
        attention_resolutions=(1, 2),
        num_heads=8,
        num_head_channels=64 if sd2 else -1,
        context_dim=64,
        use_linear_in_transformer=sd2,
    )
    inpaint = in_channels == 9
    family = ("sd2" if sd2 else "sd1") + ("-inpainting" if inpaint else "-v" if sd2 else "")
    return ModelConfig(
        family=family,
        unet=unet,
        vae=AutoencoderConfig(channels=(32, 64), num_res_blocks=1),
        text=text,
        schedule=ScheduleConfig(prediction_type="v_prediction" if sd2 and not inpaint else "epsilon"),
        image_size=768 if family == "sd2-v" else 512,
    )


def write_sd_file(path, kind="clip", in_channels=4, seed=0, with_schedule=True, fmt="safetensors", extra=None):
    """An original-layout SD file with random weights and no ldmkit metadata, as found in the wild.
    Returns the model it was made from."""
    from safetensors.torch import save_file

    from ldmkit.checkpoints.single_file import model_state
    from ldmkit.models.ldm import LatentDiffusion

    model = randomize(LatentDiffusion(sd_like_config(kind, in_channels)), seed=seed, std=0.05)
    if with_schedule:
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
        model.alphas_cumprod = torch.cumprod(1 - betas, 0)
    state = {k: v.contiguous() for k, v in model_state(model).items()}
    if extra:
        state.update(extra)
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 470000}, str(path))
    return model


# --- tiny training runs shared by the training, ControlNet and distillation tests ---------------------

ROOT = Path(__file__).parent.parent


def minilm_model_file(tmp_path) -> Path:
    """A tiny UNet reading the packaged MiniLM tower, saved as a file (which then holds no text tensor)."""
    from ldmkit.checkpoints.detect import minilm_text_config
    from ldmkit.checkpoints.single_file import load_package_text_encoder, save_single_file
    from ldmkit.models.ldm import LatentDiffusion
    from ldmkit.models.presets import tiny

    base = tiny()
    base = replace(base, text=minilm_text_config(max_length=16), unet=replace(base.unet, context_dim=384))
    torch.manual_seed(0)
    model = LatentDiffusion(base)
    load_package_text_encoder(model.text_encoder)
    path = tmp_path / "base.safetensors"
    save_single_file(model, path)
    return path


def config_file(tmp_path, config: str, run_dir: Path, **changes) -> Path:
    data = yaml.safe_load((ROOT / "configs" / config).read_text())
    data["run"]["dir"] = str(run_dir)
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if field:
            data.setdefault(section, {})[field] = value
        else:
            data[section] = value
    path = tmp_path / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def losses(run_dir: Path, column: str = "loss") -> list[float]:
    with open(run_dir / "loss.csv") as f:
        return [float(r[column]) for r in csv.DictReader(f)]


@pytest.fixture(scope="session")
def autoencoder(tmp_path_factory):
    from ldmkit.cli import main

    tmp = tmp_path_factory.mktemp("ae")
    cfg = config_file(tmp, "test-autoencoder.yaml", tmp / "run")
    assert main(["train-autoencoder", "--config", str(cfg), "-q"]) == 0
    return tmp / "run"


@pytest.fixture(scope="session")
def base_model(tmp_path_factory, autoencoder):
    from ldmkit.cli import main

    tmp = tmp_path_factory.mktemp("ldm")
    cfg = config_file(tmp, "test-ldm.yaml", tmp / "run", autoencoder=str(autoencoder / "autoencoder.safetensors"))
    assert main(["train", "--config", str(cfg), "-q"]) == 0
    return tmp / "run" / "model.safetensors"


def pytest_terminal_summary(terminalreporter):
    """A skipped browser test is said in a line of its own, not only as an `s` among the dots: the
    web page is then untested on this machine (.ci/run installs Chromium and makes it a failure)."""
    for report in terminalreporter.stats.get("skipped", []):
        if "test_browser" in f"{getattr(report, 'nodeid', '')} {report.longrepr}":
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            terminalreporter.write_line(f"the web page was not tested: {reason}", yellow=True)
            break


def import_spandrel():
    """spandrel for the upscaler tests: the installed one, else its wheel downloaded by README's test
    command (with einops'). spandrel imports torchvision, which cannot be installed beside the CPU torch
    these tests run on (PyPI's build is CUDA's), for two architectures the tests do not use (LaMa's
    rotation and RestoreFormer's normalisation): stand-ins for those two names are given while spandrel
    is imported, then withdrawn, so nothing else ever sees a torchvision."""
    import importlib
    import sys
    import types

    try:
        return importlib.import_module("spandrel")
    except ImportError:
        pass
    cache = Path.home() / ".cache" / "ldmkit-test"
    wheels = [cache / "spandrel-0.4.2-py3-none-any.whl", cache / "einops-0.8.2-py3-none-any.whl"]
    if not all(w.exists() for w in wheels):
        pytest.skip("spandrel is not installed and its wheel is not downloaded (README's test command does it)")
    for w in wheels:  # unpacked, not imported from the zip: zipimport finds no namespace packages
        unpacked = w.with_suffix("")
        if not unpacked.is_dir():
            import shutil
            import tempfile
            import zipfile

            tmp = Path(tempfile.mkdtemp(dir=cache))
            zipfile.ZipFile(w).extractall(tmp)
            try:
                tmp.rename(unpacked)
            except OSError:  # another process unpacked it first
                shutil.rmtree(tmp, ignore_errors=True)
        sys.path.insert(0, str(unpacked))
    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    stubs = {n: types.ModuleType(n) for n in names}
    functional = stubs["torchvision.transforms.functional"]

    def unavailable(*args, **kwargs):
        raise RuntimeError("torchvision is not available here")

    functional.InterpolationMode, functional.rotate, functional.normalize = object, unavailable, unavailable
    saved = {n: sys.modules.get(n) for n in names}
    sys.modules.update(stubs)
    try:
        return importlib.import_module("spandrel")
    finally:
        for n, module in saved.items():
            if module is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = module


def write_tiny_video_model(folder: Path, frames: int = 3) -> Path:
    """A tiny text-to-video model (ldmkit's own): `init-model`'s tiny image model with temporal layers grown in
    (untrained: the image model frame by frame), as train-video writes its product."""
    from ldmkit.checkpoints.single_file import load_model
    from ldmkit.checkpoints.svd_file import save_svd_file
    from ldmkit.cli import main
    from ldmkit.training.video_ldm import ClipDataConfig, VideoLDMTrainConfig, video_model_from_image_model

    folder.mkdir(parents=True, exist_ok=True)
    assert main(["init-model", str(folder / "image.safetensors")]) == 0
    config = VideoLDMTrainConfig(data=ClipDataConfig(frames=frames))
    model = video_model_from_image_model(load_model(folder / "image.safetensors"), config)
    save_svd_file(model, folder / "video.safetensors")
    return folder / "video.safetensors"
