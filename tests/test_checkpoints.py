"""Reading real-layout files: family detection from weights, strict loading, round trips between
layouts, safe .ckpt loading, storage dtypes, separate VAE files, recognised-but-unsupported families."""

import json
import sys
import types

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import tiny_pipeline, write_sd_file
from ldmkit.checkpoints.diffusers_folder import load_diffusers, save_diffusers
from ldmkit.checkpoints.inspect import inspect_path
from ldmkit.checkpoints.single_file import load_model, save_single_file
from ldmkit.errors import CheckpointError, UnsupportedModelError


def outputs(model, seed=0):
    """UNet, decoder and text-encoder outputs on fixed inputs."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.randn(1, c.unet.in_channels, 8, 8, generator=g)
    ctx = torch.randn(1, 5, c.unet.context_dim, generator=g)
    z = torch.randn(1, 4, 8, 8, generator=g)
    ids = torch.tensor([[49406, 320, 2368, 49407] + [49407] * 73])
    with torch.no_grad():
        return (model.unet(x, torch.tensor([500]), ctx), model.vae.decode(z), model.text_encoder.encode_ids(ids))


def assert_same_outputs(a, b, tol=1e-5):
    for x, y in zip(outputs(a), outputs(b)):
        assert x.abs().mean() > 0.01
        assert (x - y).abs().max() <= tol


def test_sd1_file_detected_and_loaded(tmp_path):
    source = write_sd_file(tmp_path / "sd1.safetensors")
    model = load_model(tmp_path / "sd1.safetensors")
    c = model.config
    assert c.family == "sd1"
    assert c.unet.num_heads == 8 and c.unet.context_dim == 64 and not c.unet.use_linear_in_transformer
    assert c.unet.channels == (64, 128) and c.unet.num_res_blocks == 2 and c.unet.attention_resolutions == (1, 2)
    assert c.vae.channels == (32, 64) and c.vae.num_res_blocks == 1
    assert set(c.guessed) >= {"unet.num_heads", "vae.scale_factor", "text.num_heads"}
    assert torch.equal(model.alphas_cumprod, source.alphas_cumprod)
    assert_same_outputs(source, model)


def test_sd2_file_is_v_by_rule_and_overridable(tmp_path):
    source = write_sd_file(tmp_path / "sd2.safetensors", kind="openclip")
    model = load_model(tmp_path / "sd2.safetensors")
    assert model.config.family == "sd2-v" and model.config.schedule.prediction_type == "v_prediction"
    assert model.config.guessed["schedule.prediction_type"] == "v_prediction"
    assert model.config.unet.num_head_channels == 64 and model.config.unet.use_linear_in_transformer
    assert model.config.text.kind == "openclip" and model.config.text.pad_token == "!"
    assert_same_outputs(source, model)
    eps = load_model(tmp_path / "sd2.safetensors", overrides={"prediction_type": "epsilon"})
    assert eps.config.family == "sd2-eps" and "schedule.prediction_type" not in eps.config.guessed


def test_inpainting_family(tmp_path):
    write_sd_file(tmp_path / "inpaint.safetensors", in_channels=9)
    assert load_model(tmp_path / "inpaint.safetensors").config.family == "sd1-inpainting"


def test_roundtrip_single_file_to_diffusers_and_back_keeps_every_tensor(tmp_path):
    for kind in ("clip", "openclip"):
        write_sd_file(tmp_path / f"{kind}.safetensors", kind=kind)
        original = load_file(str(tmp_path / f"{kind}.safetensors"))
        model = load_model(tmp_path / f"{kind}.safetensors")
        save_diffusers(model, tmp_path / f"{kind}-diffusers")
        again = load_model(tmp_path / f"{kind}-diffusers")
        assert again.config.family == model.config.family
        save_single_file(again, tmp_path / f"{kind}-back.safetensors")
        back = load_file(str(tmp_path / f"{kind}-back.safetensors"))
        assert set(back) == set(original), set(back) ^ set(original)
        assert all(torch.equal(back[k], original[k]) for k in original)


def test_a_model_with_partial_scheduler_settings_writes_a_folder_diffusers_reads(tmp_path):
    """Scheduler settings that name no class (a model trained before they were completed, or given so):
    the folder's scheduler config is SD's completed by them, which diffusers reads with clip_sample off."""
    from diffusers import DDIMScheduler

    from ldmkit.models.ldm import ScheduleConfig

    write_sd_file(tmp_path / "sd1.safetensors")
    model = load_model(tmp_path / "sd1.safetensors")
    settings = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    model.config.schedule = ScheduleConfig(prediction_type="v_prediction", diffusers=settings)
    save_diffusers(model, tmp_path / "out")
    ddim = DDIMScheduler.from_pretrained(str(tmp_path / "out"), subfolder="scheduler").config
    assert ddim.rescale_betas_zero_snr and ddim.timestep_spacing == "trailing" and not ddim.clip_sample
    assert ddim.prediction_type == "v_prediction" and ddim.steps_offset == 1
    again = load_model(tmp_path / "out").config.schedule
    assert again.prediction_type == "v_prediction" and again.diffusers["rescale_betas_zero_snr"] is True


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_partial_scheduler_settings_drawn_at_random_walk_what_diffusers_walks(tmp_path, seed):
    """Scheduler settings naming no class, drawn at random (zero SNR, spacing, offset, prediction type, steps):
    written as a folder, diffusers' DDIM reads them and walks the timesteps and schedule that ours walks."""
    from diffusers import DDIMScheduler

    from ldmkit.diffusion.registry import SAMPLERS
    from ldmkit.diffusion.schedule import NoiseSchedule
    from ldmkit.models.ldm import ScheduleConfig

    rng = np.random.default_rng(seed)
    settings = {"timestep_spacing": str(rng.choice(["leading", "trailing"]))}
    if rng.random() < 0.7:
        settings["rescale_betas_zero_snr"] = bool(rng.integers(2))
    if rng.random() < 0.5:
        settings["steps_offset"] = int(rng.integers(2))
    zsnr = settings.get("rescale_betas_zero_snr", False)
    prediction = "v_prediction" if zsnr or rng.random() < 0.5 else "epsilon"
    steps = int(rng.integers(2, 40))
    write_sd_file(tmp_path / "sd1.safetensors")
    model = load_model(tmp_path / "sd1.safetensors")
    model.config.schedule = ScheduleConfig(prediction_type=prediction, diffusers=settings)
    save_diffusers(model, tmp_path / "out")
    ddim = DDIMScheduler.from_pretrained(str(tmp_path / "out"), subfolder="scheduler")
    ddim.set_timesteps(steps)
    again = load_model(tmp_path / "out")
    noise = NoiseSchedule.from_config(again.config.schedule, again.alphas_cumprod)
    ours = SAMPLERS["ddim"].build_schedule(noise, steps, scheduler_config=again.config.schedule.diffusers)
    where = f"seed {seed}: {settings}, {prediction}, {steps} steps"
    assert not ddim.config.clip_sample, where
    assert ours.timesteps.tolist() == ddim.timesteps.tolist(), where
    assert torch.allclose(noise.alphas_cumprod, ddim.alphas_cumprod), where


