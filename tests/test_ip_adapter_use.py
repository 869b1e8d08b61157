"""Image prompts in use: several adapters and several images at once against diffusers, the start/end
range, the command line, `inspect` and `models`, a single-file image tower, and bad input refused in one
line (an adapter for another family, a tower of the wrong width, FaceID files, pickled code, unreadable
images)."""

import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image
from test_ip_adapter import draw_adapter, make_adapter, prompt_image, save_adapter, write_tower

from conftest import tiny_pipeline
from ldmkit.checkpoints.image_encoder_files import load_image_encoder
from ldmkit.checkpoints.ip_adapter_files import read_ip_adapter
from ldmkit.cli import main
from ldmkit.diffusion.sampling import generators_for
from ldmkit.errors import CheckpointError, ConfigError
from ldmkit.models.ip_adapter import IPAdapter, IPAdapterConfig, cross_attentions
from ldmkit.pipelines import Pipeline
from ldmkit.pipelines.image_prompt import ImagePromptInput

PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny SD pipeline folder, a tower in adapters/image_encoder, a base and a plus adapter beside it."""
    root = tmp_path_factory.mktemp("ip")
    pipe = tiny_pipeline(root / "pipe")
    ours = Pipeline.load(root / "pipe", precision="fp32")
    spec = draw_adapter(random.Random(0), "base")
    encoder = write_tower(spec, root / "adapters" / "image_encoder", 5)
    paths = {}
    for i, kind in enumerate(("base", "plus")):
        a = draw_adapter(random.Random(i), kind)
        paths[kind] = root / "adapters" / f"ip-adapter-{kind}.safetensors"
        save_adapter(make_adapter(a, ours.model.unet, encoder, 10 + i), paths[kind])
    return root, pipe, ours, encoder, paths


def images_close(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


def test_two_adapters_and_two_images_equal_diffusers(setup):
    root, pipe, ours, encoder, paths = setup
    base, plus = read_ip_adapter(paths["base"]).adapter, read_ip_adapter(paths["plus"]).adapter
    first, second, third = prompt_image(1), prompt_image(2), prompt_image(3)
    pipe.load_ip_adapter(
        [str(root / "adapters")] * 2,
        subfolder=["", ""],
        weight_name=[paths["base"].name, paths["plus"].name],
        image_encoder_folder="image_encoder",
    )
    pipe.set_ip_adapter_scale([0.7, 0.4])
    inputs = [ImagePromptInput(base, encoder, [first, second], 0.7), ImagePromptInput(plus, encoder, [third], 0.4)]
    image = ours(PROMPT, image_prompts=inputs, steps=4, cfg=5.0, sampler="ddim", seed=3, width=48, height=40).images[0]
    from diffusers import DDIMScheduler

    saved = json.loads((root / "pipe" / "scheduler" / "scheduler_config.json").read_text())  # as the folder says
    pipe.scheduler = DDIMScheduler.from_config(saved, timestep_spacing="leading")
    ref = pipe(
        PROMPT,
        ip_adapter_image=[[first, second], third],
        num_inference_steps=4,
        guidance_scale=5.0,
        width=48,
        height=40,
        generator=generators_for(3, 1),
    ).images[0]
    pipe.unload_ip_adapter()
    assert images_close(image, ref) <= 1.0
    one = ours(PROMPT, image_prompts=inputs[:1], steps=4, cfg=5.0, sampler="ddim", seed=3, width=48, height=40)
    assert not np.array_equal(np.asarray(one.images[0]), np.asarray(image)), "the second adapter changes nothing"


def test_the_step_range(setup):
    """Out of its range an adapter adds nothing: a range no step lies in gives the image without it."""
    _, _, ours, encoder, paths = setup
    adapter = read_ip_adapter(paths["base"]).adapter
    kw = dict(steps=4, cfg=5.0, sampler="euler", seed=1, width=32, height=32)
    plain = ours(PROMPT, **kw).images[0]

    def run(start, end):
        ip = ImagePromptInput(adapter, encoder, [prompt_image(1)], 1.0, start, end)
        return ours(PROMPT, image_prompts=[ip], **kw)

    whole, none, half = run(0.0, 1.0), run(0.9, 1.0), run(0.0, 0.5)
    assert np.array_equal(np.asarray(none.images[0]), np.asarray(plain))
    assert not np.array_equal(np.asarray(whole.images[0]), np.asarray(plain))
    assert len({np.asarray(x).tobytes() for x in (whole.images[0], half.images[0], plain)}) == 3
    assert "IP-Adapter 0: " in whole.infotexts[0] and "Start: 0, End: 0.5" in half.infotexts[0]
    assert all(not attn.image_prompts for *_, attn in cross_attentions(ours.model.unet)), "left attached"


def test_the_command_line(setup, tmp_path, capsys):
    root, _, _, _, paths = setup
    prompt_image(4).save(tmp_path / "prompt.png")
    out = tmp_path / "out.png"
    argv = ["generate", PROMPT, "--model", root / "pipe", "--steps", 2, "--seed", 1, "--width", 32, "--height", 32]
    argv += ["--ip-adapter", f"{paths['plus']}:0.8", "--ip-image", tmp_path / "prompt.png", "-o", out, "--quiet"]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["written"] == [str(out)]
    text = Image.open(out).text["parameters"]
    assert 'IP-Adapter 0: "Model: ip-adapter-plus, Weight: 0.8, Start: 0, End: 1"' in text
    assert main(["inspect", str(paths["plus"])]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "ip-adapter" and info["adapter"] == "plus" and "hidden states" in info["image encoder"]
    assert main(["models", str(root / "adapters")]) == 0
    listing = capsys.readouterr().out
    assert "IP-Adapter (base)" in listing and "IP-Adapter (plus)" in listing and "--ip-adapter" in listing


def error_line(capsys, argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_input_is_one_line(setup, tmp_path, capsys):
    root, _, ours, encoder, paths = setup
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    prompt_image(5).save(tmp_path / "ok.png")
    base = ["generate", PROMPT, "--model", root / "pipe", "--steps", 1, "-o", tmp_path / "o.png"]
    err = error_line(capsys, base + ["--ip-adapter", paths["base"], "--ip-image", tmp_path / "broken.png"])
    assert "--ip-image" in err and "broken.png" in err
    assert "needs --ip-image" in error_line(capsys, base + ["--ip-adapter", paths["base"]])
    alone = tmp_path / "alone" / "ip.safetensors"
    alone.parent.mkdir()
    alone.write_bytes(paths["base"].read_bytes())
    err = error_line(capsys, base + ["--ip-adapter", alone, "--ip-image", tmp_path / "ok.png"])
    assert "--image-encoder" in err and "image embeddings" in err
    # an adapter for SDXL's 2048-wide cross-attention, given to this SD model
    mine = read_ip_adapter(paths["base"]).config
    xl = tmp_path / "adapters" / "sdxl.safetensors"
    xl.parent.mkdir()
    wide = IPAdapterConfig(image_dim=mine.image_dim, context_dim=2048, layer_widths=mine.layer_widths)
    save_adapter(IPAdapter(wide), xl)
    os.symlink(root / "adapters" / "image_encoder", tmp_path / "adapters" / "image_encoder")
    err = error_line(capsys, base + ["--ip-adapter", xl, "--ip-image", tmp_path / "ok.png"])
    assert "is for SDXL (2048-wide cross-attention)" in err and "32 wide" in err
    # a tower of another width than the adapter reads
    other = write_tower(
        {"tower": {**draw_adapter(random.Random(0))["tower"], "projection_dim": 8}}, tmp_path / "enc", 1
    )
    want = f"reads {encoder.embed_dim}-wide image embeddings; the image encoder .* gives 8-wide"
    with pytest.raises(ConfigError, match=want):
        ip = ImagePromptInput(read_ip_adapter(paths["base"]).adapter, other, [prompt_image(1)])
        ours(PROMPT, image_prompts=[ip], steps=1)


def test_hostile_and_unknown_adapter_files(tmp_path):
    from safetensors.torch import save_file

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"image_proj": {"proj.weight": Payload()}, "ip_adapter": {}}, tmp_path / "evil.bin")
    with pytest.raises(CheckpointError, match="refused to load"):
        read_ip_adapter(tmp_path / "evil.bin")
    assert not marker.exists()
    faceid = {"image_proj.proj.0.weight": torch.zeros(8, 4), "image_proj.proj.2.weight": torch.zeros(8, 8)}
    faceid |= {"image_proj.norm.weight": torch.ones(8), "ip_adapter.1.to_k_ip.weight": torch.zeros(8, 8)}
    save_file(faceid, tmp_path / "faceid.safetensors")
    with pytest.raises(CheckpointError, match="FaceID"):
        read_ip_adapter(tmp_path / "faceid.safetensors")
    gaps = {"image_proj.proj.weight": torch.zeros(32, 4), "image_proj.norm.weight": torch.ones(8)}
    gaps |= {"ip_adapter.1.to_k_ip.weight": torch.zeros(8, 8), "ip_adapter.5.to_k_ip.weight": torch.zeros(8, 8)}
    save_file(gaps, tmp_path / "gaps.safetensors")
    with pytest.raises(CheckpointError, match="numbered"):
        read_ip_adapter(tmp_path / "gaps.safetensors")


def test_a_single_file_tower_equals_its_folder(tmp_path):
    """A CLIP vision tower in transformers' layout as one file (ComfyUI's clip_vision) of a published width:
    its architecture read off the shapes, and the published tower's heads and activation."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from conftest import randomize

    config = CLIPVisionConfig(
        hidden_size=768,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=12,
        image_size=28,
        patch_size=14,
        projection_dim=16,
        hidden_act="quick_gelu",
    )
    model = randomize(CLIPVisionModelWithProjection(config), seed=1, std=0.02)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "clip_vision_b.safetensors")
    model.save_pretrained(str(tmp_path / "folder"))
    one, folder = load_image_encoder(tmp_path / "clip_vision_b.safetensors"), load_image_encoder(tmp_path / "folder")
    pixels = folder.pixels([prompt_image(2)])
    for hidden in (False, True):
        assert torch.equal(one.features(pixels, hidden), folder.features(pixels, hidden))
    save_file({"vision_model.embeddings.class_embedding": torch.zeros(40)}, tmp_path / "odd.safetensors")
    with pytest.raises(CheckpointError, match="not a CLIP vision tower"):
        load_image_encoder(tmp_path / "odd.safetensors")


