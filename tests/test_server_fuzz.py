"""`ldmkit serve` under schema-driven fuzzing: Schemathesis reads the server's own OpenAPI document and
sends generated requests to every operation (its coverage phase: boundary values, wrong types, missing
and extra fields, unexpected methods; its fuzzing phase: random valid and invalid bodies and query
strings). Every answer must be a status the document lists, with the documented content type and body
-- errors as `{"error": kind, "detail": one line}` -- and never a 5xx. Generation requests are steered
towards the tiny sizes the limits allow (32x32, 1-2 steps) and uploads towards real, oversized and
hostile images, so the requests reach the worker and the decoders, not only the validators.

The run is derandomized (the same requests every time) and bounded in examples per operation: the
default suite sends about a thousand requests, the slow test many more. Each prints the number of
requests sent and the status classes seen (`python -m pytest tests/test_server_fuzz.py -s`).

Schemathesis runs here through its engine (what `schemathesis run` drives), not its pytest plugin: the
app is built from a fixture, and the plugin's fixture-based loader does not run under pytest 9."""

import asyncio
import base64
import io
import struct
import time
import zlib
from collections import Counter

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import strategies as st
from PIL import Image
from schemathesis.engine import events

from ldmkit.cli import main
from ldmkit.server.app import Limits, ServeConfig, create_app

GENERATION = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")


def declared_png(width: int, height: int) -> bytes:
    """A small PNG whose header declares width x height RGBA pixels (its pixel data cut short)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 4096))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + chunk(b"IEND", b"")


def png_b64(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def image_pool() -> list[str]:
    """Uploads a client might send: valid small images, and every kind the server must refuse with a 4xx."""
    small = Image.new("RGB", (32, 32), (200, 40, 40))
    good = png_b64(small)
    return [
        good,
        "data:image/png;base64," + good,
        png_b64(Image.new("L", (32, 32), 128)),  # a mask
        png_b64(Image.new("RGBA", (24, 40), (0, 0, 255, 128))),  # another aspect ratio
        png_b64(small, "JPEG"),
        png_b64(Image.new("RGB", (128, 128))),  # over max_input_pixels
        base64.b64encode(declared_png(13000, 13000)).decode(),  # a decompression bomb's header
        base64.b64encode(declared_png(0, 0)).decode(),
        base64.b64encode(declared_png(32, 32)).decode(),  # a valid header, the pixel data cut short
        base64.b64encode(b"\x89PNG\r\n\x1a\n").decode(),  # a signature and nothing else
        good[: len(good) // 2],  # truncated base64
        base64.b64encode(b"GIF89a" + b"\0" * 20).decode(),
        "%%%",
        "",
    ]


def generation_fields(titles: list[str]) -> dict:
    """Optional fields drawn for a generation request: sizes and counts inside the limits (and just
    outside), the web UI's samplers, overrides, prompts with tags, ControlNet units, uploads."""
    images = st.sampled_from(image_pool())
    unit = st.fixed_dictionaries(
        {"enabled": st.booleans(), "image": images},
        optional={
            "module": st.sampled_from(["none", "canny", "depth", "openpose", "scribble"]),
            "model": st.sampled_from(["edges", "shapes-canny", "", "nope"]),
            "weight": st.sampled_from([0.5, 1, "x", None, True, 1e308]),
            "guidance_start": st.sampled_from([0, 0.5, "a"]),
            "control_mode": st.sampled_from([0, 1, 2, "Balanced", "My prompt is more important"]),
            "resize_mode": st.sampled_from([0, 1, "Just Resize", "Crop and Resize"]),
        },
    )
    return {
        "width": st.sampled_from([8, 16, 32, 64, 24, 33, 0, -8, 128]),
        "height": st.sampled_from([8, 16, 32, 64, 40, 7, 0, 4096]),
        "steps": st.sampled_from([1, 2, 0, 3, -1]),
        "batch_size": st.sampled_from([1, 2, 3, 0]),
        "n_iter": st.sampled_from([1, 2, 0]),
        "cfg_scale": st.sampled_from([1.0, 5.0, 0.0, -3.0, 1e308]),
        "seed": st.sampled_from([-1, 0, 7, 2**32 - 1, 2**63]),
        "sampler_name": st.sampled_from(["Euler a", "DPM++ 2M", "DDIM", "LCM", "Euler z", "", None]),
        "scheduler": st.sampled_from(["Automatic", "karras", "uniform", "exponential", "nope", None]),
        "prompt": st.sampled_from(["a red circle", "a BREAK b BREAK c", "x <lora:nope:1>", "(((a:1.5)", "\0\ud7ff"]),
        "denoising_strength": st.sampled_from([0.0, 0.5, 1.0, 1.5, -1.0]),
        "eta": st.sampled_from([0.0, 1.0, -1.0]),
        "guidance_rescale": st.sampled_from([0.0, 0.7, 2.0]),
        "prompt_mode": st.sampled_from(["chunks", "truncate", "nope"]),
        "timestep_spacing": st.sampled_from(["leading", "trailing", "linspace", "nope"]),
        "feature_cache": st.sampled_from([0, 1, 2, -1]),
        "override_settings": st.fixed_dictionaries(
            {},
            optional={
                "sd_model_checkpoint": st.sampled_from([*titles, "other", "nope", 3]),
                "CLIP_stop_at_last_layers": st.sampled_from([1, 2, 0, 13, "2", True]),
                "sd_vae": st.sampled_from(["Automatic", "vae.pt"]),
            },
        ),
        "alwayson_scripts": st.one_of(
            st.just({}),
            st.builds(lambda units: {"ControlNet": {"args": units}}, st.lists(unit, max_size=2)),
            st.just({"ControlNet": {"args": "x"}}),
            st.just({"ADetailer": {"args": [True]}}),
        ),
        # the hires fix (txt2img's): its second pass is bounded by the same limits
        "enable_hr": st.booleans(),
        "hr_scale": st.sampled_from([1, 1.5, 2, 4, 0, -1, 1e308]),
        "hr_resize_x": st.sampled_from([0, 48, 64, 128, 4096, -8]),
        "hr_resize_y": st.sampled_from([0, 40, 64, 4096]),
        "hr_second_pass_steps": st.sampled_from([0, 1, 2, 3, -1]),
        "hr_upscaler": st.sampled_from([None, "Latent", "None", "Lanczos", "nope"]),
        "hr_sampler_name": st.sampled_from([None, "Use same sampler", "Euler a", "nope"]),
        "send_images": st.booleans(),
        "do_not_save_samples": st.booleans(),
        # img2img's; txt2img keeps them as unknown extra fields
        "init_images": st.lists(images, max_size=2),
        "mask": st.one_of(st.none(), images),
        "inpaint_full_res": st.booleans(),
        "inpainting_fill": st.sampled_from([0, 1, 2]),
        "inpainting_mask_invert": st.sampled_from([0, 1]),
        "resize_mode": st.sampled_from([0, 1]),
        "mask_blur": st.sampled_from([0, 4, -4]),
    }


