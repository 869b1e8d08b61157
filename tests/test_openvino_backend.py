"""`--backend openvino`: our own backbone executed by OpenVINO must compute what PyTorch computes.

The reference is the PyTorch module itself (the backend converts ours, not diffusers'): UNets drawn at
random (seeded; levels, widths, attention levels, heads, projections, depth, middle block, vector and
guidance-embedding inputs), run at sizes above and below the one traced, odd latent sizes and other batch
sizes and token counts; a small MMDiT; the disk cache, weights changed in place, and the calls that must
stay on PyTorch. Replay a failure: `python -m pytest tests/test_openvino_backend.py -m slow -k "seed-7]"`."""

import logging
import random

import pytest
import torch

from conftest import randomize

pytest.importorskip("openvino")

from ldmkit.models.mmdit import MMDiT, MMDiTConfig  # noqa: E402
from ldmkit.models.openvino_backend import OpenVINOBackbone  # noqa: E402
from ldmkit.models.unet import UNetConfig, UNetModel  # noqa: E402


def draw(seed: int) -> UNetConfig:
    r = random.Random(seed)
    groups = r.choice([4, 8])
    levels = r.randint(1, 3)
    heads = r.choice([1, 2, 4])
    widths = tuple(groups * heads * r.randint(1, 3) for _ in range(levels))
    attention = tuple(2**i for i in range(levels) if r.random() < 0.6) or (1,)
    vector = r.random() < 0.3
    return UNetConfig(
        channels=widths,
        num_res_blocks=r.randint(1, 2),
        attention_resolutions=attention,
        num_heads=heads,
        transformer_depth=r.randint(1, 2),
        context_dim=r.choice([8, 16, 24]),
        use_linear_in_transformer=r.random() < 0.5,
        middle_block=r.choice(["attention", "resnet", "none"]),
        num_classes="sequential" if vector else None,
        adm_in_channels=r.choice([6, 12]) if vector else None,
        time_cond_proj_dim=r.choice([None, None, 8]),
        norm_groups=groups,
    )


def inputs(config: UNetConfig, batch: int, side: int, tokens: int, g: torch.Generator) -> dict:
    kw = {
        "x": torch.randn(batch, 4, side, side, generator=g),
        "timesteps": torch.full((batch,), 321.0),
        "context": torch.randn(batch, tokens, config.context_dim, generator=g),
    }
    if config.adm_in_channels:
        kw["y"] = torch.randn(batch, config.adm_in_channels, generator=g)
    if config.time_cond_proj_dim:
        kw["timestep_cond"] = torch.randn(batch, config.time_cond_proj_dim, generator=g)
    return kw


def check_unet(seed: int, tmp_path) -> None:
    config = draw(seed)
    unet = randomize(UNetModel(config), seed=seed)
    backend = OpenVINOBackbone(unet, tmp_path)
    g = torch.Generator().manual_seed(seed)
    down = 2 ** (len(config.channels) - 1)
    # traced at the first shape; the others reuse the one converted model at new static shapes
    for batch, side, tokens in ((2, 4 * down, 7), (1, 4 * down + down, 12), (3, 2 * down, 7)):
        kw = inputs(config, batch, side, tokens, g)
        with torch.no_grad():
            ours = unet(**kw)
        theirs = backend(**kw)
        diff = (theirs - ours).abs().max().item()
        assert theirs.shape == ours.shape, f"seed {seed}"
        assert diff <= 1e-4 * max(1.0, ours.abs().max().item()), f"seed {seed}: {config} at {batch}x{side}: {diff}"
    assert backend.seconds["convert"] > 0 and len(backend.models) == 1, f"seed {seed}: converted once"


@pytest.mark.parametrize("seed", [1, 2], ids=lambda s: f"seed-{s}")
def test_random_unets_on_openvino_equal_pytorch(seed, tmp_path):
    check_unet(seed, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3, 15), ids=lambda s: f"seed-{s}")
def test_many_random_unets_on_openvino_equal_pytorch(seed, tmp_path):
    check_unet(seed, tmp_path)


def test_an_mmdit_on_openvino_equals_pytorch(tmp_path):
    config = MMDiTConfig(in_channels=4, out_channels=4, depth=2, hidden_size=16, head_dim=8, context_dim=8,
                         pooled_dim=8, pos_embed_max_size=8, sample_size=6, qk_norm="rms_norm")  # fmt: skip
    model = randomize(MMDiT(config))
    backend = OpenVINOBackbone(model, tmp_path)
    g = torch.Generator().manual_seed(0)
    for side in (6, 10):
        x, ctx, y = torch.randn(2, 4, side, side, generator=g), torch.randn(2, 5, 8, generator=g), torch.randn(2, 8)
        t = torch.tensor([400.0, 400.0])
        with torch.no_grad():
            ours = model(x, t, ctx, y=y)
        assert (backend(x, t, ctx, y=y) - ours).abs().max().item() <= 1e-4 * max(1.0, ours.abs().max().item())


@pytest.fixture(scope="module")
def tiny_unet():
    config = UNetConfig(channels=(16, 32), num_res_blocks=1, attention_resolutions=(2,), num_heads=2, context_dim=8,
                        norm_groups=8)  # fmt: skip
    return randomize(UNetModel(config))


