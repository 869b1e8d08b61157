"""Generation parameters have one owner (pipelines/params.py): every field reaches the CLI, the Python
API and the HTTP API (or is listed as deliberately not), an infotext reads back into the parameters
that wrote it, and the same seed through all three interfaces gives byte-identical PNGs."""

import base64
import io
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ldmkit.cli import build_parser, main
from ldmkit.cli.generate import _params
from ldmkit.errors import ConfigError
from ldmkit.pipelines import GenerationParams, Pipeline
from ldmkit.pipelines.params import (
    INFOTEXT_FIELDS,
    MICRO_PAIRS,
    NOT_IN_INFOTEXT,
    PARAM_NAMES,
    RunFacts,
    from_infotext,
    to_infotext,
)
from ldmkit.server.app import Limits, ServeConfig, create_app
from ldmkit.server.decoding import DEFAULTS as DECODING_DEFAULTS
from ldmkit.server.generation import FROM_REQUEST, HIRES_FROM_REQUEST, NOT_FROM_REQUEST, decode_uploads, resolve
from ldmkit.server.webui import Img2ImgRequest, Txt2ImgRequest

IMAGE = Image.new("RGB", (48, 40), (200, 30, 30))
MASK = Image.new("L", (48, 40), 255)
# One value per field, none of them the default: a field added to GenerationParams without a value
# here fails test_every_field_has_a_probe, and one an interface drops fails the test of that interface.
PROBE = {
    "prompt": "a red circle",
    "negative_prompt": "blue",
    "steps": 3,
    "cfg": 4.5,
    "sampler": "euler",
    "seed": 11,
    "width": 40,
    "height": 48,
    "batch": 2,
    "clip_skip": 2,
    "init_image": IMAGE,
    "strength": 0.5,
    "mask": MASK,
    "mask_blur": 2.0,
    "inpaint_blend": "noised",
    "eta": 0.25,
    "guidance_rescale": 0.7,
    "prompt_mode": "truncate",
    "timestep_spacing": "trailing",
    "loras": ((Path("style.safetensors"), 0.5),),
    "control": "set once a model is loaded",  # ControlInputs hold a loaded ControlNet: checked apart
    "image_prompts": "set once read",  # ImagePromptInputs hold a loaded adapter: tests/test_ip_adapter_use.py
    "feature_cache": 2,
    "hires_scale": 1.5,
    "hires_width": 96,
    "hires_height": 64,
    "hires_upscaler": "Lanczos",
    "hires_steps": 4,
    "hires_sampler": "heun",
    "hires_prompt": "a blue square, above: a star",  # a comma and a colon: quoted in the infotext
    "hires_negative_prompt": "green",
    "original_size": (80, 96),
    "crops_coords_top_left": (8, 16),
    "target_size": (40, 48),
    "negative_original_size": (64, 64),
    "negative_crops_coords_top_left": (0, 8),
    "negative_target_size": (48, 40),
    "aesthetic_score": 7.5,
    "negative_aesthetic_score": 1.5,
    "refiner_switch_at": 0.6,
}
# Values given on the command line in their own form
CLI_TEXT = {name: f"{v[0]},{v[1]}" for name, v in PROBE.items() if name in MICRO_PAIRS}
# A run is text-to-image with a hires pass, or starts from an image: the probes go in as two runs
HIRES = {name for name in PROBE if name.startswith("hires_")}
IMAGES = {"init_image", "mask"}


def probe_without(*left_out: set) -> dict:
    gone = set().union(*left_out)
    return {k: v for k, v in PROBE.items() if k not in gone}


def same(field: str, got, want) -> bool:
    if isinstance(want, Image.Image):
        return isinstance(got, Image.Image) and got.tobytes() == want.convert(got.mode).tobytes()
    return got == want


def test_every_field_has_a_probe():
    assert set(PROBE) == set(PARAM_NAMES)
    assert all(PROBE[f.name] != f.default for f in fields(GenerationParams))


FLAGS = {"hires_scale": "--hires"}  # fields whose option is not --FIELD-NAME


