"""`ldmkit serve`: the popular web UI's API through FastAPI's test client, on a tiny random model --
every route, the shapes of its answers, bad input answered 4xx (never 500) while the server keeps
serving, one worker in arrival order, interrupt, credentials, and a bounded load test."""

import base64
import io
import json
import threading
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from ldmkit.cli import main
from ldmkit.pipelines import Pipeline
from ldmkit.server.app import Limits, ServeConfig, create_app


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    assert main(["init-model", str(folder / "tiny.safetensors"), "--seed", "0"]) == 0
    assert main(["init-model", str(folder / "other.safetensors"), "--seed", "1"]) == 0
    return folder


@pytest.fixture(scope="module")
def client(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs")
    config = ServeConfig(
        str(models / "tiny.safetensors"), str(models), outputs=str(out), limits=Limits(max_pixels=128 * 128)
    )
    app = create_app(config)
    app.state.ready.result()
    with TestClient(app, raise_server_exceptions=False) as c:
        c.outputs = out
        yield c


def png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def b64_of(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


SMALL = {"width": 32, "height": 32, "steps": 2, "cfg_scale": 5}


def test_txt2img_answers_as_the_web_ui_does(client, models):
    body = {"prompt": "a (red:1.2) circle", "seed": 5, "batch_size": 2, "n_iter": 2, "sampler_name": "Euler a", **SMALL}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert set(data) == {"images", "parameters", "info"}
    info = json.loads(data["info"])  # a JSON string, as clients expect
    assert info["seed"] == 5 and info["all_seeds"] == [5, 6, 7, 8] and len(info["infotexts"]) == 4
    assert info["sampler_name"] == "Euler a" and info["width"] == 32 and info["sd_model_name"] == "tiny"
    assert data["parameters"]["prompt"] == "a (red:1.2) circle" and data["parameters"]["n_iter"] == 2
    images = [png(b) for b in data["images"]]
    assert len(images) == 4 and images[0].size == (32, 32)
    assert "Seed: 7" in images[2].info["parameters"] and "ldmkit sampler: euler_a" in images[2].info["parameters"]
    # seed + i per image: the third image is the first of a batch started at seed 7
    direct = Pipeline.load(models / "tiny.safetensors")(
        "a (red:1.2) circle", steps=2, cfg=5, sampler="euler_a", seed=7, width=32, height=32
    )
    assert np.array_equal(np.asarray(images[2]), np.asarray(direct.images[0]))
    saved = sorted(client.outputs.glob("txt2img-images/*/*.png"))
    assert len(saved) >= 4 and "Seed:" in Image.open(saved[-1]).info["parameters"]


@pytest.mark.parametrize(
    "fields,ours",
    [
        ({"sampler_name": "DPM++ 2M Karras"}, "dpmpp_2m_karras"),
        ({"sampler_name": "DPM++ 2M", "scheduler": "karras"}, "dpmpp_2m_karras"),
        ({"sampler_name": "DPM++ 2M", "scheduler": "automatic"}, "dpmpp_2m_karras"),
        ({"sampler_name": "DPM++ 2M", "scheduler": "uniform"}, "dpmpp_2m"),
        ({"sampler_index": "DDIM"}, "ddim"),
        ({}, "dpmpp_2m_karras"),  # the model's default
    ],
)
def test_web_ui_sampler_names_map_to_ours(client, fields, ours):
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, **fields})
    assert r.status_code == 200, r.text
    assert f"ldmkit sampler: {ours}" in json.loads(r.json()["info"])["infotexts"][0]


