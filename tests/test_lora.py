"""LoRA: random LoRAs in the kohya and diffusers/PEFT layouts, applied by diffusers (`load_lora_weights`)
and by us, give the same UNet and text-encoder outputs; merging then removing restores every weight
bit for bit; prompt tags and bad files fail with one line."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_pipeline
from ldmkit.checkpoints.lora_files import read_lora
from ldmkit.cli import main
from ldmkit.errors import CheckpointError, ConfigError
from ldmkit.models.lora import LoraSet, parse_lora_tags
from ldmkit.pipelines import Pipeline

RANK = 4


def layers(module, wanted):
    return [
        (n, m) for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and wanted(n)
    ]


def random_lora(ref, layout: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """LoRA tensors named from diffusers' own module names, as kohya's and PEFT's tools name them."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    unet = layers(
        ref.unet,
        lambda n: any(
            s in n
            for s in ("attn1.to_", "attn2.to_", "ff.net", "proj_in", "proj_out", "resnets.0.conv1", "resnets.1.conv2")
        ),
    )
    text = layers(ref.text_encoder, lambda n: "layers." in n and n.endswith(("_proj", "fc1", "fc2")))
    for net, items in (("unet", unet), ("text", text)):
        for name, m in items:
            w = m.weight
            down_shape = (RANK, *w.shape[1:]) if w.ndim == 4 else (RANK, w.shape[1])
            up_shape = (w.shape[0], RANK, 1, 1) if w.ndim == 4 else (w.shape[0], RANK)
            down = torch.randn(down_shape, generator=g) * 0.2
            up = torch.randn(up_shape, generator=g) * 0.2
            if layout == "kohya":  # kohya names the text tower's layers text_model.encoder...
                key = ("lora_unet_" if net == "unet" else "lora_te_text_model_") + name.replace(".", "_")
                out.update(
                    {
                        f"{key}.lora_down.weight": down,
                        f"{key}.lora_up.weight": up,
                        f"{key}.alpha": torch.tensor(RANK / 2),
                    }
                )
            else:
                key = ("unet." if net == "unet" else "text_encoder.") + name
                out.update({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up})
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    ref = tiny_pipeline(root / "pipe")
    for layout in ("kohya", "peft"):
        save_file(random_lora(ref, layout), str(root / f"{layout}.safetensors"))
    return ref, root


def outputs(unet_fn, text_fn):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([999, 10])
    ctx = torch.randn(2, 7, 32, generator=g)
    ids = torch.tensor([[49406, 320, 1929, 49407] + [49407] * 73] * 2)
    with torch.no_grad():
        return unet_fn(x, t, ctx), text_fn(ids)


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_lora_outputs_equal_diffusers(folders, layout):
    ref, root = folders
    pipe = Pipeline.load(root / "pipe")
    before = outputs(
        lambda x, t, c: pipe.model.unet(x, t, c),
        lambda ids: pipe.model.text_encoder.encode_ids(ids, torch.ones_like(ids)),
    )
    ref.load_lora_weights(str(root / f"{layout}.safetensors"), adapter_name=layout)
    ref.set_adapters([layout], adapter_weights=[0.7])
    theirs = outputs(lambda x, t, c: ref.unet(x, t, c).sample, lambda ids: ref.text_encoder(ids)[0])
    ref.delete_adapters([layout])
    lora = read_lora(root / f"{layout}.safetensors", pipe.model)
    stored = load_file(str(root / f"{layout}.safetensors"))
    assert len(lora.patches) == sum(k.endswith((".lora_down.weight", ".lora_A.weight")) for k in stored)
    pipe.loras.apply([(lora, 0.7)])
    ours = outputs(
        lambda x, t, c: pipe.model.unet(x, t, c),
        lambda ids: pipe.model.text_encoder.encode_ids(ids, torch.ones_like(ids)),
    )
    for a, b, plain in zip(theirs, ours, before):
        assert (a - plain).abs().mean() > 1e-3  # the LoRA changes the output
        assert (a - b).abs().max() <= 1e-4


def test_merge_then_remove_restores_every_weight_exactly(folders):
    _, root = folders
    pipe = Pipeline.load(root / "pipe")
    original = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    a = read_lora(root / "kohya.safetensors", pipe.model)
    b = read_lora(root / "peft.safetensors", pipe.model)
    pipe.loras.apply([(a, 0.8), (b, -0.5)])
    changed = [k for k, v in pipe.model.state_dict().items() if not torch.equal(v, original[k])]
    assert len(changed) == len(a.patches)  # both files touch the same layers
    pipe.loras.apply([(b, 1.0)])  # switching: back to the originals, then b alone
    pipe.loras.remove()
    assert all(torch.equal(v, original[k]) for k, v in pipe.model.state_dict().items())


