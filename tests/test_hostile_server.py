"""The server under hostile input: every malformed or oversized field is a 4xx in the documented shape
(never a 5xx), images are refused from their headers before they are decoded, prompts are bounded in
chunks, the options hold only known settings, a full queue answers 503, bodies over the limit 413."""

import base64
import io
import json
import struct
import threading
import time
import zlib

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ldmkit.cli import main
from ldmkit.server.app import Limits, ServeConfig, create_app

SMALL = {"width": 32, "height": 32, "steps": 1, "cfg_scale": 5}


def declared_png(width: int, height: int) -> bytes:
    """A few hundred bytes whose header declares width x height RGBA pixels (a decompression bomb's
    header; the pixel data is cut short, so nothing here allocates them)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
        + chunk(b"IEND", b"")
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    assert main(["init-model", str(folder / "tiny.safetensors"), "--seed", "0"]) == 0
    broken = folder / "broken"  # a diffusers folder whose unet config lacks keys
    assert main(["convert", str(folder / "tiny.safetensors"), str(broken), "--to", "diffusers"]) == 0
    (broken / "ldmkit.json").unlink()
    config = json.loads((broken / "unet" / "config.json").read_text())
    del config["layers_per_block"], config["block_out_channels"]
    (broken / "unet" / "config.json").write_text(json.dumps(config))
    return folder


def client_for(models, tmp_path, **limits) -> TestClient:
    config = ServeConfig(
        str(models / "tiny.safetensors"),
        str(models),
        outputs=str(tmp_path / "out"),
        limits=Limits(max_pixels=64 * 64, **limits),
    )
    app = create_app(config)
    app.state.ready.result()
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(models, tmp_path_factory):
    with client_for(models, tmp_path_factory.mktemp("c"), max_input_pixels=64 * 64) as c:
        yield c


def refused(r, status: int, *needles: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error", "detail"} and isinstance(body["detail"], str), body
    assert all(n in body["detail"] for n in needles), body


def test_images_are_refused_from_their_headers(client):
    init = b64(png_bytes(Image.new("RGB", (32, 32))))
    for bomb in (declared_png(13000, 13000), declared_png(100000, 100000)):
        for body in (
            {**SMALL, "init_images": [b64(bomb)]},
            {**SMALL, "init_images": [init], "mask": b64(bomb), "inpaint_full_res": False, "inpainting_fill": 1},
        ):
            refused(client.post("/sdapi/v1/img2img", json=body), 422, "pixels; allowed: at most 4096")
        refused(client.post("/sdapi/v1/png-info", json={"image": b64(bomb)}), 422, "pixels; allowed: at most 4096")
    big = b64(png_bytes(Image.new("RGB", (80, 80))))  # real, but over this server's input limit
    refused(client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [big]}), 422, "80x80 pixels")
    unit = {"enabled": True, "image": b64(declared_png(13000, 13000)), "module": "canny", "model": "x"}
    body = {**SMALL, "alwayson_scripts": {"ControlNet": {"args": [unit]}}}
    refused(client.post("/sdapi/v1/txt2img", json=body), 422, "pixels; allowed")
    assert client.post("/sdapi/v1/txt2img", json=SMALL).status_code == 200  # still serving


def test_a_prompt_is_bounded_in_chunks(client):
    refused(client.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "BREAK " * 660}), 422, "chunks", "at most 8")
    assert client.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "a BREAK b BREAK c"}).status_code == 200


def test_wrong_typed_and_huge_fields_are_4xx(client, models):
    unit = {"enabled": True, "image": b64(png_bytes(Image.new("RGB", (32, 32)))), "module": "none"}
    cases = [
        ({"seed": 2**64}, "seed"),
        ({"seed": 2**64 - 1, "batch_size": 2}, "seed"),
        ({"override_settings": {"sd_model_checkpoint": 5}}, "sd_model_checkpoint"),
        ({"override_settings": {"sd_model_checkpoint": ["a"]}}, "sd_model_checkpoint"),
        ({"override_settings": {"sd_vae": []}}, "sd_vae"),
        ({"override_settings": {"sd_vae": {}}}, "sd_vae"),
        ({"override_settings": {"samples_format": []}}, "samples_format"),
        ({"override_settings": {"CLIP_stop_at_last_layers": "abc"}}, "CLIP_stop_at_last_layers"),
        ({"alwayson_scripts": {"anything": {"args": 5}}}, "args"),
        ({"alwayson_scripts": {"ControlNet": {"args": 5}}}, "args"),
        ({"alwayson_scripts": {"ControlNet": {"args": [{**unit, "weight": "abc"}]}}}, "weight"),
        ({"alwayson_scripts": {"ControlNet": {"args": [{**unit, "guidance_start": "x"}]}}}, "guidance_start"),
        ({"scheduler": "sideways", "sampler_name": "Euler"}, "scheduler"),
        ({"scheduler": "sideways"}, "scheduler"),
    ]
    for extra, needle in cases:
        refused(client.post("/sdapi/v1/txt2img", json={**SMALL, **extra}), 422, needle)
    init = b64(png_bytes(Image.new("RGB", (32, 32))))
    body = {**SMALL, "init_images": [init], "mask": init, "mask_blur": 10**12, "inpaint_full_res": False}
    refused(client.post("/sdapi/v1/img2img", json={**body, "inpainting_fill": 1}), 422, "mask_blur")
    body["mask_blur"] = 4
    for blend in ("sideways", 5, ["noised"], "x" * 100_000):
        refused(
            client.post("/sdapi/v1/img2img", json={**body, "inpainting_fill": 1, "inpaint_blend": blend}),
            422,
            "inpaint_blend",
        )
    refused(
        client.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"sd_model_checkpoint": "broken"}}), 422
    )
    assert client.post("/sdapi/v1/txt2img", json=SMALL).status_code == 200  # still serving, the model reloaded


def test_options_hold_only_known_settings(client):
    before = client.get("/sdapi/v1/options").json()
    refused(client.post("/sdapi/v1/options", json={"x": "y" * 2**20}), 422, "not a setting")
    refused(client.post("/sdapi/v1/options", json={"outdir_samples": "/tmp/elsewhere"}), 422, "--outputs")
    refused(client.post("/sdapi/v1/options", json={"sd_vae": ["a"]}), 422, "sd_vae")
    refused(client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2, "nope": 1}), 422, "nope")
    assert client.get("/sdapi/v1/options").json() == before  # nothing of a refused update was kept
    assert (
        client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2, "sd_vae": "Automatic"}).status_code == 200
    )
    assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2
    assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1}).status_code == 200


def test_errors_have_the_documented_shape(client):
    schema = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    error = schema["components"]["schemas"]["Error"]
    assert error["properties"]["detail"]["type"] == "string"
    for operations in schema["paths"].values():
        for operation in operations.values():
            for status in ("400", "404", "413", "422", "503"):
                assert operation["responses"][status]["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/Error"
                }
    refused(client.post("/sdapi/v1/txt2img", json={**SMALL, "steps": "many"}), 422, "steps")
    refused(client.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"sd_model_checkpoint": "nope"}}), 404)
    refused(client.get("/sdapi/v1/no-such-route"), 404)


def test_bodies_over_the_limit_are_413(models, tmp_path):
    with client_for(models, tmp_path, max_body_bytes=10_000) as c:
        refused(c.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "x" * 20_000}), 413, "10000 bytes")

        def chunks():  # no Content-Length: counted as it arrives
            yield b'{"prompt": "'
            for _ in range(20):
                yield b"x" * 1000
            yield b'"}'

        r = c.post("/sdapi/v1/txt2img", content=chunks(), headers={"Content-Type": "application/json"})
        refused(r, 413, "10000 bytes")
        assert c.post("/sdapi/v1/txt2img", json=SMALL).status_code == 200


def test_a_full_queue_answers_503_and_status_routes_stay_quick(models, tmp_path):
    with client_for(models, tmp_path, max_queue=2) as c:
        slow = {"prompt": "a", "width": 64, "height": 64, "steps": 150, "seed": 1}
        answers = []
        threads = [
            threading.Thread(target=lambda: answers.append(c.post("/sdapi/v1/txt2img", json=slow))) for _ in range(3)
        ]
        for t in threads:
            t.start()
            time.sleep(0.3)  # in order: one running, two queued
        deadline = time.time() + 60
        while c.app.state.worker.pending < 2 and time.time() < deadline:
            time.sleep(0.05)
        r = c.post("/sdapi/v1/txt2img", json=SMALL)
        refused(r, 503, "busy")
        assert int(r.headers["retry-after"]) > 0
        for path in ("/sdapi/v1/progress", "/sdapi/v1/options", "/sdapi/v1/sd-models"):
            assert c.get(path).status_code == 200
        assert c.post("/sdapi/v1/interrupt").status_code == 200
        while any(t.is_alive() for t in threads):
            c.post("/sdapi/v1/interrupt")
            time.sleep(0.2)
        assert sorted(a.status_code for a in answers) == [200, 200, 200]


def test_progress_never_goes_back_across_batches(models, tmp_path, monkeypatch):
    from ldmkit.pipelines import Pipeline

    with client_for(models, tmp_path) as c:
        worker, seen = c.app.state.worker, []
        call = Pipeline.__call__

        def watched(self, *args, callback=None, **kwargs):
            seen.append(worker.progress.fraction)  # a batch's start: the moment a stale step showed

            def on_step(info):
                callback(info)
                seen.append(worker.progress.fraction)

            return call(self, *args, callback=on_step, **kwargs)

        monkeypatch.setattr(Pipeline, "__call__", watched)
        assert c.post("/sdapi/v1/txt2img", json={**SMALL, "steps": 3, "n_iter": 3}).status_code == 200
    assert len(seen) == 12 and seen == sorted(seen), seen


def test_img2img_does_not_echo_its_uploads(client):
    init = b64(png_bytes(Image.new("RGB", (32, 32))))
    r = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [init]})
    assert r.status_code == 200 and "init_images" not in r.json()["parameters"], r.text[:200]
    asked = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [init], "include_init_images": True})
    assert asked.json()["parameters"]["init_images"] == [init]