def test_published_bin_layout_reads_as_safetensors(setup, tmp_path):
    _, _, _, _, paths = setup
    adapter = read_ip_adapter(paths["plus"]).adapter
    save_adapter(adapter, tmp_path / "plus.bin")
    again = read_ip_adapter(tmp_path / "plus.bin").adapter
    assert again.config == adapter.config
    assert all(torch.equal(a, b) for a, b in zip(adapter.state_dict().values(), again.state_dict().values()))


def test_the_web_ui_api_takes_an_ip_adapter_unit(setup, tmp_path):
    """An IP-Adapter unit of the ControlNet extension (its module names the tower, its model the adapter):
    the same image as the Python API; an adapter not offered is a 4xx in one line."""
    import base64
    import io

    from fastapi.testclient import TestClient

    from ldmkit.server.app import ServeConfig, create_app

    root, _, ours, encoder, paths = setup
    buf = io.BytesIO()
    prompt_image(6).save(buf, format="PNG")
    unit = {"enabled": True, "image": base64.b64encode(buf.getvalue()).decode(), "module": "ip-adapter_clip_sd15"}
    unit.update(model="ip-adapter-plus [0123abcd]", weight=0.6, guidance_start=0.0, guidance_end=0.8)
    body = {"prompt": PROMPT, "width": 32, "height": 40, "steps": 3, "cfg_scale": 5, "seed": 4, "sampler_name": "Euler"}
    body["alwayson_scripts"] = {"ControlNet": {"args": [unit]}}
    config = ServeConfig(str(root / "pipe"), outputs=str(tmp_path / "out"), ip_adapters=[str(paths["plus"])])
    with TestClient(create_app(config), raise_server_exceptions=False) as c:
        assert "ip-adapter-plus" in c.get("/controlnet/model_list").json()["model_list"]
        assert "ip-adapter_clip_sd15" in c.get("/controlnet/module_list").json()["module_list"]
        r = c.post("/sdapi/v1/txt2img", json=body)
        unknown = c.post(
            "/sdapi/v1/txt2img",
            json={**body, "alwayson_scripts": {"ControlNet": {"args": [{**unit, "model": "ip-adapter-nope"}]}}},
        )
    assert r.status_code == 200, r.text
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))))
    ip = ImagePromptInput(read_ip_adapter(paths["plus"]).adapter, encoder, [prompt_image(6)], 0.6, 0.0, 0.8)
    direct = ours(PROMPT, steps=3, cfg=5.0, sampler="euler", seed=4, width=32, height=40, image_prompts=[ip])
    assert np.array_equal(got, np.asarray(direct.images[0]))
    assert unknown.status_code in (404, 422) and "ip-adapter-nope" in unknown.text and "Traceback" not in unknown.text


