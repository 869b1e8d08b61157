"""Model upscalers for the hires fix (pipelines/upscalers.py): a tiny random-weight ESRGAN saved as files,
recognised through our safe readers and spandrel, run as the web UI runs upscalers (whole, and in tiles
that match the whole image up to the seams' measured error), repeated until large enough, found by name
only inside the upscaler folder, and reached through the CLI, the Python API and the HTTP API."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file
from test_bad_input import Payload, assert_one_line_error

from conftest import import_spandrel
from ldmkit.cli import main
from ldmkit.errors import LdmkitError
from ldmkit.pipelines import Pipeline
from ldmkit.pipelines.upscalers import ModelUpscaler, describe, read_upscaler, run, tiled, upscale
from ldmkit.server.app import ServeConfig, create_app

import_spandrel()  # ldmkit's upscalers import it when first used

NAME = "2x-Tiny"
PROMPT = "a red circle above a blue square"


def tiny_esrgan(scale: int = 2, channels: int = 3) -> dict:
    """An RRDBNet of 8 filters and 1 block, random weights; its last layer given a gain of 4 and a bias of
    0.5, so that the image it makes varies with its input, mid-range (at spandrel's initialisation the
    output is nearly flat, near 0)."""
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    net = ESRGAN(in_nc=channels, out_nc=channels, num_filters=8, num_blocks=1, scale=scale)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    last = [k for k in state if k.endswith(".weight")][-1]
    state[last] *= 4
    state[last.replace(".weight", ".bias")].fill_(0.5)
    return state


@pytest.fixture
def folder(tmp_path):
    """upscalers/: the tiny ESRGAN, and files that are no upscaler; outside/ beside it."""
    up, outside = tmp_path / "upscalers", tmp_path / "outside"
    up.mkdir()
    outside.mkdir()
    save_file(tiny_esrgan(), str(up / f"{NAME}.safetensors"))
    save_file({"foo": torch.randn(3, 3), "bar.weight": torch.randn(8, 3, 3, 3)}, str(up / "random.safetensors"))
    save_file(tiny_esrgan(channels=1), str(up / "gray.safetensors"))
    torch.save({"params_ema": {"model.0.weight": Payload(tmp_path / "ran")}}, up / "evil.pth")
    save_file(tiny_esrgan(), str(outside / "secret.safetensors"))
    (up / "link.safetensors").symlink_to(outside / "secret.safetensors")
    return up


def image(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth random colours (noise upscaled), an 8-bit RGB image."""
    small = np.random.default_rng(seed).integers(0, 256, (max(h // 4, 1), max(w // 4, 1), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


def test_read_by_our_readers_and_recognised_by_spandrel(folder, tmp_path):
    up = read_upscaler(folder / f"{NAME}.safetensors")
    assert (up.name, up.architecture, up.scale, up.tiled) == (NAME, "ESRGAN", 2, True)
    assert (describe(folder / f"{NAME}.safetensors").architecture, describe(folder / f"{NAME}.safetensors").scale) == (
        "ESRGAN",
        2,
    )
    four = tmp_path / "4x.safetensors"
    save_file(tiny_esrgan(scale=4), str(four))
    assert read_upscaler(four).scale == describe(four).scale == 4
    # as Real-ESRGAN releases them: a pickle holding params_ema (the weights used) beside params
    state = tiny_esrgan()
    torch.save({"params": {k: torch.zeros_like(v) for k, v in state.items()}, "params_ema": state}, tmp_path / "r.pth")
    pth = read_upscaler(tmp_path / "r.pth")
    x = torch.rand(1, 3, 12, 10)
    assert describe(tmp_path / "r.pth").scale == 2 and torch.equal(pth.net(x), up.net(x))


def test_whole_image_is_spandrel_then_lanczos_and_tiles_match_it(folder):
    up = read_upscaler(folder / f"{NAME}.safetensors")
    picture = image(32, 24)
    x = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        direct = up.net(x)  # spandrel's descriptor, called as its documentation says
    arr = (255.0 * direct[0].clamp(0, 1)).permute(1, 2, 0).numpy().astype(np.uint8)
    want = Image.fromarray(arr).resize((48, 40), Image.LANCZOS)  # one pass (64x48) covers 48x40
    assert np.array_equal(np.asarray(upscale(picture, 48, 40, up, tile=0)), np.asarray(want))

    # Tiles of 32 pixels overlapping by 8: the network (about 20 3x3 convolutions) reaches further than the
    # overlap, so the tiles differ from the whole near the seams, and blending across the overlaps hides
    # most of it. Measured over seeds 0-3: largest difference 0.021-0.031 (outputs' spread 0.04-0.11),
    # mean 0.0008-0.0012, 0.12-0.15 of what tiles without overlap make; 8-bit images within 5-8 levels.
    x = torch.from_numpy(np.asarray(image(80, 72), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        whole, tiles, unblended = up.net(x), tiled(up.net, x, 2, 32, 8), tiled(up.net, x, 2, 32, 0)
    err, seams = (tiles - whole).abs(), (unblended - whole).abs().max()
    assert whole.std() > 0.03 and err.max() <= 0.05 and err.mean() <= 0.002 and err.max() <= 0.25 * seams, (
        float(err.max()),
        float(err.mean()),
        float(seams),
    )
    a, b = (np.asarray(run(up, image(80, 72), tile)).astype(int) for tile in (0, 32))
    assert np.abs(a - b).max() <= 10

    # a network that looks at one pixel at a time: tiles and whole agree, so the blend itself is exact
    def pointwise(t):
        return F.interpolate(t, scale_factor=2, mode="nearest") ** 2

    assert torch.allclose(tiled(pointwise, x, 2, 32, 8), pointwise(x), atol=1e-6)


def counting(scale: int) -> tuple[ModelUpscaler, list]:
    calls = []

    def net(x):
        calls.append(tuple(x.shape[-2:]))
        return F.interpolate(x, scale_factor=scale, mode="nearest")

    return ModelUpscaler("count", None, "test", scale, net), calls


@pytest.mark.parametrize(
    "size, factor, passes",
    [
        (80, 2, 3),  # 5x from 16: 32, 64, 128, then Lanczos down to 80
        (144, 2, 3),  # 9x: at most 3 passes (128), then Lanczos up to 144
        (32, 2, 1),  # 2x: one pass is exactly it
        (48, 4, 1),  # 3x with a 4x model: one pass, then down
        (64, 1, 1),  # a 1x model changes no size: one pass, then Lanczos
        (16, 2, 0),  # no larger: the model does not run
    ],
)
def test_the_model_repeats_until_large_enough_at_most_three_times(size, factor, passes):
    model, calls = counting(factor)
    out = upscale(image(16, 16), size, size, model, tile=0)
    assert out.size == (size, size) and len(calls) == passes


def test_generate_with_a_model_upscaler_through_the_cli_python_and_api(folder, tmp_path, capsys):
    argv = ["generate", PROMPT, "--seed", "3", "--steps", "2", "--hires", "2", "--hires-upscaler", NAME]
    assert main([*argv, "--upscaler-dir", str(folder), "-q", "-o", str(tmp_path / "cli.png")]) == 0
    made = Image.open(tmp_path / "cli.png")
    text = made.info["parameters"]
    assert made.size == (128, 128) and f"Hires upscaler: {NAME}," in text
    capsys.readouterr()

    pipe = Pipeline.load(None)
    pipe.upscaler_dir = folder
    cached = pipe.upscalers.get(folder / f"{NAME}.safetensors")
    out = pipe(PROMPT, seed=3, steps=2, hires_scale=2, hires_upscaler=NAME)
    assert pipe.upscalers.get(folder / f"{NAME}.safetensors") is cached  # read once, not once a call
    assert out.infotexts[0] == text and np.array_equal(np.asarray(out.images[0]), np.asarray(made))
    lanczos = pipe(PROMPT, seed=3, steps=2, hires_scale=2, hires_upscaler="Lanczos")
    assert not np.array_equal(np.asarray(lanczos.images[0]), np.asarray(made))  # the model made the difference

    app = create_app(ServeConfig(outputs=str(tmp_path / "outputs"), upscaler_dir=str(folder)))
    app.state.ready.result()
    body = {"prompt": PROMPT, "seed": 3, "steps": 2, "enable_hr": True, "hr_scale": 2, "hr_upscaler": NAME}
    with TestClient(app) as client:
        listed = client.get("/sdapi/v1/upscalers").json()
        answer = client.post("/sdapi/v1/txt2img", json=body)
        refused = {n: client.post("/sdapi/v1/txt2img", json={**body, "hr_upscaler": n}) for n in REFUSED_NAMES}
        unreadable = {n: client.post("/sdapi/v1/txt2img", json={**body, "hr_upscaler": n}) for n in BAD_FILES}
    assert answer.status_code == 200, answer.text
    assert json.loads(answer.json()["info"])["infotexts"][0] == text
    ours = [u for u in listed if u["model_path"]]
    assert ours == [
        {
            "name": NAME,
            "model_name": "ESRGAN",
            "model_path": str(folder / f"{NAME}.safetensors"),
            "model_url": None,
            "scale": 2,
        }
    ]  # the files that are no upscaler are not offered
    assert [u["name"] for u in listed[:3]] == ["None", "Lanczos", "Nearest"]
    for name, r in refused.items():
        assert r.status_code == 422 and "not a built-in upscaler" in r.json()["detail"], (name, r.text)
        assert str(tmp_path) not in r.json()["detail"]
    for name, r in unreadable.items():
        assert r.status_code == 422 and BAD_FILES[name] in r.json()["detail"], (name, r.text)
    assert not (tmp_path / "ran").exists()


REFUSED_NAMES = ["../outside/secret", "../outside/nosuch", "/etc/passwd", "link", "nosuch", f"{NAME}.safetensors"]
# name -> what its one-line refusal says
BAD_FILES = {
    "random": "not a recognised upscaler",
    "gray": "1 to 1 channels",
    "evil": "refused to load: the file pickles",
}


def refusal(capsys, name: str, folder) -> str:
    """The CLI's error line for --hires-upscaler NAME, the name blanked out so that two can be compared."""
    argv = ["generate", PROMPT, "--steps", "2", "--hires", "2", "--hires-upscaler", name, "-q"]
    where = ["--upscaler-dir", str(folder)] if folder else []
    code = main([*argv, *where, "-o", str(Path(folder or ".") / "never-written.png")])
    _, err = capsys.readouterr()
    assert_one_line_error(code, err, "hires upscaler")
    return err.replace(repr(name), "NAME")


def test_names_outside_the_folder_and_bad_files_are_refused_before_the_model_loads(folder, capsys, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(Pipeline, "load", no_load)
    outside = folder.parent / "outside"
    missing = refusal(capsys, "nosuch", folder)
    assert "not a built-in upscaler and not a model in the upscaler folder" in missing
    assert "allowed: Latent," in missing and f"or the models: {NAME}, evil, gray, random" in missing
    for name in ("../outside/secret", "../outside/nosuch", f"{outside}/secret", f"{outside}/nosuch", "link", ".."):
        assert refusal(capsys, name, folder) == missing, name
    assert "(no upscaler folder is given: --upscaler-dir)" in refusal(capsys, NAME, None)
    for name, words in BAD_FILES.items():
        argv = ["generate", PROMPT, "--hires", "2", "--hires-upscaler", name, "--upscaler-dir", str(folder), "-q"]
        code = main([*argv, "-o", str(folder.parent / "never-written.png")])
        _, err = capsys.readouterr()
        assert_one_line_error(code, err, words, str(folder / name))
    assert not (folder.parent / "ran").exists()  # the pickle's code never ran
    with pytest.raises(LdmkitError, match="not a recognised upscaler"):
        read_upscaler(folder / "random.safetensors")


def test_models_lists_the_upscaler_with_its_architecture_and_scale(folder, capsys):
    assert main(["models", str(folder), "--json"]) == 0
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)["folders"][0]["entries"]}
    assert (entries[f"{NAME}.safetensors"]["kind"], entries[f"{NAME}.safetensors"]["architecture"]) == (
        "upscaler",
        "ESRGAN",
    )
    assert entries[f"{NAME}.safetensors"]["scale"] == 2 and entries["random.safetensors"]["kind"] == "unknown"
    assert main(["models", str(folder)]) == 0
    assert "ESRGAN upscaler, 2x; use with --upscaler-dir FOLDER" in capsys.readouterr().out