def test_diffusers_loads_what_we_write(tmp_path):
    """Our diffusers folder is a real one: diffusers' own loader reads it and computes what we compute."""
    from diffusers import StableDiffusionPipeline

    write_sd_file(tmp_path / "sd1.safetensors")
    model = load_model(tmp_path / "sd1.safetensors")
    save_diffusers(model, tmp_path / "out")
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "out"), local_files_only=True)
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 64)
    with torch.no_grad():
        assert (pipe.unet(x, 500, ctx).sample - model.unet(x, torch.tensor([500]), ctx)).abs().max() <= 1e-4
        z = torch.randn(1, 4, 8, 8)
        assert (pipe.vae.decode(z).sample - model.vae.decode(z)).abs().max() <= 1e-4
        ours = model.text_encoder(["a red circle"])
        ref, _ = pipe.encode_prompt(["a red circle"], "cpu", 1, False)
    assert (ours - ref).abs().max() <= 1e-4
    assert pipe.tokenizer("a cat", padding="max_length", max_length=77).input_ids[:5] == [
        49406,
        320,
        2368,
        49407,
        49407,
    ]


def test_diffusers_pipeline_folder_honours_its_scheduler_config(tmp_path):
    tiny_pipeline(tmp_path / "p", prediction_type="v_prediction")
    model = load_model(tmp_path / "p")
    assert model.config.schedule.prediction_type == "v_prediction"
    assert model.config.schedule.diffusers["_class_name"] == "PNDMScheduler"
    assert model.config.schedule.diffusers["steps_offset"] == 1
    assert model.config.guessed == {}