@pytest.mark.parametrize("left_out", [HIRES, IMAGES], ids=["image", "hires"])
def test_every_field_reaches_the_cli(tmp_path, left_out):
    IMAGE.save(tmp_path / "init.png")
    MASK.save(tmp_path / "mask.png")
    argv = ["generate", PROBE["prompt"]]
    if left_out is HIRES:
        argv += ["--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png")]
    argv += ["--lora", "style.safetensors:0.5", "--control", f"canny:{tmp_path / 'init.png'}"]
    probe = probe_without(left_out)
    for name in probe:
        if name not in ("prompt", "init_image", "mask", "loras", "control", "image_prompts"):
            argv += [FLAGS.get(name, "--" + name.replace("_", "-")), CLI_TEXT.get(name, str(PROBE[name]))]
    args = build_parser().parse_args(argv)
    dests = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["generate"]._actions}
    assert dests >= set(PARAM_NAMES) - {"image_prompts"}  # that one from --ip-adapter and --ip-image
    assert {"ip_adapter", "ip_image"} <= dests
    params = _params(args)
    for name in probe:
        if name not in ("control", "image_prompts"):
            assert same(name, getattr(params, name), PROBE[name]), name
    assert args.control == [f"canny:{tmp_path / 'init.png'}"]  # made ControlInputs once the model is loaded


def test_every_field_reaches_the_http_api():
    b64 = {}
    for key, image in (("init", IMAGE), ("mask", MASK)):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        b64[key] = base64.b64encode(buf.getvalue()).decode()
    body = {attr: PROBE[field] for field, (attr, _) in FROM_REQUEST.items()}
    body.update(
        seed=PROBE["seed"], sampler_name="Euler", init_images=[b64["init"]], mask=b64["mask"], inpainting_fill=1
    )
    body.update(inpaint_full_res=False, override_settings={"CLIP_stop_at_last_layers": PROBE["clip_skip"]})
    server = SimpleNamespace(
        config=SimpleNamespace(limits=Limits(), tiny_decoder=None),
        options={"sd_model_checkpoint": "m", "CLIP_stop_at_last_layers": 1, **DECODING_DEFAULTS},
        models=SimpleNamespace(find=lambda wanted: wanted),
    )
    req = Img2ImgRequest(**body)
    params = decode_uploads(req, resolve(req, server), Limits().max_input_pixels)  # the images: on the worker
    reached = set(FROM_REQUEST) | {"sampler", "clip_skip", "init_image", "mask", "seed"}
    for name in reached:
        assert same(name, getattr(params, name), PROBE[name]), name
    hires = {attr: PROBE[field] for field, (attr, _) in HIRES_FROM_REQUEST.items()}
    req = Txt2ImgRequest(prompt="x", enable_hr=True, hr_sampler_name="Heun", **hires)
    params = resolve(req, server).params
    for name in (*HIRES_FROM_REQUEST, "hires_sampler"):
        assert same(name, getattr(params, name), PROBE[name]), name
    reached |= {*HIRES_FROM_REQUEST, "hires_sampler"}
    req = Txt2ImgRequest(prompt="x", refiner_checkpoint="refiner", refiner_switch_at=PROBE["refiner_switch_at"])
    plan = resolve(req, server)  # the web UI's refiner fields
    assert (plan.refiner, plan.params.refiner_switch_at) == ("refiner", PROBE["refiner_switch_at"])
    reached.add("refiner_switch_at")
    # ControlNet units (alwayson_scripts) become ControlInputs on the worker, once the model is loaded:
    # tests/test_controlnet.py sends them. LoRAs come from prompt tags only.
    assert set(PARAM_NAMES) - reached == {"control", "image_prompts"} | set(NOT_FROM_REQUEST)


def test_every_field_reaches_the_python_api(monkeypatch):
    pipe = Pipeline.load(None)
    seen = {}

    def capture(p, walk, callback):
        seen["params"] = p
        raise KeyboardInterrupt  # stop before any work: only the parameters are under test

    monkeypatch.setattr(pipe, "_use_loras", lambda p: None)
    monkeypatch.setattr(pipe, "_split", lambda p, walk: (walk, None))  # the refiner's checks: tested apart
    monkeypatch.setattr(pipe, "_generate", capture)
    monkeypatch.setattr("ldmkit.pipelines.params.check_clip_skip", lambda config, clip_skip: None)
    monkeypatch.setattr("ldmkit.pipelines.params.check_micro_conditioning", lambda config, p: None)  # SDXL's
    for left_out in (HIRES, IMAGES):
        probe = probe_without(left_out, {"control", "image_prompts"})
        with pytest.raises(KeyboardInterrupt):
            pipe(**probe)
        for name, value in probe.items():
            assert same(name, getattr(seen["params"], name), value), name