def test_the_image_prompt_evaluation(setup):
    """At scale 0 the adapter is absent: "image against text" is the text prompt's own image, judged."""
    from ldmkit.data.shapes import sample_scene
    from ldmkit.evaluation.image_prompt_eval import evaluate_image_prompts
    from ldmkit.evaluation.judge import judge

    _, _, ours, encoder, paths = setup
    adapter = read_ip_adapter(paths["base"]).adapter
    report = evaluate_image_prompts(ours, adapter, encoder, "val", 3, (0.0, 1.0), 3.0, 2, "euler", 5)
    size = ours.model.config.image_size
    plain = [
        judge(
            ours(s.caption, steps=2, cfg=3.0, sampler="euler", seed=5 + 1000 * i, width=size, height=size).images[0],
            s.intent,
        ).correct
        for i, s in enumerate(sample_scene("val", i, 5, size) for i in range(3))
    ]
    zero, one = report["scales"]
    assert zero["image_against_text"]["text_scene_fully_correct"] == round(float(np.mean(plain)), 4)
    assert set(one["image_alone"]) >= {"colour", "shape", "fully_correct", "by_kind"}
    from ldmkit.data.shapes import render

    truth = [
        judge(render(sample_scene("val", i, 5, size)), sample_scene("val", i, 5, size).intent).correct for i in range(3)
    ]
    assert report["judge_on_renders"]["fully_correct"] == round(float(np.mean(truth)), 4)


