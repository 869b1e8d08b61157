"""The tiny autoencoder (TAESD): parity with diffusers' AutoencoderTiny on configurations drawn at random
from its space, read from each layout the files are published in (diffusers folders; the original repo's
separate nn.Sequential files and ComfyUI's combined ones, written here from the index rule, not by ldmkit);
hostile files refused in one line; the pipeline's tiny decoder and `ldmkit generate --decoder tiny`.
Replay a failure with its printed seed: `python -m pytest tests/test_tiny_autoencoder.py -m slow -k "seed-117]"`."""

import json
import os
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import randomize
from ldmkit.checkpoints.taesd_files import published_name, read_tiny_autoencoder
from ldmkit.cli import main
from ldmkit.errors import CheckpointError, ConfigError
from ldmkit.images import tensor_to_pil
from ldmkit.models.ldm import LatentDiffusion
from ldmkit.models.presets import tiny
from ldmkit.models.tiny_autoencoder import ACTIVATIONS, UPSAMPLE_MODES
from ldmkit.pipelines import Pipeline


def close(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    """Within 1e-5, or 1e-5 of the output's largest magnitude where that exceeds 1 (random weights make
    deep stacks of convolutions reach tens, where fp32 rounding alone differs by more than 1e-5)."""
    return ours.shape == ref.shape and bool((ours - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max())))


# --- configurations drawn at random ---------------------------------------------------------------


def draw(seed: int) -> dict:
    """An AutoencoderTiny config from diffusers' space (one width per part: see TinyAutoencoderConfig),
    and the sizes to run it at: odd and non-square latents and images. Half the draws keep what the
    original files cannot say (activation, upsampling, scale) at the original's values, so that every
    published layout is read too."""
    r = random.Random(seed)
    enc_levels, dec_levels = r.randint(1, 4), r.randint(1, 4)
    original = r.random() < 0.5
    cfg = dict(
        encoder_block_out_channels=(r.choice([4, 8, 12, 16]),) * enc_levels,
        decoder_block_out_channels=(r.choice([4, 8, 12, 16]),) * dec_levels,
        num_encoder_blocks=tuple(r.randint(0, 3) for _ in range(enc_levels)),
        num_decoder_blocks=tuple(r.randint(0, 3) for _ in range(dec_levels)),
        latent_channels=r.choice([4, 16]),
        in_channels=r.choice([3, 3, 3, 1, 4]),
        out_channels=r.choice([3, 3, 3, 1, 4]),
        upsampling_scaling_factor=2 if original else r.choice([1, 2, 3]),
        upsample_fn="nearest" if original else r.choice(UPSAMPLE_MODES),
        act_fn="relu" if original else r.choice(sorted(ACTIVATIONS)),
        scaling_factor=1.0 if original or r.random() < 0.5 else round(r.uniform(0.1, 2.0), 4),
        shift_factor=0.0 if original or r.random() < 0.5 else round(r.uniform(-0.5, 0.5), 4),
    )
    sizes = dict(
        latent=(r.randint(1, 2), r.randint(1, 9), r.randint(1, 9)),
        image=(r.randint(1, 2), r.randint(1, 40), r.randint(1, 40)),
    )
    return dict(config=cfg, original=original, sizes=sizes)


def reference(cfg: dict, seed: int):
    from diffusers import AutoencoderTiny

    return randomize(AutoencoderTiny(**cfg), seed=seed, std=0.1)


def original_parts(ref) -> tuple[dict, dict]:
    """The original repo's encoder and decoder state dicts, from the rule (not by ldmkit): the encoder's
    nn.Sequential indices are diffusers' `encoder.layers.N`; the decoder's are one higher, index 0 being
    the weightless Clamp that diffusers applies outside its Sequential."""
    enc, dec = {}, {}
    for k, v in ref.state_dict().items():
        part, _, rest = k.partition(".layers.")
        index, _, tail = rest.partition(".")
        (enc if part == "encoder" else dec)[f"{int(index) + (part == 'decoder')}.{tail}"] = v.clone()
    return enc, dec