def test_weights_changed_in_place_are_noticed_and_the_cache_is_reused(tiny_unet, tmp_path):
    """A merged LoRA changes weights in place: the next call must see them. Putting the weights back
    finds the first conversion on disk, and a second backend on the same weights converts nothing."""
    unet = tiny_unet
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 7, 8)
    backend = OpenVINOBackbone(unet, tmp_path)
    before = backend(x, t, ctx)
    weight = unet.out[-1].weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight.add_(0.05)
        changed_ours = unet(x, t, ctx)
    changed = backend(x, t, ctx)
    assert (changed - changed_ours).abs().max() <= 1e-4 and (changed - before).abs().max() > 1e-2
    with torch.no_grad():
        weight.copy_(original)
    converted = backend.seconds["convert"]
    assert torch.allclose(backend(x, t, ctx), before, atol=1e-6)
    assert backend.seconds["convert"] == converted, "the original weights' conversion was on disk"
    again = OpenVINOBackbone(unet, tmp_path)
    assert torch.allclose(again(x, t, ctx), before, atol=1e-6) and again.seconds["convert"] == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 4 and all(not n.startswith(".") for n in names), names  # two whole entries, no leftovers


def test_controlnet_and_feature_cache_calls_run_on_pytorch_and_disagreement_falls_back(
    tiny_unet, tmp_path, monkeypatch, caplog
):
    import ldmkit.models.openvino_backend as backend_module

    unet = tiny_unet
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 7, 8)
    backend = OpenVINOBackbone(unet, tmp_path)
    shapes = []
    hooks = [b.register_forward_hook(lambda m, a, o: shapes.append(o.shape)) for b in unet.input_blocks]
    hooks.append(unet.middle_block.register_forward_hook(lambda m, a, o: shapes.append(o.shape)))
    with torch.no_grad():
        unet(x, t, ctx)
    for h in hooks:
        h.remove()
    control = [torch.randn(s) for s in shapes]  # a ControlNet's residuals: one per skip, one for the middle
    with torch.no_grad():
        assert torch.equal(backend(x, t, ctx, control=control), UNetModel.forward(unet, x, t, ctx, control=control))
    assert not backend.compiled, "nothing was converted for a ControlNet call"
    monkeypatch.setitem(backend_module.TOLERANCE, torch.float32, -1.0)  # no output can pass
    with caplog.at_level(logging.WARNING, logger="ldmkit"):
        out = backend(x, t, ctx)
    with torch.no_grad():
        assert torch.equal(out, UNetModel.forward(unet, x, t, ctx))
    assert "running them on PyTorch" in caplog.text


def test_generate_with_the_openvino_backend_draws_the_torch_image(tmp_path, capsys, monkeypatch):
    """End to end through the CLI: the same seed draws the same picture on either backend (within a level
    of 255 on average), the cache lands where LDMKIT_CACHE says, and --compile with it is refused."""
    import numpy as np
    from PIL import Image

    from ldmkit.cli import main

    monkeypatch.setenv("LDMKIT_CACHE", str(tmp_path / "cache"))
    assert main(["init-model", str(tmp_path / "m.safetensors"), "--preset", "tiny"]) == 0
    common = ["generate", "a red circle", "--model", str(tmp_path / "m.safetensors"), "--steps", "3", "--seed", "5"]
    common += ["--width", "64", "--height", "64", "--precision", "fp32", "-q"]
    assert main(common + ["-o", str(tmp_path / "torch.png")]) == 0
    assert main(common + ["-o", str(tmp_path / "ov.png"), "--backend", "openvino"]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.float32) for n in ("torch", "ov"))
    assert np.abs(a - b).mean() <= 1.0
    assert list((tmp_path / "cache" / "openvino").glob("*.xml"))
    capsys.readouterr()
    assert main(common + ["-o", str(tmp_path / "x.png"), "--backend", "openvino", "--compile"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "choose one" in err and not (tmp_path / "x.png").exists()


def test_a_missing_openvino_is_one_line_before_the_model_is_read(tmp_path, capsys, monkeypatch):
    import sys

    from ldmkit.cli import main

    monkeypatch.setitem(sys.modules, "openvino", None)  # import fails as when it is not installed
    code = main(["generate", "x", "--model", str(tmp_path / "absent.safetensors"), "--backend", "openvino"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().count("\n") == 0 and "pip install 'ldmkit[openvino]'" in err


def test_serve_runs_its_models_on_the_backend_it_was_given(tmp_path, capsys, monkeypatch):
    """`serve --backend openvino`: each model the server loads gets the backend; without the package, the
    command stops in one line before binding."""
    import sys

    from ldmkit.cli import main
    from ldmkit.server.app import ServeConfig
    from ldmkit.server.registry import Models

    models = Models(ServeConfig(outputs=str(tmp_path), backend="openvino"))
    pipe = models.load(models.default)
    assert pipe.backend == "openvino" and isinstance(pipe.model.unet.forward, OpenVINOBackbone)
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert main(["serve", "--backend", "openvino", "--port", "0", "--outputs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "pip install 'ldmkit[openvino]'" in err and "Traceback" not in err


def test_bf16_weights_convert_and_agree_within_bf16_rounding(tiny_unet, tmp_path):
    """bf16 weights (--precision bf16) are converted from an fp32 copy and compiled with the bf16 hint,
    the way OpenVINO's own pipelines run bf16; inputs and output keep the module's dtype."""
    import copy

    unet = copy.deepcopy(tiny_unet).to(torch.bfloat16)
    x, t, ctx = torch.randn(2, 4, 8, 8).bfloat16(), torch.tensor([500.0, 500.0]), torch.randn(2, 7, 8).bfloat16()
    backend = OpenVINOBackbone(unet, tmp_path)
    out = backend(x, t, ctx)
    with torch.no_grad():
        ours = unet(x, t, ctx).float()
    assert out.dtype == torch.bfloat16 and [c for c in backend.compiled.values()], "ran on OpenVINO"
    assert (out.float() - ours).abs().max().item() <= 5e-2 * max(1.0, ours.abs().max().item())