def test_one_adapter_twice_is_refused(setup):
    """Two inputs sharing one adapter would share its token count: refused, naming the fix."""
    _, _, ours, encoder, paths = setup
    adapter = read_ip_adapter(paths["base"]).adapter
    twice = [
        ImagePromptInput(adapter, encoder, [prompt_image(1)]),
        ImagePromptInput(adapter, encoder, [prompt_image(2)]),
    ]
    with pytest.raises(ConfigError, match="given twice"):
        ours(PROMPT, image_prompts=twice, steps=1)
    assert all(not attn.image_prompts for *_, attn in cross_attentions(ours.model.unet))


def test_declared_sizes_cost_nothing_and_malformed_files_are_one_line(tmp_path):
    """Sizes taken from names or a config.json are checked against the file's tensors before anything of
    that size is built; malformed names and shapes are refused in one line."""
    import time

    from safetensors.torch import save_file

    from ldmkit.checkpoints.ip_adapter_files import is_ip_adapter_file

    base = {"image_proj.latents": torch.zeros(1, 4, 8), "image_proj.proj_in.weight": torch.zeros(8, 8)}
    base |= {
        "image_proj.layers.0.0.to_q.weight": torch.zeros(64, 8),
        "image_proj.layers.0.1.1.weight": torch.zeros(32, 8),
    }
    cases = {
        "deep": {
            **base,
            "image_proj.layers.99999999.x": torch.zeros(1),
            "ip_adapter.1.to_k_ip.weight": torch.zeros(8, 8),
        },
        "wide": {
            "image_proj.proj.weight": torch.zeros(32, 4),
            "image_proj.norm.weight": torch.ones(8),
            "ip_adapter.1.to_k_ip.weight": torch.zeros(8, 8),
            "ip_adapter.3.to_k_ip.weight": torch.zeros(10**6, 1),
        },
        "empty": {"image_proj.proj.weight": torch.zeros(32, 4), "ip_adapter.1.to_k_ip.weight": torch.zeros(4, 0)},
        "flat": {"image_proj.proj.weight": torch.zeros(32), "ip_adapter.1.to_k_ip.weight": torch.zeros(8, 8)},
        "numbered": {"image_proj.proj.weight": torch.zeros(32, 4), "ip_adapter.².to_k_ip.weight": torch.zeros(8, 8)},
    }
    for name, state in cases.items():
        save_file(state, tmp_path / f"{name}.safetensors")
        t = time.perf_counter()
        with pytest.raises(CheckpointError) as e:
            read_ip_adapter(tmp_path / f"{name}.safetensors")
        assert time.perf_counter() - t < 5 and "\n" not in str(e.value), name
    torch.save(3, tmp_path / "int.bin")
    assert not is_ip_adapter_file(tmp_path / "int.bin")
    # a tower whose config.json declares a huge model: refused by the shapes, nothing that size built
    tower = tmp_path / "tower"
    write_tower(draw_adapter(random.Random(0)), tower, 1)
    config = json.loads((tower / "config.json").read_text())
    for change in ({"hidden_size": 100000}, {"image_size": 10**6}, {"num_hidden_layers": 10**8}, {"patch_size": 0}):
        (tower / "config.json").write_text(json.dumps({**config, **change}))
        t = time.perf_counter()
        with pytest.raises(CheckpointError):
            load_image_encoder(tower)
        assert time.perf_counter() - t < 5, change