def test_diffusers_folder_parity_through_single_file(tmp_path):
    """diffusers folder -> ours -> single file -> ours, compared with the diffusers components."""
    pipe = tiny_pipeline(tmp_path / "p")
    save_single_file(load_model(tmp_path / "p"), tmp_path / "one.safetensors")
    model = load_model(tmp_path / "one.safetensors")
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    with torch.no_grad():
        a = pipe.unet(x, torch.tensor([1, 900]), ctx).sample
        b = model.unet(x, torch.tensor([1, 900]), ctx)
    assert a.abs().mean() > 0.05 and (a - b).abs().max() <= 1e-4


def test_our_files_are_self_describing(tmp_path):
    write_sd_file(tmp_path / "sd2.safetensors", kind="openclip")
    model = load_model(tmp_path / "sd2.safetensors", overrides={"clip_skip": 2})
    save_single_file(model, tmp_path / "ours.safetensors")
    with safe_open(str(tmp_path / "ours.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["ldmkit"])
    assert meta["family"] == "sd2-v" and meta["text"]["clip_skip"] == 2
    again = load_model(tmp_path / "ours.safetensors")
    assert again.config == model.config


@pytest.mark.parametrize("name,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_storage(tmp_path, name, dtype):
    write_sd_file(tmp_path / "sd1.safetensors")
    model = load_model(tmp_path / "sd1.safetensors")
    save_single_file(model, tmp_path / f"{name}.safetensors", dtype=dtype)
    state = load_file(str(tmp_path / f"{name}.safetensors"))
    assert {v.dtype for k, v in state.items() if k != "alphas_cumprod"} == {dtype}
    assert state["alphas_cumprod"].dtype == torch.float32
    assert inspect_path(tmp_path / f"{name}.safetensors")["dtype"] == sorted({str(dtype)[6:], "float32"})
    half = load_model(tmp_path / f"{name}.safetensors")
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-2
    for a, b in zip(outputs(model), outputs(half)):
        assert (a - b).abs().max() <= tol * max(1.0, a.abs().max().item())
    save_diffusers(model, tmp_path / f"{name}-diffusers", dtype=dtype)
    assert (
        load_file(str(tmp_path / f"{name}-diffusers" / "unet" / "diffusion_pytorch_model.safetensors"))[
            "conv_in.weight"
        ].dtype
        == dtype
    )
    assert inspect_path(tmp_path / f"{name}-diffusers")["dtype"] == [str(dtype)[6:]]


def test_ckpt_with_trainer_objects_and_numpy_scalars_loads(tmp_path):
    """Real SD .ckpt files pickle a Lightning ModelCheckpoint callback and numpy scalars beside the
    weights: the allow-list admits them as inert data."""
    source = write_sd_file(tmp_path / "sd1.safetensors")
    state = load_file(str(tmp_path / "sd1.safetensors"))
    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.monitor, self.best_model_score = "val/loss", torch.tensor(0.1)

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = mod.__name__, "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules[mod.__name__] = mod
    try:
        torch.save(
            {
                "state_dict": state,
                "global_step": 875000,
                "epoch": 3,
                "loss": np.float64(0.25),
                "callbacks": {"ModelCheckpoint": ModelCheckpoint()},
            },
            tmp_path / "sd1.ckpt",
        )
    finally:
        for name in ("pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__):
            sys.modules.pop(name, None)
    model = load_model(tmp_path / "sd1.ckpt")
    assert model.config.family == "sd1"
    assert_same_outputs(source, model)


def test_sd2_base_ckpt_global_step_rule(tmp_path):
    write_sd_file(tmp_path / "sd2.safetensors", kind="openclip")
    torch.save({"state_dict": load_file(str(tmp_path / "sd2.safetensors")), "global_step": 875000}, tmp_path / "b.ckpt")
    assert load_model(tmp_path / "b.ckpt").config.family == "sd2-eps"


def test_ema_copies_and_schedule_buffers_are_allowed(tmp_path):
    extra = {
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.diffusion_modelinput_blocks00weight": torch.zeros(3),
        "betas": torch.zeros(1000),
        "posterior_variance": torch.zeros(1000),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
    }
    write_sd_file(tmp_path / "sd1.safetensors", extra=extra)
    assert load_model(tmp_path / "sd1.safetensors").config.family == "sd1"


def test_format_is_read_from_content_not_extension(tmp_path):
    write_sd_file(tmp_path / "a.safetensors")
    (tmp_path / "model.ckpt").write_bytes((tmp_path / "a.safetensors").read_bytes())
    assert inspect_path(tmp_path / "model.ckpt")["format"] == "safetensors"
    write_sd_file(tmp_path / "b.bin", fmt="torch")
    (tmp_path / "b.bin").rename(tmp_path / "b.safetensors")
    info = inspect_path(tmp_path / "b.safetensors")
    assert info["format"] == "torch-zip" and info["family"] == "sd1"


def _vae_state(seed):
    from conftest import randomize
    from ldmkit.models.autoencoder import AutoencoderConfig, AutoencoderKL

    return randomize(AutoencoderKL(AutoencoderConfig(channels=(32, 64), num_res_blocks=1)), seed=seed)


def test_separate_vae_replaces_the_models_own(tmp_path):
    from ldmkit.checkpoints.keymaps import vae_to_diffusers_state

    write_sd_file(tmp_path / "sd1.safetensors")
    vae = _vae_state(seed=9)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        expected = vae.decode(z)
    files = {
        "orig.safetensors": vae.state_dict(),
        "prefixed.safetensors": {"first_stage_model." + k: v for k, v in vae.state_dict().items()},
        "diffusers-layout.safetensors": vae_to_diffusers_state(vae.state_dict(), vae.config),
    }
    for name, state in files.items():
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / name))
        model = load_model(tmp_path / "sd1.safetensors", vae=tmp_path / name)
        with torch.no_grad():
            assert (model.vae.decode(z) - expected).abs().max() <= 1e-5, name
        assert model.vae.config.scale_factor == 0.18215
    info = inspect_path(tmp_path / "orig.safetensors")
    assert info["family"] == "vae" and info["vae_downsample_factor"] == 2


@pytest.mark.parametrize(
    "name,keys",
    [("flux", {"double_blocks.0.img_attn.norm.key_norm.scale": (8,)})],
)
def test_unsupported_families_are_named(tmp_path, name, keys):
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(tmp_path / "x.safetensors"))
    info = inspect_path(tmp_path / "x.safetensors")
    assert info["family"] == name and info["supported"] is False and "does not support" in info["note"]
    with pytest.raises(UnsupportedModelError, match="does not support"):
        load_model(tmp_path / "x.safetensors")


def test_convert_overwrites_a_diffusers_folder_atomically(tmp_path):
    write_sd_file(tmp_path / "sd1.safetensors")
    model = load_model(tmp_path / "sd1.safetensors")
    save_diffusers(model, tmp_path / "out")
    save_diffusers(model, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sd1.safetensors"]
    assert load_diffusers(tmp_path / "out").config.family == "sd1"


def test_sd2_diffusers_folder_to_a_file_other_tools_read(tmp_path):
    """diffusers' SD 2 text encoder stops at the layer SD 2 reads (no last block, no projection).
    Written as a single file it gets a zero 24th-style block, so every reader that skips the last
    block -- ours, from the weights alone -- computes the same thing."""
    from conftest import tiny_clip, tiny_diffusers_unet, tiny_diffusers_vae

    unet = tiny_diffusers_unet(
        block_out_channels=(64, 128),
        attention_head_dim=(1, 2),
        cross_attention_dim=64,
        use_linear_projection=True,
        norm_num_groups=32,
    )
    vae = tiny_diffusers_vae(block_out_channels=(32, 64), norm_num_groups=32)  # SD's 32 groups: a file can't say
    pipe = tiny_pipeline(
        tmp_path / "p",
        unet=unet,
        vae=vae,
        text_encoder=tiny_clip("gelu", layers=2, hidden=64, heads=1),
        pad_token="!",
        prediction_type="v_prediction",
    )
    model = load_model(tmp_path / "p")
    assert model.config.family == "sd2-v" and model.config.text.num_layers == 2
    from ldmkit.checkpoints.single_file import model_state

    state = model_state(model)
    assert "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight" in state
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "wild.safetensors"))
    wild = load_model(tmp_path / "wild.safetensors")
    assert wild.config.family == "sd2-v" and wild.config.text.num_layers == 3
    prompts = ["a red circle above a blue square"]
    with torch.no_grad():
        ref, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
        ours = wild.text_encoder(prompts)
        x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 64)
        assert (pipe.unet(x, 7, ctx).sample - wild.unet(x, torch.tensor([7]), ctx)).abs().max() <= 1e-4
    assert ref.abs().mean() > 0.1 and (ours - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("layout", ["single file", "diffusers folder"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_loading_fills_empty_modules_with_the_files_tensors(tmp_path, layout, dtype):
    """The UNet and autoencoder are built empty (meta) and take the file's tensors: every weight is
    the file's, in the model's dtype (fp32), and writing to a loaded weight -- an fp32 file's tensors
    are the model's own, mapped from the file -- leaves the file untouched."""
    import hashlib

    write_sd_file(tmp_path / "sd1.safetensors")
    model = load_model(tmp_path / "sd1.safetensors")
    path = tmp_path / "model.safetensors"
    save_single_file(model, path, dtype=dtype)
    if layout == "diffusers folder":
        save_diffusers(model, tmp_path / "folder", dtype=dtype)
        path = tmp_path / "folder" / "unet" / "diffusion_pytorch_model.safetensors"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load_model(path if layout == "single file" else tmp_path / "folder")
    state = loaded.state_dict()
    assert not any(v.is_meta for v in state.values())
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v.to(dtype).float()), k
    with torch.no_grad():
        for p in loaded.unet.parameters():
            p.add_(1.0)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("layout", ["single file", "diffusers folder"])
def test_a_bf16_load_converts_as_it_reads_and_equals_converting_after(tmp_path, layout):
    """A bf16 load reads the UNet's and autoencoder's tensors one at a time and converts each at once
    (files.read_tensors with dtype_for); the result must be exactly the fp32 load converted after, the
    text tower still fp32."""
    write_sd_file(tmp_path / "sd1.safetensors")
    model = load_model(tmp_path / "sd1.safetensors")
    path = tmp_path / "model.safetensors"
    save_single_file(model, path)
    if layout == "diffusers folder":
        save_diffusers(model, tmp_path / "folder")
        path = tmp_path / "folder"
    rule_calls = []

    def bf16(config):
        rule_calls.append(config.family)
        return torch.bfloat16

    fast = load_model(path, dtype_rule=bf16)
    assert rule_calls == ["sd1"]
    reference = load_model(path)
    reference.unet.to(torch.bfloat16)
    reference.vae.to(torch.bfloat16)
    a, b = fast.state_dict(), reference.state_dict()
    assert set(a) == set(b)
    for k in b:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert next(fast.unet.parameters()).dtype == next(fast.vae.parameters()).dtype == torch.bfloat16
    assert next(fast.text_encoder.parameters()).dtype == torch.float32


def test_reading_safetensors_with_conversion_equals_the_library_and_refuses_damage(tmp_path):
    from ldmkit.checkpoints.files import read_tensors

    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 2, 2, generator=g).bfloat16(),
        "f64": torch.randn(4, generator=g).double(),
        "i64": torch.arange(6).reshape(2, 3),
        "u8": torch.arange(5, dtype=torch.uint8),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"note": "x"})
    ref = load_file(str(path))
    for target in (torch.bfloat16, torch.float32, None):
        state, meta = read_tensors(path, lambda k: target)
        assert meta == {"note": "x"} and set(state) == set(ref)
        for k, v in ref.items():
            want = v.to(target) if target is not None and v.is_floating_point() else v
            assert state[k].dtype == want.dtype and state[k].shape == want.shape and torch.equal(state[k], want), k
    data = path.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:-8])
    n = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + n].replace(b'"shape":[3,5]', b'"shape":[3,6]')
    (tmp_path / "shape.safetensors").write_bytes(data[:8] + header + data[8 + n :])
    for name in ("short", "shape"):
        with pytest.raises(CheckpointError, match="corrupt safetensors file"):
            read_tensors(tmp_path / f"{name}.safetensors", lambda k: torch.bfloat16)