def write(path: Path, state: dict) -> Path:
    """A state dict as the file's extension says: safetensors, or a plain torch.save pickle (.pth / .pt)."""
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def published_layouts(ref, spec: dict, folder: Path, r: random.Random) -> dict[str, Path]:
    """Where the drawn autoencoder is written in each layout that can hold it."""
    ref.save_pretrained(folder / "diffusers")
    out = {"diffusers folder": folder / "diffusers"}
    if not spec["original"]:
        return out
    enc, dec = original_parts(ref)
    ext = r.choice([".safetensors", ".pth", ".pt"])
    out["original decoder"] = write(folder / f"taesd_decoder{ext}", dec)
    out["original encoder"] = write(folder / f"taesd_encoder{r.choice(['.safetensors', '.pth'])}", enc)
    combined = {
        **{f"taesd_encoder.{k}": v for k, v in enc.items()},
        **{f"taesd_decoder.{k}": v for k, v in dec.items()},
    }
    combined |= {"vae_scale": torch.tensor(0.18215), "vae_shift": torch.tensor(0.0)}
    out["comfyui combined"] = write(folder / f"combined{ext}", combined)
    module = {f"{name}.{k}": v for name, part in (("encoder", enc), ("decoder", dec)) for k, v in part.items()}
    out["original TAESD module"] = write(folder / f"module{ext}", module)  # taesd.py's TAESD().state_dict()
    # diffusers' weights alone (taef1's diffusion_pytorch_model.safetensors dropped into a vae_approx folder)
    out["diffusers weights alone"] = write(folder / "weights.safetensors", ref.state_dict())
    return out


def check(seed: int, tmp_path: Path) -> None:
    spec = draw(seed)
    where = f"seed {seed} ({spec})"
    torch.manual_seed(seed)
    ref = reference(spec["config"], seed)
    cfg, (b, h, w), (bi, hi, wi) = spec["config"], spec["sizes"]["latent"], spec["sizes"]["image"]
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, cfg["latent_channels"], h, w, generator=g)
    pixels = torch.rand(bi, cfg["in_channels"], hi, wi, generator=g) * 2 - 1
    with torch.no_grad():
        # diffusers' pipelines divide by scaling_factor and add shift_factor before AutoencoderTiny.decode
        decoded = ref.decode(z / cfg["scaling_factor"] + cfg["shift_factor"]).sample
        encoded = (ref.encode(pixels).latents - cfg["shift_factor"]) * cfg["scaling_factor"]
    assert decoded.abs().mean() > 1e-3 and encoded.abs().mean() > 1e-3, f"{where}: the reference is blind"
    for layout, path in published_layouts(ref, spec, tmp_path, random.Random(seed)).items():
        tiny_file = read_tiny_autoencoder(path)
        ours = tiny_file.autoencoder
        with torch.no_grad():
            if ours.decoder is not None:
                assert close(ours.decode(z), decoded), f"{where}: decoder read from the {layout}"
            if ours.encoder is not None:
                assert close(ours.encode(pixels), encoded), f"{where}: encoder read from the {layout}"
        expected = {"original decoder": ("decoder",), "original encoder": ("encoder",)}.get(
            layout, ("encoder", "decoder")
        )
        assert ours.parts == expected, f"{where}: {layout} holds {ours.parts}"


@pytest.mark.parametrize("seed", [1, 4, 5, 6], ids=lambda v: f"seed-{v}")
def test_random_configs_equal_diffusers(seed, tmp_path):
    check(seed, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 260), ids=lambda v: f"seed-{v}")
def test_many_random_configs_equal_diffusers(seed, tmp_path):
    check(seed, tmp_path)