def test_the_sgm_uniform_schedule_type_is_a_timestep_spacing(client):
    """The web UI's "SGM Uniform" (by label, name or alias): the sampler's uniform row walking sgm_uniform,
    written back as the web UI writes it; the samplers it offers no schedule types with, a different
    timestep_spacing beside it, or a hires pass of another schedule type are refused in one line."""
    for scheduler in ("SGM Uniform", "sgm_uniform", "SGMUniform"):
        r = client.post("/sdapi/v1/txt2img", json={**SMALL, "sampler_name": "Euler a", "scheduler": scheduler})
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])["infotexts"][0]
        assert "Schedule type: SGM Uniform" in info and "Timestep spacing: sgm_uniform" in info, info
        assert "ldmkit sampler: euler_a" in info
    names = [s["label"] for s in client.get("/sdapi/v1/schedulers").json()]
    assert "SGM Uniform" in names
    sgm = {"sampler_name": "Euler", "scheduler": "SGM Uniform"}
    for fields, needle in [
        ({"sampler_name": "DDIM", "scheduler": "SGM Uniform"}, "schedule type 'SGM Uniform' with DDIM; allowed"),
        ({**sgm, "timestep_spacing": "trailing"}, "give one"),
        ({**sgm, "enable_hr": True, "hr_scheduler": "Uniform"}, "hr_scheduler"),
        ({"sampler_name": "Euler", "enable_hr": True, "hr_scheduler": "SGM Uniform"}, "hr_scheduler"),
    ]:
        r = client.post("/sdapi/v1/txt2img", json={**SMALL, **fields})
        assert r.status_code == 422 and needle in r.json()["detail"], (fields, r.text)


def test_inert_fields_are_accepted_and_the_rest_refused(client):
    inert = {
        "enable_hr": False,
        "alwayson_scripts": {},
        "override_settings": {"sd_vae": "Automatic"},
        "styles": [],
        "restore_faces": False,
        "hr_scale": 2,
        "some_extension_field": [1, 2],
        "script_args": [],
    }
    assert client.post("/sdapi/v1/txt2img", json={**SMALL, **inert}).status_code == 200
    for field, needle in [
        ({"enable_hr": True, "hr_checkpoint_name": "other.safetensors"}, "hr_checkpoint_name"),
        ({"script_name": "x/y/z plot"}, "unknown script"),
        ({"styles": ["cinematic"]}, "styles"),
        ({"subseed_strength": 0.3}, "variation seeds"),
        ({"tiling": True}, "tiling"),
        ({"alwayson_scripts": {"ADetailer": {"args": [True]}}}, "alwayson_scripts.ADetailer"),
        ({"override_settings": {"eta_noise_seed_delta": 31337}}, "override_settings.eta_noise_seed_delta"),
    ]:
        r = client.post("/sdapi/v1/txt2img", json={**SMALL, **field})
        assert r.status_code == 422 and needle in r.json()["detail"], (field, r.text)