def steer(titles: list[str]):
    """The flatmap_body hook: most generated bodies are kept as they are; some are given fields from the
    pools above, so that some requests pass validation and run on the worker at tiny sizes."""
    pool = image_pool()
    fields = generation_fields(titles)
    tiny = {"width": st.just(32), "height": st.just(32), "steps": st.sampled_from([1, 2])}
    options = st.fixed_dictionaries(
        {},
        optional={
            "sd_model_checkpoint": st.sampled_from([*titles, "tiny", "other", "nope", 1]),
            "CLIP_stop_at_last_layers": st.sampled_from([1, 2, 12, 0, "1", None]),
            "sd_vae": st.sampled_from(["Automatic", "None", "x"]),
            "samples_format": st.sampled_from(["png", "jpg"]),
            "outdir_samples": st.sampled_from(["/tmp", ""]),
            "unknown_setting": st.just(1),
        },
    )

    valid = st.fixed_dictionaries(
        {
            **tiny,
            "prompt": st.sampled_from(["a red circle", "a (blue:1.2) square BREAK on white"]),
            "seed": st.integers(-1, 2**32 - 1),
            "init_images": st.sampled_from(pool[:5]).map(lambda image: [image]),
        },
        optional={
            "batch_size": st.sampled_from([1, 2]),
            "sampler_name": st.sampled_from(["Euler a", "DPM++ 2M", "DDIM", "LCM"]),
            "denoising_strength": st.sampled_from([0.3, 0.75, 1.0]),
            "override_settings": st.sampled_from([{"sd_model_checkpoint": t} for t in titles]),
        },
    )

    def flatmap_body(context, body):
        path = context.operation.path
        if path in GENERATION and isinstance(body, dict):
            chosen = st.fixed_dictionaries({}, optional=fields)
            small = st.fixed_dictionaries(tiny, optional={k: v for k, v in fields.items() if k not in tiny})
            return st.one_of(
                st.just(body),
                chosen.map(lambda extra: {**body, **extra}),
                small.map(lambda extra: {**body, **extra}),
                valid,  # a request a client would send, at a size the limits allow
            )
        if path == "/sdapi/v1/png-info" and isinstance(body, dict):
            return st.one_of(st.just(body), st.sampled_from(pool).map(lambda image: {**body, "image": image}))
        if path == "/sdapi/v1/options" and isinstance(body, dict):
            return st.one_of(st.just(body), options)
        return st.just(body)

    return flatmap_body