def test_the_draws_cover_the_space():
    """The default seeds meet both latent widths and both halves of the draw (original layouts or not),
    so the fast suite reads every layout; the slow sweep every activation and upsampling mode."""
    fast = [draw(s) for s in (1, 4, 5, 6)]
    assert {d["config"]["latent_channels"] for d in fast} == {4, 16}
    assert {d["original"] for d in fast} == {True, False}
    slow = [draw(s) for s in range(100, 260)]
    assert {d["config"]["act_fn"] for d in slow} == set(ACTIVATIONS)
    assert {d["config"]["upsample_fn"] for d in slow} == set(UPSAMPLE_MODES)
    assert {d["config"]["upsampling_scaling_factor"] for d in slow} == {1, 2, 3}


def test_published_shapes_and_names(tmp_path):
    """The published architecture (64 wide, 1-3-3-3 / 3-3-3-1 blocks) at 16 channels, under taesd3's
    names, equals diffusers; the family comes from the name, or from a combined file's scale and shift."""
    ref = reference({"latent_channels": 16}, seed=5)
    enc, dec = original_parts(ref)
    z, pixels = torch.randn(1, 16, 5, 3), torch.rand(1, 3, 24, 40) * 2 - 1
    dec_file = read_tiny_autoencoder(write(tmp_path / "taesd3_decoder.safetensors", dec))
    enc_file = read_tiny_autoencoder(write(tmp_path / "taesd3_encoder.pth", enc))
    with torch.no_grad():
        assert close(dec_file.autoencoder.decode(z), ref.decode(z).sample)
        assert close(enc_file.autoencoder.encode(pixels), ref.encode(pixels).latents)
    info = dec_file.describe()
    assert info["published_name"] == "taesd3" and info["for_families"] == ["sd3"]
    assert info["parts"] == ["decoder"] and info["latent_channels"] == 16 and info["upsample_factor"] == 8
    unnamed = read_tiny_autoencoder(write(tmp_path / "decoder16.safetensors", dec)).describe()
    assert unnamed["published_name"] is None and set(unnamed["for_families"]) == {"sd3", "flux"}
    assert "taesd3 and taef1" in unnamed["note"]
    flux = {f"taesd_decoder.{k}": v for k, v in dec.items()} | {"vae_scale": torch.tensor(0.3611)}
    flux["vae_shift"] = torch.tensor(0.1159)
    assert read_tiny_autoencoder(write(tmp_path / "combined.pth", flux)).describe()["published_name"] == "taef1"
    names = ["taesd_decoder.pth", "taesdxl_decoder.safetensors", "taesd3_decoder.pt", "taef1_encoder.pth", "TAESD"]
    assert [published_name(n) for n in names] == ["taesd", "taesdxl", "taesd3", "taef1", "taesd"]
    assert [published_name(n) for n in ("taesdv_decoder.pth", "my_taesd.pth", "taesana_decoder.pth")] == [None] * 3


def test_ours_keep_what_the_weights_cannot_say(tmp_path):
    """ldmkit's own files (what distillation writes) keep the activation, upsampling, scale and the family in
    the header: read back, they compute what was written, and refuse a model of another family."""
    from ldmkit.checkpoints.taesd_files import write_tiny_autoencoder
    from ldmkit.models.tiny_autoencoder import TinyAutoencoder, TinyAutoencoderConfig

    config = TinyAutoencoderConfig(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 2),
        num_decoder_blocks=(2, 1),
        act_fn="silu",
        upsample_fn="bilinear",
        scaling_factor=0.5,
        shift_factor=0.1,
    )
    written = randomize(TinyAutoencoder(config), seed=6)
    write_tiny_autoencoder(written, tmp_path / "ours.safetensors", family="sdxl", teacher="xl-base")
    read = read_tiny_autoencoder(tmp_path / "ours.safetensors")
    assert read.layout == "ours" and read.autoencoder.config == config and read.family == "sdxl"
    z, pixels = torch.randn(1, 4, 5, 6), torch.rand(1, 3, 10, 14) * 2 - 1
    with torch.no_grad():
        assert torch.equal(read.autoencoder.decode(z), written.decode(z))
        assert torch.equal(read.autoencoder.encode(pixels), written.encode(pixels))
    assert read.describe()["for_families"] == ["sdxl"] and "xl-base" in read.describe()["note"]
    with pytest.raises(ConfigError, match="distilled for SDXL models \\(xl-base\\); this model is ldmkit"):
        tiny_pipe("ldmkit").codec.set_tiny_decoder(tmp_path / "ours.safetensors")
    with pytest.raises(ConfigError, match="a tiny decoder for SDXL \\(taesdxl\\)"):
        tiny_pipe("sd1").codec.set_tiny_decoder(tmp_path / "ours.safetensors")