def test_units_for_one_adapter_are_its_images(setup, tmp_path):
    """Two web-UI units naming the same adapter with the same weight and range: one adapter with both
    images (diffusers' side by side); another weight for it, or too many units: a 4xx naming it."""
    import base64
    import io

    from fastapi.testclient import TestClient

    from ldmkit.server.app import ServeConfig, create_app

    root, _, ours, encoder, paths = setup

    def b64(image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    unit = {"enabled": True, "module": "ip-adapter_clip_sd15", "model": "ip-adapter-base", "weight": 0.7}
    units = [{**unit, "image": b64(prompt_image(1))}, {**unit, "image": b64(prompt_image(2))}]
    body = {"prompt": PROMPT, "width": 32, "height": 32, "steps": 2, "cfg_scale": 4, "seed": 2, "sampler_name": "Euler"}
    config = ServeConfig(str(root / "pipe"), outputs=str(tmp_path / "out"), ip_adapters=[str(paths["base"])])
    with TestClient(create_app(config), raise_server_exceptions=False) as c:
        r = c.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"ControlNet": {"args": units}}})
        other = [units[0], {**units[1], "weight": 0.3}]
        mixed = c.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"ControlNet": {"args": other}}})
        many = c.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"ControlNet": {"args": units * 9}}})
    assert r.status_code == 200, r.text
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))))
    ip = ImagePromptInput(read_ip_adapter(paths["base"]).adapter, encoder, [prompt_image(1), prompt_image(2)], 0.7)
    direct = ours(PROMPT, steps=2, cfg=4.0, sampler="euler", seed=2, width=32, height=32, image_prompts=[ip])
    assert np.array_equal(got, np.asarray(direct.images[0]))
    assert mixed.status_code == 422 and "ip-adapter-base again" in mixed.text
    assert many.status_code == 422 and "at most 16 units" in many.text