def examples(titles: list[str]):
    """The before_add_examples hook: requests a client would send, sent as the run's first cases, so that
    every run makes images through both generation routes, switches models, and decodes uploads."""
    pool = image_pool()
    tiny = {"prompt": "a red circle", "width": 32, "height": 32, "steps": 1, "seed": 3}
    bodies = {
        "/sdapi/v1/txt2img": [
            tiny,
            {**tiny, "steps": 2, "batch_size": 2, "sampler_name": "Euler a"},
            {**tiny, "n_iter": 2, "sampler_name": "DPM++ 2M", "scheduler": "karras", "prompt": "a BREAK b"},
            {**tiny, "override_settings": {"sd_model_checkpoint": titles[-1], "CLIP_stop_at_last_layers": 2}},
            {**tiny, "enable_hr": True, "hr_scale": 2, "hr_second_pass_steps": 1, "denoising_strength": 0.5},
            {**tiny, "enable_hr": True, "hr_resize_x": 128, "hr_resize_y": 128},  # over max_pixels: 422
        ],
        "/sdapi/v1/img2img": [
            {**tiny, "init_images": [pool[0]], "denoising_strength": 0.5},
            {**tiny, "init_images": [pool[1]], "mask": pool[2], "inpaint_full_res": False, "inpainting_fill": 1},
            {**tiny, "init_images": [pool[3]], "sampler_name": "DDIM", "steps": 2},
            {**tiny, "init_images": [pool[4]], "inpainting_mask_invert": 1},
            {**tiny, "init_images": [pool[6]]},  # a 13000x13000 header: refused before decoding
        ],
        "/sdapi/v1/png-info": [{"image": image} for image in pool],
        "/sdapi/v1/options": [{"sd_model_checkpoint": t} for t in reversed(titles)] + [{"CLIP_stop_at_last_layers": 1}],
    }

    def before_add_examples(context, cases):
        for body in bodies.get(context.operation.path, []):
            cases.append(context.operation.Case(body=body, media_type="application/json"))

    return before_add_examples


CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance", "response_schema_conformance")


def error_shape(response) -> str | None:
    """What is wrong with an error answer's shape, or None: every 4xx/5xx is {"error": kind, "detail":
    one line}, and a 503 says when to come back."""
    if response.status_code < 400:
        return None
    try:
        body = response.json()
    except ValueError:
        return f"not JSON: {response.text[:200]!r}"
    if not isinstance(body, dict) or set(body) != {"error", "detail"}:
        return f"not {{error, detail}}: {body!r}"[:300]
    if not (isinstance(body["error"], str) and body["error"]) or not isinstance(body["detail"], str):
        return f"error/detail not strings: {body!r}"[:300]
    if "\n" in body["detail"]:
        return f"detail of more than one line: {body['detail'][:200]!r}"
    if response.status_code == 503 and not response.headers.get("retry-after"):
        return "503 without Retry-After"
    return None


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-models")
    assert main(["init-model", str(folder / "tiny.safetensors"), "--seed", "0"]) == 0
    assert main(["init-model", str(folder / "other.safetensors"), "--seed", "1"]) == 0
    return folder


def fuzz(models, outputs, max_examples: int) -> dict:
    """One derandomized Schemathesis run against a fresh app; what it sent, what came back, what failed."""
    limits = Limits(
        max_pixels=64 * 64, max_steps=2, max_images=2, max_input_pixels=64 * 64, max_prompt_chars=200, max_queue=4
    )
    app = create_app(ServeConfig(str(models / "tiny.safetensors"), str(models), outputs=str(outputs), limits=limits))
    app.state.ready.result()
    config = schemathesis.Config.from_dict(
        {
            "generation": {"max-examples": max_examples, "deterministic": True, "database": "none"},
            "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
            "phases": {"stateful": {"enabled": False}},
            # the in-process client cancels a request it times out: what a cancelled request does is
            # tested apart (test_a_request_cancelled_while_queued_leaves_the_worker_running)
            "request-timeout": 600,
        }
    )
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    schema.hook(steer(app.state.models.titles()))
    schema.hook(examples(app.state.models.titles()))
    seen = {"status": Counter(), "operations": Counter(), "images": Counter(), "shape": [], "failures": []}
    seen["slowest"] = (0.0, "")
    seen["documented"] = {f"{m.upper()} {p}" for p, ms in app.openapi()["paths"].items() for m in ms}

    defaults = dict(app.state.options)

    def after_call(context, case, response):
        if case.method == "POST" and case.path == "/sdapi/v1/options":
            # each request starts from the default options: a CLIP skip the loaded model cannot take, set
            # once, would make every later generation a 422 and end the run's reach into the worker
            app.state.options.update(defaults)
        seen["status"][response.status_code] += 1
        seen["operations"][f"{case.method} {case.path}"] += 1
        seen["slowest"] = max(seen["slowest"], (response.elapsed, f"{case.method} {case.path}"))
        if response.status_code == 200 and case.path in GENERATION and response.json().get("images"):
            seen["images"][case.path] += 1
        problem = error_shape(response)
        if problem:
            seen["shape"].append(f"{case.method} {case.path} -> {response.status_code}: {problem}")

    schema.hook(after_call)
    start = time.perf_counter()
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            for checks in event.recorder.checks.values():
                for check in checks:
                    if check.status == "failure" and check.failure_info is not None:
                        info = check.failure_info
                        seen["failures"].append(f"{check.name}: {info.failure.title}\n{info.code_sample}")
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            seen["failures"].append(f"{type(event).__name__}: {event}")
    seen["seconds"] = time.perf_counter() - start
    try:  # the worker still runs jobs
        seen["worker_alive"] = app.state.worker.submit("probe", lambda w: True).future.result(timeout=120)
    except Exception as e:  # BusyError, or a timeout: no worker left
        seen["worker_alive"] = False
        seen["failures"].append(f"the worker runs no more jobs: {e!r}")
    seen["requests"] = sum(seen["status"].values())
    classes = Counter(f"{s // 100}xx" for s in seen["status"].elements())
    print(
        f"\nfuzz ({max_examples} examples per operation): {seen['requests']} requests in {seen['seconds']:.0f} s; "
        f"status classes {dict(sorted(classes.items()))}; statuses {dict(sorted(seen['status'].items()))}; "
        f"operations {len(seen['operations'])}; requests that made images {dict(seen['images'])}; "
        f"slowest answer {seen['slowest'][0]:.2f} s ({seen['slowest'][1]})"
    )
    return seen