def test_bad_input_is_4xx_with_a_message_and_the_server_keeps_serving(client):
    cases = [
        ("post", "/sdapi/v1/txt2img", {**SMALL, "width": 33}, 422, "multiple of 8"),
        ("post", "/sdapi/v1/txt2img", {**SMALL, "width": 256, "height": 256}, 422, "at most 16384 pixels"),
        ("post", "/sdapi/v1/txt2img", {**SMALL, "steps": "many"}, 422, "steps"),
        ("post", "/sdapi/v1/txt2img", {**SMALL, "steps": 0}, 422, "steps: 0"),
        ("post", "/sdapi/v1/txt2img", {**SMALL, "batch_size": 9, "n_iter": 2}, 422, "batch_size x n_iter"),
        ("post", "/sdapi/v1/txt2img", {**SMALL, "prompt": "x" * 5000}, 422, "prompt: 5000 characters"),
        ("post", "/sdapi/v1/txt2img", {**SMALL, "sampler_name": "Euler z"}, 422, "allowed: "),
        ("post", "/sdapi/v1/txt2img", {**SMALL, "override_settings": {"sd_model_checkpoint": "nope"}}, 404, "nope"),
        ("post", "/sdapi/v1/img2img", {**SMALL, "init_images": ["%%%"]}, 422, "not valid base64"),
        (
            "post",
            "/sdapi/v1/img2img",
            {**SMALL, "init_images": [base64.b64encode(b"text").decode()]},
            422,
            "not a readable image",
        ),
        ("post", "/sdapi/v1/img2img", SMALL, 422, "init_images"),
        ("post", "/sdapi/v1/png-info", {"image": "***"}, 422, "not valid base64"),
        ("post", "/sdapi/v1/options", {"sd_model_checkpoint": "missing.safetensors"}, 404, "not found"),
        ("post", "/sdapi/v1/options", {"CLIP_stop_at_last_layers": 40}, 422, "CLIP_stop_at_last_layers"),
    ]
    for method, path, body, status, needle in cases:
        r = getattr(client, method)(path, json=body)
        assert r.status_code == status and needle in r.text, (path, body, r.status_code, r.text)
    r = client.post("/sdapi/v1/txt2img", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert client.post("/sdapi/v1/txt2img", json=SMALL).status_code == 200  # still serving


def test_img2img_and_inpainting(client):
    init = Image.new("RGB", (32, 32), (200, 40, 40))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    body = {**SMALL, "init_images": [b64_of(init)], "denoising_strength": 0.5, "seed": 3}
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["info"])["denoising_strength"] == 0.5
    masked = {**body, "mask": b64_of(mask)}
    r = client.post("/sdapi/v1/img2img", json=masked)  # the web UI's defaults: only-masked, fill
    assert r.status_code == 422 and "inpaint_full_res" in r.text and "inpainting_fill" in r.text
    r = client.post("/sdapi/v1/img2img", json={**masked, "inpaint_full_res": False, "inpainting_fill": 1})
    assert r.status_code == 200, r.text
    out = np.asarray(png(r.json()["images"][0])).astype(int)
    assert np.abs(out[0:2, 0:2] - [200, 40, 40]).max() <= 1  # beyond the mask and its blur: the original pixels


def test_discovery_models_options_and_png_info(client):
    for path in [
        "scripts",
        "loras",
        "embeddings",
        "upscalers",
        "sd-vae",
        "hypernetworks",
        "memory",
        "cmd-flags",
        "face-restorers",
        "prompt-styles",
        "schedulers",
        "script-info",
    ]:
        assert client.get(f"/sdapi/v1/{path}").status_code == 200, path
    names = {m["model_name"]: m for m in client.get("/sdapi/v1/sd-models").json()}
    assert {"tiny", "other"} <= set(names)
    assert names["tiny"]["title"] == f"tiny.safetensors [{names['tiny']['hash']}]" and len(names["tiny"]["hash"]) == 10
    samplers = {s["name"]: s for s in client.get("/sdapi/v1/samplers").json()}
    assert {"Euler a", "DPM++ 2M", "DDIM", "LCM"} <= set(samplers)
    assert set(samplers["DPM++ 2M"]["aliases"]) == {"dpmpp_2m", "dpmpp_2m_karras"}
    first = client.post("/sdapi/v1/txt2img", json={**SMALL, "seed": 1}).json()
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": names["other"]["title"]}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == names["other"]["title"]
    second = client.post("/sdapi/v1/txt2img", json={**SMALL, "seed": 1}).json()
    assert json.loads(second["info"])["sd_model_name"] == "other" and second["images"][0] != first["images"][0]
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny"}).status_code == 200
    info = client.post("/sdapi/v1/png-info", json={"image": first["images"][0]}).json()
    assert info["parameters"]["Seed"] == "1" and info["info"].startswith("a red circle") is False
    assert client.get("/docs").status_code == 200 and "/sdapi/v1/txt2img" in client.get("/openapi.json").text
    page = client.get("/")
    assert (
        page.status_code == 200
        and "text/html" in page.headers["content-type"]
        and "http" not in page.text.split("<script>")[0].replace("http-equiv", "")
    )


