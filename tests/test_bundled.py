"""The bundled shapes model: what a fresh install runs first. It ships inside the package, loads
with no download, and draws what it is asked (checked by the exact judge, not by eye)."""

import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from ldmkit import bundled
from ldmkit.cli import main
from ldmkit.data.shapes import Intent, Item
from ldmkit.errors import LdmkitError
from ldmkit.evaluation.judge import judge
from ldmkit.images import parse_infotext, read_png_parameters
from ldmkit.pipelines import Pipeline

SIZE_BUDGET_MB = 95  # everything the package ships, under PyPI's default 100 MB per file (docs/models.md)
EDGE_F_GAIN = 0.4  # with control minus without; measured 0.964 - 0.318 over 100 held-out prompts


def test_bundled_files_are_fp16_safetensors_within_the_budget():
    files = sorted(bundled.HERE.glob("*.safetensors"))
    assert {f.name for f in files} >= {b.file for b in bundled.BUNDLED.values()}
    assert sum(f.stat().st_size for f in files) < SIZE_BUDGET_MB * 2**20
    for f in files:
        with safe_open(f, "pt") as sf:
            dtypes = {sf.get_slice(k).get_dtype() for k in sf.keys()}
        assert dtypes == {"F16"}, (f.name, dtypes)


def test_generate_with_no_model_uses_the_bundled_one(tmp_path, capsys):
    out = tmp_path / "a.png"
    code = main(["generate", "a red circle above a blue square", "--seed", "3", "-o", str(out), "-q"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(stdout)["written"] == [str(out)]
    image = Image.open(out)
    assert image.size == (64, 64)
    _, _, fields = parse_infotext(read_png_parameters(out))
    chosen = bundled.BUNDLED["shapes"].defaults
    assert fields["Model"] == "shapes" and int(fields["Steps"]) == chosen["steps"]
    assert float(fields["CFG scale"]) == chosen["cfg"]


def test_bundled_model_draws_the_colour_and_shape_asked_for():
    pipe = Pipeline.load()  # no argument: the bundled default
    asked = [("red", "circle"), ("blue", "square"), ("yellow", "triangle"), ("green", "star")]
    hits = 0
    for colour, shape in asked:
        for image in pipe(f"a {colour} {shape}", seed=0, batch=2).images:
            hits += judge(image, Intent([Item(shape, colour)])).correct
    # measured at the chosen settings: docs/models.md's table gives single-shape accuracy on 200 val prompts
    assert hits >= 6, f"{hits}/8 images fully correct"


def test_user_paths_are_never_shadowed_by_bundled_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shapes").mkdir()
    assert bundled.resolve("shapes") == (bundled.Path("shapes"), {})
    path, defaults = bundled.resolve(None)
    assert path == bundled.HERE / "shapes.safetensors" and defaults == bundled.BUNDLED["shapes"].defaults


def test_missing_bundled_file_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(bundled.BUNDLED, "gone", bundled.Bundled("gone.safetensors", "recipes/none.sh"))
    with pytest.raises(LdmkitError, match="bundled model 'gone'.*missing"):
        bundled.resolve("gone")


def test_fast_with_no_few_step_version_is_one_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(bundled, "FAST", {})
    assert main(["generate", "a red circle", "--fast", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --fast") and "distill-lcm" in err and len(err.splitlines()) == 1


def test_bundled_controlnet_puts_the_shapes_where_the_edges_are(tmp_path, capsys):
    from ldmkit.checkpoints.controlnet_files import load_controlnet
    from ldmkit.data.shapes import render, sample_scene
    from ldmkit.evaluation.control_eval import evaluate_control

    pipe = Pipeline.load()
    net = load_controlnet(bundled.bundled_controlnet(pipe.path), base=pipe.model.unet.config)
    report, _ = evaluate_control(pipe, net, "heldout", n=4, cfg=2.0, steps=20, sampler="euler_a")
    edge_f = report["edge_f"]
    # measured over 100 held-out prompts in docs/controlnet.md ("The bundled ControlNet")
    assert edge_f["with"]["f"] > edge_f["without"]["f"] + EDGE_F_GAIN, edge_f
    hint = tmp_path / "truth.png"
    render(sample_scene("heldout", 0)).save(hint)
    out = tmp_path / "c.png"
    assert main(["generate", "a red star", "--control", f"canny:{hint}", "-o", str(out), "-q"]) == 0  # no --controlnet
    assert Image.open(out).size == (64, 64)


def test_fast_uses_the_distilled_model_in_four_steps(tmp_path, capsys):
    """--fast: the bundled model's consistency-distilled version, lcm sampler, 4 steps, no negative pass."""
    out = tmp_path / "f.png"
    assert main(["generate", "a red circle", "--fast", "--seed", "1", "-o", str(out), "-q"]) == 0
    _, _, fields = parse_infotext(read_png_parameters(out))
    chosen = bundled.BUNDLED[bundled.FAST["shapes"]].defaults
    assert fields["Model"] == bundled.FAST["shapes"] and int(fields["Steps"]) == chosen["steps"] == 4
    assert fields["Sampler"].lower().startswith("lcm")
    pipe = Pipeline.load(bundled.FAST["shapes"])
    asked = [("red", "circle"), ("blue", "square"), ("yellow", "triangle"), ("green", "star")]
    hits = sum(
        judge(image, Intent([Item(shape, colour)])).correct
        for colour, shape in asked
        for image in pipe(f"a {colour} {shape}", seed=0, batch=2).images
    )
    assert hits >= 6, f"{hits}/8 images fully correct"  # docs/few-step.md: the few-step table


def test_fast_file_holds_only_its_unet_and_runs_with_the_parts_it_shares(tmp_path):
    """The few-step file carries its UNet alone (the package stays in budget); loaded by name it gets the
    autoencoder and text tower of the file it shares, bit for bit; copied elsewhere it is refused in a line."""
    from ldmkit.checkpoints.detect import UNET
    from ldmkit.checkpoints.single_file import load_model

    fast = bundled.BUNDLED[bundled.FAST["shapes"]]
    with safe_open(bundled.HERE / fast.file, "pt") as f:
        assert fast.shares and all(k.startswith(UNET) or k == "alphas_cumprod" for k in f.keys())
    ours, theirs = load_model(bundled.HERE / fast.file), load_model(bundled.HERE / fast.shares)
    for part in ("first_stage_model", "text_encoder"):
        mine, base = getattr(ours, part).state_dict(), getattr(theirs, part).state_dict()
        assert mine.keys() == base.keys() and all(torch.equal(mine[k], base[k]) for k in mine), part
    copy = tmp_path / "fast.safetensors"
    copy.write_bytes((bundled.HERE / fast.file).read_bytes())
    with pytest.raises(LdmkitError, match=f"only a UNet.*{fast.shares}"):
        load_model(copy)


def test_emoji_model_draws_from_words_out_of_the_box(tmp_path, capsys):
    out = tmp_path / "dog.png"
    code = main(["generate", "a dog face", "--model", "emoji", "--seed", "0", "-o", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    assert Image.open(out).size == (64, 64)
    _, _, fields = parse_infotext(read_png_parameters(out))
    chosen = bundled.BUNDLED["emoji"].defaults
    assert fields["Model"] == "emoji" and int(fields["Steps"]) == chosen["steps"]
    assert float(fields["CFG scale"]) == chosen["cfg"]


def test_emoji_model_draws_the_colour_named():
    """Red minus green over the drawn (not white) pixels, seeds 0-3 at the defaults. Measured: red heart
    166 to 201, green heart -76 to -30 (red apple 148 to 177, green apple -45 to -7)."""
    import numpy as np

    pipe = Pipeline.load("emoji")

    def red_minus_green(prompt):
        out = []
        for image in pipe(prompt, seed=0, batch=4).images:
            a = np.asarray(image).astype(float)
            out.append(float((a[..., 0] - a[..., 1])[a.min(2) < 200].mean()))
        return out

    assert min(red_minus_green("red heart")) > 100 and max(red_minus_green("green heart")) < 0


def test_the_bundled_tiny_decoder_needs_no_file(tmp_path, capsys):
    """`--decoder tiny` with a bundled model that has its own tiny decoder: no --tiny-decoder needed, and
    the image is that decoder's; a model without one is still refused in one line."""
    import torch

    from ldmkit.bundled import bundled_tiny_decoder
    from ldmkit.checkpoints.taesd_files import read_tiny_autoencoder
    from ldmkit.images import tensor_to_pil

    assert bundled_tiny_decoder("shapes") == bundled.HERE / "shapes-tiny.safetensors"
    assert bundled_tiny_decoder("shapes-fast") == bundled_tiny_decoder("shapes")
    assert bundled_tiny_decoder("emoji") is None
    out = tmp_path / "t.png"
    assert (
        main(["generate", "a red circle", "--steps", "4", "--seed", "2", "--decoder", "tiny", "-q", "-o", str(out)])
        == 0
    )
    capsys.readouterr()
    latents = Pipeline.load("shapes")("a red circle", steps=4, seed=2).latents
    with torch.no_grad():
        want = tensor_to_pil(read_tiny_autoencoder(bundled_tiny_decoder("shapes")).autoencoder.decode(latents))[0]
    assert Image.open(out).convert("RGB").tobytes() == want.tobytes()
    assert "VAE Decoder: TAESD" in Image.open(out).info["parameters"]
    assert main(["generate", "a cat", "--model", "emoji", "--decoder", "tiny", "-o", str(tmp_path / "e.png")]) == 2
    assert capsys.readouterr().err.startswith("error: --decoder tiny: no tiny decoder is given")