def test_infotext_reads_back_what_it_wrote():
    for left_out in (HIRES, IMAGES):
        kept = probe_without(left_out, {"control", "image_prompts", "loras", "batch"})
        params = GenerationParams(**{**kept, "sampler": "ddim"})  # DDIM: its eta is written too
        text = to_infotext(params, 0, RunFacts("model"), "ldmkit test")
        read, ours = from_infotext(text)
        assert ours
        for entry, name, _ in INFOTEXT_FIELDS:
            if (
                name in ("mask_blur", "inpaint_blend")
                and params.mask is None
                or name.startswith("hires_")
                and not params.hires
            ):
                continue  # written only for a mask, for a hires pass
            if name == "hires_scale" and (params.hires_width or params.hires_height):
                continue  # a hires size is written instead of a scale
            assert read[name] == getattr(params, name), entry
        if params.hires:
            assert (read["hires_width"], read["hires_height"], read["hires_sampler"]) == (96, 64, "heun")
    carried = {name for _, name, _ in INFOTEXT_FIELDS} | {"sampler", "prompt", "negative_prompt", "width", "height"}
    assert set(PARAM_NAMES) - carried <= NOT_IN_INFOTEXT


def test_checks_run_when_the_parameters_are_built():
    for bad, needle in [
        ({"steps": 0}, "steps"),
        ({"sampler": "nope"}, "nope"),
        ({"batch": 65}, "batch"),
        ({"prompt_mode": "loud"}, "prompt mode"),
        ({"feature_cache": 0}, "feature cache"),
        ({"mask": MASK}, "needs an init image"),
        ({"init_image": IMAGE, "strength": 1.5}, "strength"),
        ({"prompt": ["a", "b"], "batch": 3}, "batch 3 with 2 prompts"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            GenerationParams(prompt="x", **bad) if "prompt" not in bad else GenerationParams(**bad)


def test_the_same_seed_through_cli_python_and_http_gives_the_same_png(tmp_path):
    """Byte-identical PNG files (pixels and parameters text) from the three interfaces."""
    model = tmp_path / "tiny.safetensors"
    assert main(["init-model", str(model), "--seed", "0"]) == 0
    settings = dict(prompt="a (red:1.2) circle", negative_prompt="blue", steps=3, cfg=4.0, sampler="euler", seed=7)
    settings.update(width=32, height=48, guidance_rescale=0.5, timestep_spacing="trailing")
    argv = ["generate", settings["prompt"], "--model", str(model), "-o", str(tmp_path / "cli.png"), "-q"]
    for name, value in settings.items():
        if name != "prompt":
            argv += ["--" + name.replace("_", "-"), str(value)]
    assert main(argv) == 0

    from ldmkit.images import write_png

    result = Pipeline.load(model)(**settings)
    write_png(tmp_path / "python.png", result.images[0], result.infotexts[0])

    body = {attr: settings[field] for field, (attr, _) in FROM_REQUEST.items() if field in settings}
    body["sampler_name"] = "Euler"
    app = create_app(ServeConfig(str(model), outputs=str(tmp_path / "outputs")))
    app.state.ready.result()
    with TestClient(app) as client:
        answer = client.post("/sdapi/v1/txt2img", json={**body, "seed": settings["seed"]})
    assert answer.status_code == 200, answer.text
    (saved,) = (tmp_path / "outputs").glob("txt2img-images/*/*.png")

    cli, python, http = (tmp_path / "cli.png").read_bytes(), (tmp_path / "python.png").read_bytes(), saved.read_bytes()
    assert cli == python == http
    sent = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
    assert sent.info["parameters"] == result.infotexts[0] == Image.open(saved).info["parameters"]
    assert sent.tobytes() == result.images[0].tobytes()
