"""A model's own settings (size, steps, guidance, sampler) are what every interface uses when a request
leaves them out: the CLI, the Python API, the web UI's API and the page give the same image for the
same seed with no options at all."""

import base64
import io
import json

from fastapi.testclient import TestClient
from PIL import Image

from ldmkit.bundled import BUNDLED, DEFAULT
from ldmkit.cli import main
from ldmkit.pipelines import Pipeline
from ldmkit.server.app import ServeConfig, create_app


def test_no_options_means_the_models_own_settings_everywhere(tmp_path, capsys):
    own = BUNDLED[DEFAULT].defaults
    python = Pipeline.load(None)("a red circle", seed=3)
    assert (python.params.steps, python.params.cfg, python.params.sampler) == (own["steps"], own["cfg"], own["sampler"])

    assert main(["generate", "a red circle", "--seed", "3", "-o", str(tmp_path / "cli.png"), "-q"]) == 0
    capsys.readouterr()
    cli = Image.open(tmp_path / "cli.png")
    assert cli.info["parameters"] == python.infotexts[0] and cli.tobytes() == python.images[0].tobytes()

    app = create_app(ServeConfig(outputs=str(tmp_path / "outputs")))
    app.state.ready.result()
    with TestClient(app) as client:
        page = client.get("/ldmkit/info").json()
        answer = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "seed": 3})
        other = client.get("/ldmkit/info", params={"model": "emoji"}).json()
    size = python.params.width
    assert page["image_size"] == size and (page["steps"], page["cfg_scale"]) == (own["steps"], own["cfg"])
    assert page["sampler_name"] == "Euler a" == json.loads(answer.json()["info"])["sampler_name"]
    assert (other["steps"], other["cfg_scale"]) == (
        BUNDLED["emoji"].defaults["steps"],
        BUNDLED["emoji"].defaults["cfg"],
    )
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (size, size, own["steps"], own["cfg"])
    assert info["infotexts"][0] == python.infotexts[0]
    sent = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
    assert sent.tobytes() == python.images[0].tobytes()
