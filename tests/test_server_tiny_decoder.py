"""`ldmkit serve --tiny-decoder`: the web UI's `show_progress_type` (live previews in /sdapi/v1/progress)
and `sd_vae_decode_method` (the final decode) on tiny random models with a tiny decoder written here.
The worker is paused inside a step (a wrapped callback), so /progress is read at a known x0 and its
preview compared with that x0 decoded directly; and what cannot be honoured is a 4xx naming what to pass."""

import base64
import io
import logging
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from conftest import write_tiny_decoder
from ldmkit.checkpoints.taesd_files import read_tiny_autoencoder
from ldmkit.cli import main
from ldmkit.images import tensor_to_pil
from ldmkit.pipelines import Pipeline
from ldmkit.server.app import ServeConfig, create_app

SMALL = {"prompt": "a red circle", "width": 32, "height": 32, "steps": 3, "seed": 4, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """tiny: the tiny preset (family ldmkit: no published tiny decoder); sd1ish: the same calling itself
    SD 1.x, whose folder lookup finds taesd_decoder.*; mine: a decoder that fits both; wide: 16 channels."""
    from ldmkit.checkpoints.single_file import save_single_file
    from ldmkit.models.ldm import LatentDiffusion
    from ldmkit.models.presets import tiny

    folder = tmp_path_factory.mktemp("tiny-decoder")
    (folder / "models").mkdir()
    assert main(["init-model", str(folder / "models" / "tiny.safetensors"), "--seed", "0"]) == 0
    torch.manual_seed(1)
    save_single_file(LatentDiffusion(replace(tiny(), family="sd1")), folder / "models" / "sd1ish.safetensors")
    (folder / "vae_approx").mkdir()
    write_tiny_decoder(folder / "vae_approx" / "taesd_decoder.safetensors", seed=5)
    write_tiny_decoder(folder / "mine.safetensors", seed=6)
    write_tiny_decoder(folder / "wide.safetensors", latent_channels=16)
    return folder


def client_for(files, tmp_path, tiny_decoder, model="tiny"):
    config = ServeConfig(
        str(files / "models" / f"{model}.safetensors"),
        str(files / "models"),
        outputs=str(tmp_path / "out"),
        tiny_decoder=str(tiny_decoder) if tiny_decoder else None,
    )
    app = create_app(config)
    app.state.ready.result()
    return TestClient(app, raise_server_exceptions=False)


def png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def decoded(tiny_path, z: torch.Tensor) -> np.ndarray:
    """`z` decoded by the tiny decoder file itself, as the web UI's TAESD decodes."""
    with torch.no_grad():
        return np.asarray(tensor_to_pil(read_tiny_autoencoder(tiny_path).autoencoder.decode(z))[0])


def progress_at(client, monkeypatch, body: dict, step: int = 2) -> tuple[np.ndarray, torch.Tensor, dict]:
    """(/progress's current_image, x0, the request's answer) with the worker held inside `step`, after
    the server's own callback has seen it: a deterministic moment to read the preview at."""
    reached, release, seen, answers = threading.Event(), threading.Event(), {}, []
    call = Pipeline.__call__

    def held(self, *args, callback=None, **kwargs):
        def on_step(info):
            callback(info)
            if info.step == step and not reached.is_set():
                seen["x0"] = info.x0.clone()
                reached.set()
                release.wait(60)

        return call(self, *args, callback=on_step, **kwargs)

    monkeypatch.setattr(Pipeline, "__call__", held)
    thread = threading.Thread(target=lambda: answers.append(client.post("/sdapi/v1/txt2img", json=body)))
    thread.start()
    try:
        assert reached.wait(60), "the job never reached the step"
        progress = client.get("/sdapi/v1/progress").json()
        again = client.get("/sdapi/v1/progress").json()  # a second poll within the step: the same image
        assert again["current_image"] == progress["current_image"]
    finally:
        release.set()
        thread.join(60)
    monkeypatch.setattr(Pipeline, "__call__", call)
    assert answers[0].status_code == 200, answers[0].text
    return png(progress["current_image"]), seen["x0"], answers[0].json()


def test_progress_previews_by_show_progress_type(files, tmp_path, monkeypatch):
    mine = files / "mine.safetensors"
    with client_for(files, tmp_path, mine) as c:
        options = c.get("/sdapi/v1/options").json()
        assert options["show_progress_type"] == "Approx NN" and options["sd_vae_decode_method"] == "Full"
        assert c.post("/sdapi/v1/options", json={"show_progress_type": "TAESD"}).status_code == 200
        preview, x0, _ = progress_at(c, monkeypatch, SMALL)
        assert np.array_equal(preview, decoded(mine, x0))
        # the web UI's default, Approx NN: the tiny decoder too, when the model has one
        assert c.post("/sdapi/v1/options", json={"show_progress_type": "Approx NN"}).status_code == 200
        preview, x0, _ = progress_at(c, monkeypatch, SMALL)
        assert np.array_equal(preview, decoded(mine, x0))
        # Full, asked in the request alone: the model's own autoencoder
        full = {**SMALL, "override_settings": {"show_progress_type": "Full"}}
        preview, x0, answer = progress_at(c, monkeypatch, full)
        with torch.no_grad():
            want = np.asarray(tensor_to_pil(Pipeline.load(files / "models" / "tiny.safetensors").decode(x0))[0])
        assert np.array_equal(preview, want) and not np.array_equal(preview, decoded(mine, x0))
        assert "VAE Decoder" not in answer["info"]  # previews change no final image


def test_approx_cheap_is_the_linear_preview(files, tmp_path, monkeypatch):
    """An SD-family model with its tiny decoder found in a folder: Approx cheap is SD's linear map at latent
    size, TAESD the tiny decoder at image size."""
    with client_for(files, tmp_path, files / "vae_approx", model="sd1ish") as c:
        cheap = {**SMALL, "override_settings": {"show_progress_type": "Approx cheap"}}
        preview, x0, _ = progress_at(c, monkeypatch, cheap)
        assert preview.shape[:2] == (16, 16) and preview.shape[:2] == x0.shape[-2:]
        taesd = {**SMALL, "override_settings": {"show_progress_type": "TAESD"}}
        preview, x0, _ = progress_at(c, monkeypatch, taesd)
        assert np.array_equal(preview, decoded(files / "vae_approx" / "taesd_decoder.safetensors", x0))


def test_the_final_image_by_sd_vae_decode_method(files, tmp_path):
    mine = files / "mine.safetensors"
    pipe = Pipeline.load(files / "models" / "tiny.safetensors", tiny_decoder=mine)
    pipe.codec.decoder = "tiny"
    want = pipe(SMALL["prompt"], steps=3, seed=4, width=32, height=32, sampler="euler")
    with client_for(files, tmp_path, mine) as c:
        body = {**SMALL, "override_settings": {"sd_vae_decode_method": "TAESD"}}
        r = c.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        assert np.array_equal(png(r.json()["images"][0]), np.asarray(want.images[0]))
        assert "VAE Decoder: TAESD" in r.json()["info"]
        full = c.post("/sdapi/v1/txt2img", json=SMALL).json()  # the next job: the full decoder again
        assert "VAE Decoder" not in full["info"]
        assert not np.array_equal(png(full["images"][0]), np.asarray(want.images[0]))
        assert c.post("/sdapi/v1/options", json={"sd_vae_decode_method": "TAESD"}).status_code == 200
        r = c.post("/sdapi/v1/txt2img", json=SMALL)  # now the server's setting
        assert np.array_equal(png(r.json()["images"][0]), np.asarray(want.images[0]))


def refused(r, status: int, *needles: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "detail"} and "\n" not in body["detail"], body
    for needle in needles:
        assert needle in body["detail"], body["detail"]
    return body["detail"]


def test_what_cannot_be_honoured_is_a_4xx_naming_what_to_pass(files, tmp_path):
    with client_for(files, tmp_path, None) as c:  # no --tiny-decoder
        before = c.get("/sdapi/v1/options").json()
        for key in ("show_progress_type", "sd_vae_decode_method"):
            refused(c.post("/sdapi/v1/options", json={key: "TAESD"}), 422, key, "--tiny-decoder FILE_OR_DIR")
            body = {**SMALL, "override_settings": {key: "TAESD"}}
            refused(c.post("/sdapi/v1/txt2img", json=body), 422, f"override_settings.{key}", "--tiny-decoder")
        refused(c.post("/sdapi/v1/options", json={"show_progress_type": "Approx fancy"}), 422, "allowed: Approx NN")
        refused(c.post("/sdapi/v1/options", json={"sd_vae_decode_method": ["Full"]}), 422, "allowed: Full, TAESD")
        refused(c.post("/sdapi/v1/options", json={"sd_vae_encode_method": "TAESD"}), 422, "allowed: Full")
        odd = {**SMALL, "override_settings": {"sd_vae_decode_method": "x" * 10_000}}
        assert len(refused(c.post("/sdapi/v1/txt2img", json=odd), 422, "allowed: Full, TAESD")) < 200
        assert c.get("/sdapi/v1/options").json() == before
        cheap = {"show_progress_type": "Approx cheap", "sd_vae_decode_method": "Full", "sd_vae_encode_method": "Full"}
        assert c.post("/sdapi/v1/options", json=cheap).status_code == 200
        assert c.post("/sdapi/v1/txt2img", json=SMALL).status_code == 200
        assert c.get("/ldmkit/info").json()["tiny_decoder"] is False


def test_a_file_that_does_not_fit_is_refused_for_that_model(files, tmp_path, caplog):
    with caplog.at_level(logging.INFO, "ldmkit.server"), client_for(files, tmp_path, files / "wide.safetensors") as c:
        said = [r for r in caplog.records if "tiny decoder" in r.getMessage()]
        assert len(said) == 1 and said[0].levelno == logging.WARNING, [r.getMessage() for r in said]
        assert "decodes 16-channel latents; this model's have 4" in said[0].getMessage()
        body = {**SMALL, "override_settings": {"sd_vae_decode_method": "TAESD"}}
        refused(c.post("/sdapi/v1/txt2img", json=body), 422, "model 'tiny' has no tiny decoder", "16-channel", "'Full'")
        assert c.post("/sdapi/v1/txt2img", json=SMALL).status_code == 200  # the model serves, decoded in full
        assert c.get("/ldmkit/info").json()["tiny_decoder"] is True


def test_a_folder_gives_each_model_its_familys_or_none(files, tmp_path):
    with client_for(files, tmp_path, files / "vae_approx", model="sd1ish") as c:
        body = {**SMALL, "override_settings": {"sd_vae_decode_method": "TAESD"}}
        r = c.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200 and "VAE Decoder: TAESD" in r.json()["info"], r.text
        other = {**SMALL, "override_settings": {"sd_model_checkpoint": "tiny", "show_progress_type": "TAESD"}}
        refused(c.post("/sdapi/v1/txt2img", json=other), 422, "no tiny decoder is published for ldmkit models")
        other["override_settings"]["show_progress_type"] = "Approx NN"  # the default: works without one
        assert c.post("/sdapi/v1/txt2img", json=other).status_code == 200


def test_serve_refuses_a_missing_tiny_decoder_in_one_line(tmp_path, capsys):
    assert main(["serve", "--port", "0", "--tiny-decoder", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: --tiny-decoder {tmp_path / 'nope'}: no such file or folder", err