def test_progress_queue_position_and_interrupt(client):
    slow = {"prompt": "a", "width": 64, "height": 64, "steps": 150, "seed": 1, "force_task_id": "task(slow)"}
    quick = {**SMALL, "force_task_id": "task(quick)"}
    results = {}
    threads = [threading.Thread(target=lambda: results.update(slow=client.post("/sdapi/v1/txt2img", json=slow)))]
    threads[0].start()
    deadline = time.time() + 60
    while time.time() < deadline:
        p = client.get("/sdapi/v1/progress", params={"id_task": "task(slow)"}).json()
        if p["state"]["sampling_step"] > 0:
            break
        time.sleep(0.05)
    assert p["queue_position"] == 0 and 0 < p["progress"] < 1 and p["current_image"]
    assert png(p["current_image"]).size == (64, 64)
    threads.append(threading.Thread(target=lambda: results.update(quick=client.post("/sdapi/v1/txt2img", json=quick))))
    threads[1].start()
    while client.get("/sdapi/v1/progress", params={"id_task": "task(quick)"}).json()["queue_position"] != 1:
        time.sleep(0.02)
    assert client.post("/sdapi/v1/interrupt").status_code == 200
    for t in threads:
        t.join(120)
    assert results["slow"].status_code == 200 and results["slow"].json()["interrupted"] is True
    assert len(results["slow"].json()["images"]) == 1  # the last x0 prediction, as the web UI returns
    assert results["quick"].status_code == 200 and "interrupted" not in results["quick"].json()


def test_load_in_arrival_order_and_flat_memory(client):
    def rss_mb() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    worker = client.app.state.worker

    def burst(n: int, tag: str) -> list:
        responses = {}
        threads = []
        for i in range(n):
            body = {**SMALL, "seed": i, "force_task_id": f"task({tag}-{i})"}
            t = threading.Thread(
                target=lambda i=i, b=body: responses.update({i: client.post("/sdapi/v1/txt2img", json=b)})
            )
            t.start()
            threads.append(t)
            while worker.position(f"task({tag}-{i})") is None and f"task({tag}-{i})" not in worker.completed:
                time.sleep(0.005)  # queued before the next arrives: a fixed arrival order
        for t in threads:
            t.join(120)
        assert all(responses[i].status_code == 200 for i in range(n))
        done = [j for j in worker.completed if j.startswith(f"task({tag}-")]
        assert done == [f"task({tag}-{i})" for i in range(n)]  # all complete, in arrival order, none lost
        return [json.loads(responses[i].json()["info"])["seed"] for i in range(n)]

    assert burst(8, "warm") == list(range(8))
    before = rss_mb()
    for k in range(3):
        burst(8, f"load{k}")
    after = rss_mb()
    print(f"\nload: 24 requests after warm-up, RSS {before:.0f} MB -> {after:.0f} MB")
    assert after - before < 30, (before, after)


def test_credentials(models, tmp_path):
    config = ServeConfig(str(models / "tiny.safetensors"), outputs=str(tmp_path), api_auth="ann:secret", api_key="k3y")
    with TestClient(create_app(config), raise_server_exceptions=False) as c:
        for path in ["/", "/sdapi/v1/options", "/docs"]:
            r = c.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
        assert c.get("/sdapi/v1/options", auth=("ann", "wrong")).status_code == 401
        assert c.get("/sdapi/v1/options", auth=("ann", "secret")).status_code == 200
        assert c.get("/sdapi/v1/options", headers={"Authorization": "Bearer k3y"}).status_code == 200
        assert c.get("/sdapi/v1/options", headers={"X-API-Key": "k3y"}).status_code == 200
        assert c.get("/sdapi/v1/options", headers={"X-API-Key": "nope"}).status_code == 401