# --- configurations the reference expresses and ldmkit once refused or misread ------------------------


def test_level_widths_that_are_not_multiples_of_the_first_load_and_equal_diffusers(tmp_path):
    from conftest import tiny_diffusers_unet, tiny_diffusers_vae

    unet = tiny_diffusers_unet(
        block_out_channels=(32, 48, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4, 4),
        layers_per_block=(1, 2, 1),
        mid_block_type=None,  # pruned models (BK-SDM) drop the middle block
    )
    pipe = tiny_pipeline(tmp_path / "p", unet=unet, vae=tiny_diffusers_vae(block_out_channels=(16, 24)))
    model = load_model(tmp_path / "p")
    assert model.config.unet.channels == (32, 48, 64) and model.config.unet.middle_block == "none"
    save_single_file(model, tmp_path / "one.safetensors")
    x, ctx = torch.randn(1, 4, 12, 12), torch.randn(1, 5, 32)
    z = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        ref, ref_image = pipe.unet(x, 700, ctx).sample, pipe.vae.decode(z).sample
        for ours in (model, load_model(tmp_path / "one.safetensors")):
            assert (ours.unet(x, torch.tensor([700]), ctx) - ref).abs().max() <= 1e-5
            assert (ours.vae.decode(z) - ref_image).abs().max() <= 1e-5