def test_prompt_tags_and_cli(folders, tmp_path, capsys):
    _, root = folders
    assert parse_lora_tags("a cat <lora:kohya:0.6>, <lora:peft>") == ("a cat , ", [("kohya", 0.6), ("peft", 1.0)])
    for bad in ["<lora:>", "<lora:x:heavy>", "<lora:a:1:2:3>"]:
        with pytest.raises(ConfigError, match="malformed tag"):
            parse_lora_tags(f"a {bad}")
    common = [
        "generate",
        "--model",
        str(root / "pipe"),
        "--steps",
        "2",
        "--seed",
        "4",
        "--width",
        "16",
        "--height",
        "16",
        "-q",
        "--lora-dir",
        str(root),
    ]
    assert main(["generate", "a cat <lora:kohya:0.6>", *common[1:], "-o", str(tmp_path / "tag.png")]) == 0
    assert (
        main(
            [
                "generate",
                "a cat",
                *common[1:],
                "--lora",
                f"{root / 'kohya.safetensors'}:0.6",
                "-o",
                str(tmp_path / "flag.png"),
            ]
        )
        == 0
    )
    assert main(["generate", "a cat", *common[1:], "-o", str(tmp_path / "none.png")]) == 0
    capsys.readouterr()
    from PIL import Image

    tag, flag, none = (Image.open(tmp_path / f"{n}.png") for n in ("tag", "flag", "none"))
    assert tag.tobytes() == flag.tobytes() != none.tobytes()
    assert "<lora:kohya:0.6>" in tag.info["parameters"] and 'Lora hashes: "kohya: ' in tag.info["parameters"]
    for prompt, needle in [("a <lora:missing:1>", "unknown LoRA 'missing'"), ("a <lora::1>", "malformed tag")]:
        assert main(["generate", prompt, *common[1:], "-o", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def test_a_lora_for_another_architecture_is_refused(folders, tmp_path):
    _, root = folders
    pipe = Pipeline.load(root / "pipe")
    state = load_file(str(root / "kohya.safetensors"))
    save_file(
        {k.replace("lora_unet_", "lora_unet_x_"): v for k, v in state.items()}, str(tmp_path / "other.safetensors")
    )
    with pytest.raises(CheckpointError, match="another architecture: .* match nothing"):
        read_lora(tmp_path / "other.safetensors", pipe.model)
    key = next(k for k in state if k.endswith("lora_up.weight"))
    save_file({**state, key: torch.zeros(3, RANK)}, str(tmp_path / "shapes.safetensors"))
    with pytest.raises(CheckpointError, match="wrong shapes"):
        read_lora(tmp_path / "shapes.safetensors", pipe.model)
    save_file({"a.hada_w1_a": torch.zeros(2, 2)}, str(tmp_path / "loha.safetensors"))
    with pytest.raises(CheckpointError, match="LoHa"):
        read_lora(tmp_path / "loha.safetensors", pipe.model)
    assert LoraSet(pipe.model).applied == []


def test_prompt_tags_name_only_files_inside_the_lora_folder(folders, tmp_path, monkeypatch):
    """A tag cannot reach a LoRA outside the folder (by ../, an absolute path or a symlink): it is refused
    as a missing one is, and the file is neither read nor hashed; a path given by the caller still is."""
    from ldmkit.checkpoints import lora_files

    _, root = folders
    loras = tmp_path / "loras"
    loras.mkdir()
    (loras / "style.safetensors").write_bytes((root / "peft.safetensors").read_bytes())
    (loras / "link.safetensors").symlink_to(root / "kohya.safetensors")
    (loras / "dangling.safetensors").symlink_to(root / "nosuch.safetensors")
    secret = root / "kohya.safetensors"
    read = []
    real_read, real_hash = lora_files.read_tensors, lora_files.sha256_file
    monkeypatch.setattr(lora_files, "read_tensors", lambda p, *a, **k: read.append(p) or real_read(p, *a, **k))
    monkeypatch.setattr(lora_files, "sha256_file", lambda p, *a, **k: read.append(p) or real_hash(p, *a, **k))
    pipe = Pipeline.load(root / "pipe")
    pipe.lora_dir = str(loras)
    run = dict(steps=1, seed=1, width=16, height=16)
    rel = os.path.relpath(root, loras)
    for exists, absent in [
        (f"{rel}/kohya", f"{rel}/nosuch"),
        (str(root / "kohya"), str(root / "nosuch")),
        ("link", "dangling"),
    ]:
        messages = []
        for name in (exists, absent, "nosuch"):
            with pytest.raises(ConfigError) as e:
                pipe(f"a cat <lora:{name}:1>", **run)
            messages.append(str(e.value).replace(repr(name), "NAME"))
        assert messages[0] == messages[1] == messages[2], messages
        assert "available: style" in messages[0] and str(root) not in messages[0]
    assert read == []
    result = pipe("a cat", loras=[(secret, 1.0)], **run)  # the caller's own path: not confined
    assert "Lora hashes" in result.infotexts[0] and read


def test_trained_lora_files_reproduce_the_trained_adapters(tmp_path, base_model, capsys):
    import yaml

    from conftest import ROOT, config_file, losses
    from ldmkit.checkpoints.single_file import load_model
    from ldmkit.config import from_dict
    from ldmkit.training.lora import LoraTask, LoraTrainConfig

    data = yaml.safe_load((ROOT / "configs" / "test-lora.yaml").read_text())
    data.update(base=str(base_model), text_target_modules=["query", "value"])  # MiniLM's attention
    data["run"]["dir"] = str(tmp_path / "direct")
    task = LoraTask(from_dict(LoraTrainConfig, data))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in task.adapters.parameters():
            p.normal_(0, 0.1)  # as if trained: PEFT starts lora_B at zero
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([900, 20]), torch.randn(2, 7, 384, generator=g)
    ctx = ctx[..., : task.unet.config.context_dim]
    with torch.no_grad():
        adapted = task.unet(x, t, ctx)
        adapted_text = task.model.text_encoder(["a red circle"])
    kohya, diffusers = task.lora_files()
    assert any(k.startswith("lora_te_encoder_layer_0_attention_self_query") for k in kohya)
    assert any(k.endswith("conv1.lora_down.weight") and v.ndim == 4 for k, v in kohya.items())  # LoCon
    save_file(kohya, str(tmp_path / "k.safetensors"))
    save_file(diffusers, str(tmp_path / "d.safetensors"), metadata={"lora_adapter_metadata": '{"lora_alpha": 2.0}'})
    fresh = load_model(base_model)
    with torch.no_grad():
        plain = fresh.unet(x, t, ctx)
        plain_text = fresh.text_encoder(["a red circle"])
        for f in ("k", "d"):
            lora = read_lora(tmp_path / f"{f}.safetensors", fresh)
            LoraSet(fresh).apply([(lora, 1.0)])
            ours = fresh.unet(x, t, ctx)
            assert (ours - plain).abs().mean() > 1e-3 and (ours - adapted).abs().max() <= 1e-5, f
            text = fresh.text_encoder(["a red circle"])
            assert (text - plain_text).abs().mean() > 1e-3 and (text - adapted_text).abs().max() <= 1e-5, f
            LoraSet(fresh).remove()
            fresh = load_model(base_model)
    prior = {"kind": "shapes", "split": "val", "n": 16, "size": 32}
    cfg = config_file(tmp_path, "test-lora.yaml", tmp_path / "cli", base=str(base_model), name="mine", prior=prior)
    capsys.readouterr()
    assert main(["train-lora", "--config", str(cfg), "-q"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["lora"] == str(tmp_path / "cli" / "mine.safetensors")
    assert len(losses(tmp_path / "cli")) == 6
    assert (tmp_path / "cli" / "mine.safetensors").exists() and (
        tmp_path / "cli" / "mine-diffusers.safetensors"
    ).exists()
    assert (tmp_path / "cli" / "samples" / "samples-00000006.png").exists()
    cache = torch.load(tmp_path / "cli" / "latent-cache.pt", weights_only=True)
    assert cache["mean"].shape[0] == 64 + 16  # the prior images are encoded with the instance images


def test_prior_images_fill_every_other_sample():
    from ldmkit.data.images import DataConfig, MixedOrder, PriorMix, ShapesData

    instance, prior = ShapesData(DataConfig(split="diamond", n=5)), ShapesData(DataConfig(split="train", n=7))
    mix = PriorMix(instance, prior)
    items = [MixedOrder(mix, 0).item(g) for g in range(2 * 35)]
    ours, theirs = items[0::2], items[1::2]
    assert all(i < 5 for i in ours) and all(5 <= i < 12 for i in theirs)
    for epoch in range(7):  # each set in its own epochs: every item once per epoch
        assert sorted(ours[5 * epoch : 5 * epoch + 5]) == list(range(5))
    for epoch in range(5):
        assert sorted(theirs[7 * epoch : 7 * epoch + 7]) == list(range(5, 12))
    assert mix.caption(3) == instance.caption(3) and "diamond" in mix.caption(3)
    assert mix.load(8)[1] == prior.caption(3) == mix.caption(8)


def test_a_hires_prompt_merges_its_own_loras_for_the_second_pass_only(folders):
    _, root = folders
    pipe = Pipeline.load(root / "pipe")
    pipe.lora_dir = root
    run = dict(seed=4, steps=2, width=16, height=16, hires_scale=2, strength=0.5)
    plain = pipe("a cat", **run)
    tagged = pipe("a cat", **run, hires_prompt="a cat <lora:kohya:0.6>")
    assert not torch.equal(plain.latents, tagged.latents)
    # strength 0 runs no second pass: the upscaled first pass, with no LoRA in it
    upscaled = pipe("a cat", **{**run, "strength": 0.0}).latents
    tagged_upscaled = pipe("a cat", **{**run, "strength": 0.0}, hires_prompt="a cat <lora:kohya:0.6>").latents
    assert torch.equal(tagged_upscaled, upscaled)
    assert 'Lora hashes: "kohya: ' in tagged.infotexts[0] and "Lora hashes" not in plain.infotexts[0]
    steps = []
    with pytest.raises(ConfigError, match="unknown LoRA 'missing'"):
        pipe("a cat", **run, hires_prompt="a cat <lora:missing:1>", callback=steps.append)
    assert steps == []  # refused before the first pass ran