def test_serve_refuses_an_open_address_without_credentials(capsys):
    assert main(["serve", "--host", "0.0.0.0", "--model", "x.safetensors"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --host 0.0.0.0") and "--api-key" in err and "--insecure" in err


def test_controlnet_through_alwayson_scripts(models, tmp_path):
    from ldmkit.checkpoints.controlnet_files import save_controlnet
    from ldmkit.checkpoints.single_file import load_model
    from ldmkit.models.controlnet import ControlNet

    base = load_model(models / "tiny.safetensors")
    net = ControlNet.from_unet(base.unet, hint_block_channels=(8, 16))
    save_controlnet(net, tmp_path / "edges.safetensors")
    config = ServeConfig(
        str(models / "tiny.safetensors"),
        outputs=str(tmp_path / "out"),
        controlnets=[str(tmp_path / "edges.safetensors")],
    )
    hint = Image.new("RGB", (32, 32))
    hint.paste((255, 255, 255), (10, 4, 12, 28))
    unit = {
        "enabled": True,
        "image": b64_of(hint),
        "module": "canny",
        "model": "edges",
        "weight": 0.7,
        "guidance_start": 0.0,
        "guidance_end": 1.0,
        "control_mode": "Balanced",
    }
    with TestClient(create_app(config), raise_server_exceptions=False) as c:
        # ours, then the bundled model's own (offered with it: the bundled model is always on the list)
        assert c.get("/controlnet/model_list").json()["model_list"] == ["edges", "shapes-canny"]
        r = c.post("/sdapi/v1/txt2img", json={**SMALL, "alwayson_scripts": {"ControlNet": {"args": [unit]}}})
        assert r.status_code == 200, r.text
        assert 'ControlNet 0: "Module: canny, Model: edges, Weight: 0.7' in json.loads(r.json()["info"])["infotexts"][0]
        off = {"ControlNet": {"args": [{**unit, "enabled": False}]}}
        assert c.post("/sdapi/v1/txt2img", json={**SMALL, "alwayson_scripts": off}).status_code == 200
        for change, needle in [
            ({"control_mode": 1}, "My prompt is more important"),
            ({"model": "depth"}, "ControlNet model 'depth' not found; available: edges"),
            ({"module": "openpose"}, "control type 'openpose'"),
            ({"image": "@@"}, "not valid base64"),
        ]:
            bad = {"ControlNet": {"args": [{**unit, **change}]}}
            r = c.post("/sdapi/v1/txt2img", json={**SMALL, "alwayson_scripts": bad})
            assert r.status_code == 422 and needle in r.text, (change, r.text)


def test_loras_listed_and_used_from_prompts(models, tmp_path):
    from safetensors.torch import save_file

    from ldmkit.checkpoints.single_file import load_model

    unet = load_model(models / "tiny.safetensors").unet
    attn = unet.get_submodule("input_blocks.1.1.transformer_blocks.0.attn2.to_q")
    key = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_q"  # original-layout names, as old files have
    lora = {
        f"{key}.lora_down.weight": torch.randn(2, attn.in_features),
        f"{key}.lora_up.weight": torch.randn(attn.out_features, 2),
    }
    (tmp_path / "loras").mkdir()
    save_file(lora, str(tmp_path / "loras" / "style.safetensors"))
    config = ServeConfig(
        str(models / "tiny.safetensors"), outputs=str(tmp_path / "out"), lora_dir=str(tmp_path / "loras")
    )
    with TestClient(create_app(config), raise_server_exceptions=False) as c:
        assert [x["name"] for x in c.get("/sdapi/v1/loras").json()] == ["style"]
        plain = c.post("/sdapi/v1/txt2img", json={**SMALL, "seed": 2, "prompt": "x "}).json()
        tagged = c.post("/sdapi/v1/txt2img", json={**SMALL, "seed": 2, "prompt": "x <lora:style:0.5>"}).json()
        assert 'Lora hashes: "style: ' in json.loads(tagged["info"])["infotexts"][0]
        assert tagged["images"][0] != plain["images"][0]
        r = c.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "x <lora:nope>"})
        assert r.status_code == 422 and "unknown LoRA 'nope'" in r.text and "available: style" in r.text


def test_a_model_that_fails_to_load_is_a_4xx_and_the_server_recovers(models, tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "broken.safetensors").write_bytes(b"not a checkpoint")
    config = ServeConfig(str(models / "tiny.safetensors"), str(tmp_path / "models"), outputs=str(tmp_path / "out"))
    with TestClient(create_app(config), raise_server_exceptions=False) as c:
        r = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "broken"})
        assert r.status_code == 422 and "broken.safetensors" in r.text
        r = c.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"sd_model_checkpoint": "tiny"}})
        assert r.status_code == 200, r.text