# --- hostile and foreign files -------------------------------------------------------------------


def small_decoder(tmp_path: Path, name: str = "taesd_decoder.safetensors", latent_channels: int = 4) -> Path:
    """A two-level tiny decoder (2x, as the tiny preset's autoencoder) in the original layout."""
    cfg = dict(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=latent_channels,
    )
    return write(tmp_path / name, original_parts(reference(cfg, seed=3))[1])


def refused(path, match: str, error=CheckpointError) -> str:
    with pytest.raises(error) as e:
        read_tiny_autoencoder(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message, message
    assert match in message, message
    return message


def test_hostile_files_are_refused_in_one_line(tmp_path):
    good = small_decoder(tmp_path)
    state = read_tiny_autoencoder(good).autoencoder.decoder.state_dict()
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    refused(tmp_path / "cut.safetensors", "corrupt safetensors file")
    torch.save(state, tmp_path / "whole.pth")
    data = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    refused(tmp_path / "cut.pth", "corrupt")

    wrong = dict(state, **{"3.conv.2.weight": torch.zeros(8, 8, 1, 1)})
    refused(write(tmp_path / "shape.safetensors", wrong), "has shape (8, 8, 1, 1)")
    missing = {k: v for k, v in state.items() if k != "3.conv.2.bias"}
    refused(write(tmp_path / "missing.safetensors", missing), "missing weight(s) 3.conv.2.bias")
    skip = dict(state, **{"3.skip.weight": torch.zeros(8, 8, 1, 1)})  # TAESD's blocks have no 1x1 skip
    refused(write(tmp_path / "extra.safetensors", skip), "unexpected weight(s) 3.skip.weight")
    stray = {f"taesd_decoder.{k}": v for k, v in state.items()} | {"notes": torch.zeros(1)}
    refused(write(tmp_path / "stray.safetensors", stray), "unexpected key(s) beside the comfyui layout's: notes")
    refused(write(tmp_path / "mixed.safetensors", dict(state, extra=torch.zeros(1))), "not a tiny autoencoder")
    no_first = {k: v for k, v in state.items() if not k.startswith("1.")}
    refused(write(tmp_path / "headless.safetensors", no_first), "not a TAESD decoder")

    class Payload:  # what a hostile pickle carries: a call run at load time
        def __reduce__(self):
            return os.mkdir, (str(tmp_path / "ran"),)

    torch.save({"1.weight": torch.zeros(8, 4, 3, 3), "x": Payload()}, tmp_path / "evil.pth")
    refused(tmp_path / "evil.pth", "refused to load")
    assert not (tmp_path / "ran").exists()

    from conftest import tiny_diffusers_vae

    save_file(tiny_diffusers_vae().state_dict(), str(tmp_path / "kl.safetensors"))  # a full autoencoder
    refused(tmp_path / "kl.safetensors", "--vae")


def test_diffusers_configs_are_read_or_refused(tmp_path):
    from diffusers import AutoencoderTiny

    AutoencoderTiny(
        encoder_block_out_channels=(8,),
        decoder_block_out_channels=(8,),
        num_encoder_blocks=(1,),
        num_decoder_blocks=(1,),
    ).save_pretrained(tmp_path / "f")
    config = json.loads((tmp_path / "f" / "config.json").read_text())

    def with_config(**changes):
        (tmp_path / "f" / "config.json").write_text(json.dumps({**config, **changes}))
        return tmp_path / "f"

    assert read_tiny_autoencoder(with_config(latent_magnitude=7, force_upcast=True)).autoencoder.parts
    refused(with_config(act_fn="tanh"), "act_fn 'tanh'")
    refused(with_config(upsample_fn="linear"), "upsample_fn 'linear'")
    refused(with_config(encoder_block_out_channels=[8, 16], num_encoder_blocks=[1, 1]), "one positive width")
    refused(with_config(num_decoder_blocks=[1, 1]), "one entry per level")
    refused(with_config(upsampling_scaling_factor=2.5), "upsampling_scaling_factor")
    refused(with_config(use_tiling=True), "unknown AutoencoderTiny field(s) use_tiling")
    refused(with_config(_class_name="AutoencoderKL"), "not an AutoencoderTiny")
    refused(with_config(latent_channels=16), "has shape")  # the config and the weights disagree


# --- the pipeline --------------------------------------------------------------------------------


def tiny_pipe(family: str = "sd1") -> Pipeline:
    """The tiny preset (4 channels, 2x autoencoder) calling itself `family`, which picks its published tiny
    decoder; sampling is not run."""
    torch.manual_seed(0)
    return Pipeline(LatentDiffusion(replace(tiny(), family=family)))


def test_the_pipeline_takes_only_a_tiny_decoder_that_fits(tmp_path):
    pipe = tiny_pipe()
    with pytest.raises(ConfigError, match="no tiny decoder is given"):
        pipe.codec.decoder = "tiny"
    for name, latent_channels, match in [
        ("taesdxl_decoder.pth", 4, "for SDXL \\(taesdxl\\); this model is Stable Diffusion 1.x: give taesd_decoder"),
        ("taesd_decoder.pth", 16, "decodes 16-channel latents; this model's have 4"),
    ]:
        with pytest.raises(ConfigError, match=match):
            pipe.codec.set_tiny_decoder(small_decoder(tmp_path, name, latent_channels))
    combined = {
        f"taesd_decoder.{k}": v
        for k, v in read_tiny_autoencoder(small_decoder(tmp_path)).autoencoder.decoder.state_dict().items()
    }
    write(
        tmp_path / "xl_combined.safetensors",
        combined | {"vae_scale": torch.tensor(0.13025), "vae_shift": torch.tensor(0.0)},
    )
    with pytest.raises(ConfigError, match="for SDXL"):  # its scale says SDXL's latents
        pipe.codec.set_tiny_decoder(tmp_path / "xl_combined.safetensors")
    (tmp_path / "vae_approx").mkdir()
    small_decoder(tmp_path / "vae_approx", "taesdxl_decoder.safetensors")
    with pytest.raises(ConfigError, match="no taesd_decoder.safetensors / .pth / .pt nor a diffusers folder taesd"):
        pipe.codec.set_tiny_decoder(tmp_path / "vae_approx")
    assert pipe.codec.tiny is None and pipe.codec.decoder == "full"
    with pytest.raises(ConfigError, match="no tiny decoder is published for ldmkit models"):
        tiny_pipe("ldmkit").codec.set_tiny_decoder(tmp_path / "vae_approx")


def test_the_pipeline_decodes_and_previews_with_the_tiny_decoder(tmp_path):
    pipe = tiny_pipe()
    (tmp_path / "vae_approx").mkdir()
    small_decoder(tmp_path / "vae_approx", "taesdxl_decoder.safetensors")
    path = small_decoder(tmp_path / "vae_approx", "taesd_decoder.pth")
    pipe.codec.set_tiny_decoder(tmp_path / "vae_approx")  # found by the family's published name
    direct = read_tiny_autoencoder(path).autoencoder
    z = torch.randn(2, 4, 5, 7)
    with torch.no_grad():
        want = direct.decode(z)
        full = pipe.decode(z)
    previews = pipe.preview(z)  # the web UI's "TAESD" live preview, whatever decodes the final image
    assert [p.tobytes() for p in previews] == [p.tobytes() for p in tensor_to_pil(want)]
    assert not torch.equal(full, want)
    pipe.codec.decoder = "tiny"
    with torch.no_grad():
        assert torch.equal(pipe.decode(z), want)
    pipe.codec.set_tiny_decoder(None)
    assert pipe.codec.decoder == "full" and pipe.codec.tiny is None


def test_generate_with_the_tiny_decoder(tmp_path, capsys):
    from PIL import Image

    assert main(["init-model", str(tmp_path / "tiny.safetensors")]) == 0
    decoder = small_decoder(tmp_path, "mine.safetensors")  # no published name: the tiny preset is no SD family
    common = ["a red circle", "--model", str(tmp_path / "tiny.safetensors"), "--steps", "2", "--seed", "1", "-q"]
    assert (
        main(["generate", *common, "--decoder", "tiny", "--tiny-decoder", str(decoder), "-o", str(tmp_path / "t.png")])
        == 0
    )
    assert main(["generate", *common, "-o", str(tmp_path / "f.png")]) == 0
    capsys.readouterr()
    pipe = Pipeline.load(tmp_path / "tiny.safetensors")
    latents = pipe("a red circle", steps=2, seed=1).latents
    with torch.no_grad():
        want = tensor_to_pil(read_tiny_autoencoder(decoder).autoencoder.decode(latents))[0]
    tiny_png, full_png = Image.open(tmp_path / "t.png"), Image.open(tmp_path / "f.png")
    assert tiny_png.tobytes() == want.tobytes()
    assert full_png.tobytes() != want.tobytes()
    assert "VAE Decoder: TAESD" in tiny_png.info["parameters"]
    assert "VAE Decoder" not in full_png.info["parameters"]

    assert main(["generate", *common, "--decoder", "tiny", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --decoder tiny: no tiny decoder is given: pass --tiny-decoder") and "\n" not in err
    assert "taesd_decoder.* for SD 1.x/2.x" in err and not (tmp_path / "x.png").exists()

    assert main(["inspect", str(decoder)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "tiny autoencoder (TAESD)" and info["parts"] == ["decoder"]
    assert info["latent_channels"] == 4 and info["layout"] == "original"
    assert set(info["for_families"]) >= {"sd1", "sdxl"} and "taesd and taesdxl" in info["note"]


def test_the_tiny_decoder_decodes_what_the_refiner_made(tmp_path):
    """SDXL's refiner continues the base's latents: with the tiny decoder asked for, the base's (taesdxl)
    decodes the refined latents, not the refiner's autoencoder."""
    from test_sdxl import build, draw

    base_spec, refiner_spec = draw(2), draw(1)
    base = build(base_spec, tmp_path / "base", 2)
    refiner = build(refiner_spec, tmp_path / "refiner", 1)
    refiner.vae = base.vae  # one latent space, as SDXL's base and refiner share their autoencoder
    refiner.save_pretrained(str(tmp_path / "refiner"))
    levels = base_spec["vae_levels"]
    cfg = dict(decoder_block_out_channels=(8,) * levels, num_decoder_blocks=(1,) * levels)
    path = write(tmp_path / "taesdxl_decoder.safetensors", original_parts(reference(cfg, seed=4))[1])
    ours = Pipeline.load(tmp_path / "base", precision="fp32", tiny_decoder=tmp_path)  # found by name
    ours.refiner = Pipeline.load(tmp_path / "refiner", precision="fp32")
    ours.codec.decoder = "tiny"
    side = 2 * base_spec["unet"]["sample_size"] * 2 ** (levels - 1)
    out = ours("a red circle", steps=4, seed=3, width=side, height=side, refiner_switch_at=0.5)
    with torch.no_grad():
        want = tensor_to_pil(read_tiny_autoencoder(path).autoencoder.decode(out.latents))
    assert [im.tobytes() for im in out.images] == [im.tobytes() for im in want]
    assert "VAE Decoder: TAESD" in out.infotexts[0] and "Refiner: refiner [" in out.infotexts[0]