def assert_clean(seen: dict, operations: int) -> None:
    assert seen["worker_alive"], seen["failures"][-1]
    assert not seen["failures"], "\n\n".join(seen["failures"][:10])
    assert not seen["shape"], "\n".join(seen["shape"][:10])
    assert not [s for s in seen["status"] if s >= 500]
    assert len(seen["documented"]) == operations and seen["documented"] <= set(seen["operations"])  # every one
    assert seen["images"]["/sdapi/v1/txt2img"] > 0 and seen["images"]["/sdapi/v1/img2img"] > 0  # reached the worker


def test_every_operation_answers_as_documented(models, tmp_path):
    seen = fuzz(models, tmp_path, max_examples=20)
    assert_clean(seen, operations=28)
    assert seen["requests"] > 500


@pytest.mark.slow
def test_every_operation_answers_as_documented_long(models, tmp_path):
    seen = fuzz(models, tmp_path, max_examples=1500)
    assert_clean(seen, operations=28)


# What the fuzzing found, pinned as reproducers: each failed before the server was fixed.


@pytest.fixture(scope="module")
def client(models, tmp_path_factory):
    config = ServeConfig(str(models / "tiny.safetensors"), outputs=str(tmp_path_factory.mktemp("pinned")))
    config.limits = Limits(max_pixels=64 * 64, max_steps=2)
    app = create_app(config)
    app.state.ready.result()
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


SMALL = {"prompt": "a", "width": 32, "height": 32, "steps": 1, "seed": 1}


def test_an_error_detail_is_one_line_whatever_the_names_sent(client):
    for extra in ({"override_settings": {"a\nb": 1}}, {"alwayson_scripts": {"x\ny": {"args": [True]}}}):
        r = client.post("/sdapi/v1/txt2img", json={**SMALL, **extra})
        assert r.status_code == 422 and "\n" not in r.json()["detail"], r.json()


def test_non_finite_guidance_rescale_and_eta_are_refused(client):
    for field in ("guidance_rescale", "eta"):  # 1e400: a JSON number, read as infinity
        body = '{"prompt": "a", "width": 32, "height": 32, "steps": 1, "sampler_name": "DDIM", "%s": 1e400}' % field
        r = client.post("/sdapi/v1/txt2img", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422, (field, r.status_code)


def test_a_request_cancelled_while_queued_leaves_the_worker_running(models, tmp_path):
    app = create_app(ServeConfig(str(models / "tiny.safetensors"), outputs=str(tmp_path), limits=Limits()))
    app.state.ready.result()

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=None) as client:
            running = asyncio.create_task(
                client.post("/sdapi/v1/txt2img", json={**SMALL, "width": 64, "height": 64, "steps": 20})
            )
            await asyncio.sleep(0.3)
            queued = asyncio.create_task(client.post("/sdapi/v1/txt2img", json=SMALL))
            await asyncio.sleep(0.3)
            queued.cancel()  # the client gives up on it while it waits in the queue
            assert (await running).status_code == 200

    asyncio.run(scenario())
    assert app.state.worker.submit("probe", lambda w: True).future.result(timeout=5)  # TimeoutError: no worker
