"""Textual inversion: embeddings in the popular UI's .pt (through the safe loader) and .safetensors
layouts and diffusers' learned_embeds, used by name in prompts. An embedding holding exactly the
token vectors of some words encodes exactly as those words do."""

import pytest
import torch
from safetensors.torch import save_file

from ldmkit.cli import main
from ldmkit.errors import CheckpointError, ConfigError
from ldmkit.models.embeddings import Embeddings, read_embedding, token_embedding
from ldmkit.models.ldm import LatentDiffusion
from ldmkit.models.presets import tiny
from ldmkit.models.prompts import encode_prompts


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return LatentDiffusion(tiny()).text_encoder.eval()


def vectors_of(encoder, words: str) -> torch.Tensor:
    ids = encoder.tokenizer.content_ids(words)
    return token_embedding(encoder).weight[ids].detach().clone()


def test_every_layout_and_exact_equivalence(encoder, tmp_path):
    v = vectors_of(encoder, "red circle")
    assert v.shape[0] == 2
    torch.save(
        {"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": "redc", "step": 3}, tmp_path / "redc.pt"
    )
    save_file({"emb_params": v}, str(tmp_path / "redc2.safetensors"))
    torch.save({"<blue>": vectors_of(encoder, "blue")[0]}, tmp_path / "learned_embeds.bin")
    for f in ("redc.pt", "redc2.safetensors"):
        assert torch.equal(read_embedding(tmp_path / f), v)
    emb = Embeddings(encoder)
    assert emb.load_folder(tmp_path) == ["learned_embeds", "redc", "redc2"]
    with torch.no_grad():
        want = encode_prompts(encoder, ["a (red circle:1.1) above a blue square"]).context
        got = encode_prompts(encoder, ["a (redc:1.1) above a learned_embeds square"], embeddings=emb).context
        assert torch.equal(want, got)
        plain = encode_prompts(encoder, ["a redcx above a blue square"], embeddings=emb).context  # whole words only
        assert not torch.equal(plain, want)
    with pytest.raises(ConfigError, match="webui prompt mode"):
        encode_prompts(encoder, ["redc"], mode="truncate", embeddings=emb)


def test_bad_embeddings_are_refused(encoder, tmp_path):
    save_file({"emb_params": torch.zeros(2, 768)}, str(tmp_path / "big.safetensors"))
    with pytest.raises(CheckpointError, match="another model"):
        Embeddings(encoder).load(tmp_path / "big.safetensors")
    torch.save({"string_to_param": {"*": torch.nn.Linear(2, 2)}}, tmp_path / "code.pt")
    with pytest.raises(CheckpointError, match="refused to load"):
        read_embedding(tmp_path / "code.pt")
    save_file({"a": torch.zeros(2), "b": torch.zeros(2)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(CheckpointError, match="not a textual-inversion embedding"):
        read_embedding(tmp_path / "odd.safetensors")


def test_generate_with_an_embeddings_folder(encoder, tmp_path, capsys):
    assert main(["init-model", str(tmp_path / "tiny.safetensors")]) == 0
    from ldmkit.checkpoints.single_file import load_model

    te = load_model(tmp_path / "tiny.safetensors").text_encoder
    (tmp_path / "emb").mkdir()
    save_file({"emb_params": vectors_of(te, "red")}, str(tmp_path / "emb" / "crimson.safetensors"))
    common = ["--model", str(tmp_path / "tiny.safetensors"), "--steps", "2", "--seed", "1", "-q"]
    assert main(["generate", "a red circle", *common, "-o", str(tmp_path / "a.png")]) == 0
    assert (
        main(
            [
                "generate",
                "a crimson circle",
                *common,
                "--embeddings-dir",
                str(tmp_path / "emb"),
                "-o",
                str(tmp_path / "b.png"),
            ]
        )
        == 0
    )
    from PIL import Image

    assert Image.open(tmp_path / "a.png").tobytes() == Image.open(tmp_path / "b.png").tobytes()
    capsys.readouterr()
    assert (
        main(["generate", "x", *common, "--embeddings-dir", str(tmp_path / "none"), "-o", str(tmp_path / "c.png")]) == 2
    )
    assert "no such embeddings folder" in capsys.readouterr().err


def test_train_embedding_learns_only_the_new_vectors(tmp_path, base_model):
    from safetensors.torch import load_file

    from conftest import config_file, losses
    from ldmkit.checkpoints.single_file import load_model

    before = load_file(str(base_model))
    cfg = config_file(tmp_path, "test-embedding.yaml", tmp_path / "emb", base=str(base_model))
    assert main(["train-embedding", "--config", str(cfg), "-q"]) == 0
    assert len(losses(tmp_path / "emb")) == 6
    vectors = read_embedding(tmp_path / "emb" / "crimsonish.safetensors")
    te = load_model(base_model).text_encoder  # MiniLM (BERT-style): textual inversion works there too
    start = vectors_of(te, "red")
    assert vectors.shape == start.shape and not torch.equal(vectors, start)  # it moved from "red"
    emb = Embeddings(te)
    emb.add("crimson", start)
    with torch.no_grad():  # and on a BERT-style tower too, an embedding of "red" is "red"
        assert torch.equal(
            encode_prompts(te, ["a red circle"])[0], encode_prompts(te, ["a crimson circle"], embeddings=emb)[0]
        )
    after = load_file(str(base_model))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "emb" / "samples" / "samples-00000006.png").exists()