def test_a_folders_own_tokenizer_is_used_and_travels_into_single_files(tmp_path):
    """A smaller vocabulary and a textual-inversion word baked into the tokenizer and the embedding
    table: ldmkit tokenizes as the folder's tokenizer does (the bundled vocabulary would index past the
    table), and a single file it writes carries that tokenizer."""
    from test_random_configs import tokenizer_for

    from conftest import tiny_clip

    tok = tokenizer_for({"merges": 300, "pad": "!", "length": 77})
    text = tiny_clip()
    text.resize_token_embeddings(len(tok))
    pipe = tiny_pipeline(tmp_path / "p", text_encoder=text)
    tok.save_pretrained(str(tmp_path / "p" / "tokenizer"))
    prompts = ["a <cat-toy> on a beach"]
    want = tok(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert want.max() == len(tok) - 1 < 49406  # the added word, in a table smaller than CLIP's
    model = load_model(tmp_path / "p")
    save_single_file(model, tmp_path / "one.safetensors")
    for ours in (model, load_model(tmp_path / "one.safetensors")):
        assert torch.equal(ours.text_encoder.tokenizer(prompts)["input_ids"], want)
        with torch.no_grad():
            ref = pipe.text_encoder(want)[0]
            assert (ours.text_encoder(prompts) - ref).abs().max() <= 1e-5


def test_a_foreign_file_whose_vocabulary_is_smaller_than_clips_is_refused_in_one_line(tmp_path):
    write_sd_file(tmp_path / "sd1.safetensors")
    state = load_file(str(tmp_path / "sd1.safetensors"))
    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    state[key] = state[key][:1000].clone()
    save_file(state, str(tmp_path / "small.safetensors"))
    model = load_model(tmp_path / "small.safetensors")
    with pytest.raises(CheckpointError, match="1000 token embeddings.*own tokenizer"):
        model.text_encoder(["a cat"])


def test_clip_keys_without_the_text_model_level_load_as_the_web_ui_loads_them(tmp_path):
    write_sd_file(tmp_path / "sd1.safetensors")
    state = load_file(str(tmp_path / "sd1.safetensors"))
    bare = {
        k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
        for k, v in state.items()
    }
    assert any(k.startswith("cond_stage_model.transformer.encoder.layers.") for k in bare)
    save_file(bare, str(tmp_path / "bare.safetensors"))
    assert_same_outputs(load_model(tmp_path / "sd1.safetensors"), load_model(tmp_path / "bare.safetensors"))


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_a_gelu_clip_folder_survives_diffusers_to_single_file_to_diffusers(tmp_path, pad):
    """A CLIP-architecture tower with gelu is written and read back whatever single-file layout its
    padding makes it (OpenCLIP's with "!"), with every tensor and the same outputs."""
    from conftest import tiny_clip

    pipe = tiny_pipeline(tmp_path / "p", text_encoder=tiny_clip(hidden_act="gelu"), pad_token=pad)
    save_single_file(load_model(tmp_path / "p"), tmp_path / "one.safetensors")
    save_diffusers(load_model(tmp_path / "one.safetensors"), tmp_path / "back")
    a = load_file(str(tmp_path / "p" / "text_encoder" / "model.safetensors"))
    b = load_file(str(tmp_path / "back" / "text_encoder" / "model.safetensors"))
    strip = lambda s: {k.removeprefix("text_model."): v for k, v in s.items()}  # noqa: E731
    a, b = strip(a), strip(b)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    back = load_model(tmp_path / "back")
    ids = pipe.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert (back.text_encoder(["a cat"]) - pipe.text_encoder(ids)[0]).abs().max() <= 1e-5


def test_a_file_without_our_header_is_read_off_its_weights_even_without_attention(tmp_path):
    """A pruned UNet with no attention and no middle block, written by another tool (no ldmkit header):
    widths, blocks and kernels come from the tensors; the context width, which no weight holds, from the
    text encoder."""
    from conftest import tiny_clip, tiny_diffusers_unet, tiny_diffusers_vae

    unet = tiny_diffusers_unet(
        block_out_channels=(32, 96),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=(1, 2),
        mid_block_type=None,
        conv_in_kernel=5,
        norm_num_groups=32,  # what SD files use, and what a file without a header is read with
    )
    vae = tiny_diffusers_vae(block_out_channels=(32, 64), norm_num_groups=32)
    pipe = tiny_pipeline(tmp_path / "p", unet=unet, vae=vae, text_encoder=tiny_clip(hidden=64, heads=1))
    save_single_file(load_model(tmp_path / "p"), tmp_path / "ours.safetensors")
    with safe_open(str(tmp_path / "ours.safetensors"), "pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys()}, str(tmp_path / "foreign.safetensors"))
    model = load_model(tmp_path / "foreign.safetensors")
    c = model.config.unet
    assert (c.channels, c.num_res_blocks, c.middle_block, c.conv_in_kernel) == ((32, 96), (1, 2), "none", 5)
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 64)
    with torch.no_grad():
        assert (model.unet(x, torch.tensor([10]), ctx) - pipe.unet(x, 10, ctx).sample).abs().max() <= 1e-5
