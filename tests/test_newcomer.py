"""What a newcomer meets first: a refused run says why in one line before any work, and a folder that
holds more than embeddings still gives its embeddings."""

import json

import pytest
import torch
from fastapi.testclient import TestClient

from ldmkit.cli import main
from ldmkit.pipelines import Pipeline
from ldmkit.server.app import ServeConfig, create_app


def one_line(capsys, code: int, *needles: str) -> None:
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert all(n in err for n in needles), err


@pytest.mark.parametrize("output,needle", [("/proc/x.png", "cannot be written"), ("{tmp}/f/x.png", "is a file")])
def test_an_unwritable_output_is_refused_before_any_work(tmp_path, capsys, monkeypatch, output, needle):
    (tmp_path / "f").write_text("a file where a folder would be")
    loads = []
    monkeypatch.setattr(Pipeline, "load", classmethod(lambda cls, *a, **k: loads.append(a)))
    one_line(capsys, main(["generate", "a red circle", "-o", output.format(tmp=tmp_path)]), needle)
    assert loads == []  # refused before a model was read


def test_negative_guidance_is_refused(capsys):
    one_line(capsys, main(["generate", "a red circle", "--cfg", "-3"]), "cfg: -3", "0 or more")


def test_an_embeddings_folder_skips_what_is_not_an_embedding(tmp_path, caplog):
    pipe = Pipeline.load(None)
    width = pipe.model.text_encoder.config.hidden_size
    torch.save({"mean": torch.zeros(2, 4)}, tmp_path / "latent-cache.pt")  # a training run's cache
    from safetensors.torch import save_file

    save_file({"emb_params": torch.randn(1, width)}, str(tmp_path / "dax.safetensors"))
    assert pipe.embeddings.load_folder(tmp_path) == ["dax"]
    assert "latent-cache.pt: skipped, not an embedding" in caplog.text


def test_the_page_has_no_missing_favicon(tmp_path):
    app = create_app(ServeConfig(outputs=str(tmp_path)))
    app.state.ready.result()
    with TestClient(app) as client:
        assert client.get("/favicon.ico").status_code == 204


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["generate", "x", "--seed", "abc"], "--seed"),
        (["generate", "--cfg"], "--cfg"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_a_bad_argument_is_one_line(capsys, argv, needle):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err, err


def test_words_a_closed_vocabulary_model_never_saw_are_said(tmp_path, capsys):
    code = main(
        ["generate", "an astronaut riding a (red:1.2) circle", "--steps", "2", "-q", "-o", str(tmp_path / "a.png")]
    )
    err = capsys.readouterr().err
    assert code == 0 and "does not know: astronaut, riding" in err and "red" not in err.split("know:")[1], err
    app = create_app(ServeConfig(outputs=str(tmp_path / "out")))
    app.state.ready.result()
    with TestClient(app) as client:
        info = json.loads(
            client.post("/sdapi/v1/txt2img", json={"prompt": "a purple horse", "steps": 2}).json()["info"]
        )
        plain = json.loads(
            client.post("/sdapi/v1/txt2img", json={"prompt": "a purple star", "steps": 2}).json()["info"]
        )
    assert any("horse" in w for w in info["warnings"]) and plain["warnings"] == []


def test_a_model_trained_on_a_closed_world_keeps_its_vocabulary(base_model):
    from ldmkit.checkpoints.single_file import load_model

    vocabulary = load_model(base_model).config.vocabulary
    assert {"red", "circle", "above"} <= set(vocabulary) and "astronaut" not in vocabulary
