"""What `ldmkit serve` tells its operator: the models found, the address, `ready`, one line per request
(a generation's size, steps and images with it), progress polls only with -v, never a secret or a
prompt; and the real command's console from start to Ctrl-C."""

import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.routing import Route

from ldmkit.cli import build_parser, main
from ldmkit.cli.serve import console_level
from ldmkit.server.app import Limits, ServeConfig, create_app
from ldmkit.server.console import RequestLog, address, announce_address

SMALL = {"width": 32, "height": 32, "steps": 2, "cfg_scale": 5}
SECONDS = r"\d+\.\d\d s"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    assert main(["init-model", str(path), "--seed", "0"]) == 0
    return path


@pytest.fixture
def logs(caplog, monkeypatch):
    """The server's lines as the CLI would see them (a CLI run in this process stops ldmkit's records at
    its own stderr handler; caplog listens at the root)."""
    monkeypatch.setattr(logging.getLogger("ldmkit"), "propagate", True)
    monkeypatch.setattr(logging.getLogger("ldmkit"), "handlers", [])
    caplog.set_level(logging.DEBUG, logger="ldmkit")
    return caplog


def server_lines(caplog, level=logging.DEBUG) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("ldmkit.server") and r.levelno >= level]


def app_for(model, tmp_path, **kw):
    config = ServeConfig(str(model), outputs=str(tmp_path / "out"), limits=Limits(max_pixels=128 * 128), **kw)
    app = create_app(config)
    app.state.ready.result()
    return app


def test_startup_says_models_found_then_ready(model, tmp_path, logs):
    with TestClient(app_for(model, tmp_path)):
        pass
    lines = server_lines(logs, logging.INFO)
    found = next(i for i, line in enumerate(lines) if re.search(r"\d+ models? found", line))
    assert "tiny" in lines[found]
    assert lines.index("ready") > found
    assert lines[-1] == "stopped"


def test_the_address_names_the_page_and_the_api_docs(logs):
    assert address("127.0.0.1", 7860) == "http://127.0.0.1:7860"
    assert address("::1", 8000) == "http://[::1]:8000"
    announce_address("127.0.0.1", 7860, credentials=True)
    line = server_lines(logs)[-1]
    assert "http://127.0.0.1:7860 " in line and "http://127.0.0.1:7860/docs" in line and "credentials" in line


def test_a_generation_is_one_line_with_size_steps_images_status_and_seconds(model, tmp_path, logs):
    with TestClient(app_for(model, tmp_path)) as c:
        logs.clear()
        body = {**SMALL, "prompt": "a private prompt", "batch_size": 2, "n_iter": 2}
        assert c.post("/sdapi/v1/txt2img", json=body).status_code == 200
        assert c.post("/sdapi/v1/txt2img", json={"prompt": "x"}).status_code == 200  # the model's own size, steps
        assert c.get("/sdapi/v1/options").status_code == 200
    lines = server_lines(logs, logging.INFO)
    gen = [line for line in lines if "/sdapi/v1/txt2img" in line]
    assert len(gen) == 2, lines
    assert re.fullmatch(rf"POST /sdapi/v1/txt2img 200 {SECONDS} \(32x32, 2 steps, 4 images\)", gen[0]), gen[0]
    assert re.fullmatch(rf"POST /sdapi/v1/txt2img 200 {SECONDS} \(model's size, model's steps, 1 image\)", gen[1])
    assert any(re.fullmatch(rf"GET /sdapi/v1/options 200 {SECONDS}", line) for line in lines), lines
    assert "private prompt" not in logs.text


def test_a_refused_generation_is_logged_with_its_status(model, tmp_path, logs):
    with TestClient(app_for(model, tmp_path)) as c:
        assert c.post("/sdapi/v1/txt2img", json={**SMALL, "steps": "many"}).status_code == 422
        assert (
            c.post("/sdapi/v1/txt2img", content=b"{not json", headers={"content-type": "application/json"}).status_code
            == 422
        )
    gen = [line for line in server_lines(logs, logging.INFO) if "/sdapi/v1/txt2img" in line]
    assert gen[0].startswith("POST /sdapi/v1/txt2img 422 ") and "(32x32, ? steps, 1 image)" in gen[0], gen
    assert re.fullmatch(rf"POST /sdapi/v1/txt2img 422 {SECONDS}", gen[1]), gen


def test_progress_polls_show_only_with_verbose(model, tmp_path, logs):
    with TestClient(app_for(model, tmp_path)) as c:
        logs.clear()
        for _ in range(3):
            assert c.get("/sdapi/v1/progress", params={"skip_current_image": True}).status_code == 200
        assert not [line for line in server_lines(logs, logging.INFO) if "progress" in line]
        assert len([line for line in server_lines(logs, logging.DEBUG) if "progress" in line]) == 3


def test_no_secret_query_or_control_character_reaches_the_console(model, tmp_path, logs):
    with TestClient(app_for(model, tmp_path, api_key="k3y-secret", api_auth="ann:pa55word")) as c:
        assert c.get("/sdapi/v1/options?token=query-secret", headers={"X-API-Key": "k3y-secret"}).status_code == 200
        assert c.get("/sdapi/v1/options", auth=("ann", "pa55word")).status_code == 200
        assert c.get("/sdapi/v1/options", auth=("ann", "wrong-guess")).status_code == 401
        assert c.get("/nope%0Aforged 200 line").status_code == 401
    lines = server_lines(logs)
    assert any(line.startswith("GET /sdapi/v1/options 401 ") for line in lines), lines
    for secret in ("k3y-secret", "pa55word", "wrong-guess", "query-secret", "YW5u"):
        assert secret not in logs.text
    assert all("\n" not in line for line in lines) and any("/nope%0Aforged%20200%20line" in line for line in lines)


def test_a_server_error_is_a_warning_so_quiet_still_shows_it(logs):
    def boom(request):
        raise RuntimeError("bug")

    app = RequestLog(Starlette(routes=[Route("/boom", boom)]))
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.get("/boom").status_code == 500
    (record,) = [r for r in logs.records if r.name == "ldmkit.server"]
    assert record.levelno == logging.WARNING and re.fullmatch(rf"GET /boom 500 {SECONDS}", record.getMessage())


@pytest.mark.parametrize(
    "argv,level",
    [
        (["serve"], logging.INFO),
        (["serve", "-q"], logging.WARNING),
        (["-v", "serve"], logging.DEBUG),
        (["serve", "-v"], logging.DEBUG),
    ],
)
def test_serve_shows_requests_by_default_q_quiets_v_adds_debug(argv, level):
    assert console_level(build_parser().parse_args(argv)) == level


def test_other_commands_still_show_warnings_only(model):
    assert main(["inspect", str(model)]) == 0
    assert logging.getLogger("ldmkit").level == logging.WARNING


def test_a_port_in_use_is_said_before_the_model_loads(model, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(model), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot listen on 127.0.0.1:{port}: " in err and "--port" in err and "found" not in err, err
    assert main(["serve", "--port", "70000"]) == 2
    assert "error: --port 70000: allowed: 0 (a free one) to 65535" in capsys.readouterr().err


def read_lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line.rstrip("\n"))
    into.put(None)


def wait_for(lines: queue.Queue, seen: list[str], pattern: str, timeout: float = 120) -> re.Match:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for line in seen:
            if m := re.search(pattern, line):
                return m
        try:
            line = lines.get(timeout=max(0.01, deadline - time.time()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
    raise AssertionError(f"no line matching {pattern!r} in:\n" + "\n".join(seen))


def test_the_real_command_from_start_to_ctrl_c(model, tmp_path):
    cmd = [sys.executable, "-m", "ldmkit", "serve", "--model", str(model), "--port", "0", "--outputs", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    seen: list[str] = []
    threading.Thread(target=read_lines, args=(proc.stderr, lines), daemon=True).start()
    try:
        url = wait_for(lines, seen, r"(http://127\.0\.0\.1:\d+) ").group(1)
        wait_for(lines, seen, r"ready$")
        with urllib.request.urlopen(f"{url}/sdapi/v1/options", timeout=60) as r:
            assert r.status == 200
        req = urllib.request.Request(
            f"{url}/sdapi/v1/txt2img",
            data=b'{"prompt": "a circle", "width": 32, "height": 32, "steps": 2}',
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.status == 200
        wait_for(lines, seen, rf"GET /sdapi/v1/options 200 {SECONDS}$")
        wait_for(lines, seen, rf"POST /sdapi/v1/txt2img 200 {SECONDS} \(32x32, 2 steps, 1 image\)$")
        proc.send_signal(signal.SIGINT)
        wait_for(lines, seen, r"stopped$", timeout=60)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_for(lines, seen, r"stopped$")  # the rest of stderr read
    while (line := lines.get(timeout=10)) is not None:
        seen.append(line)
    print("\n".join(seen))
    assert re.search(r"\d+ models? found", seen[0]) and "tiny" in seen[0], seen
    stamped = [re.fullmatch(r"\d\d:\d\d:\d\d (.*)", line) for line in seen]
    assert all(stamped), seen  # every line is ours, with its time; none of uvicorn's, no traceback
    assert not [m.group(1) for m in stamped if m.group(1).startswith(("error", "warning", "info"))], seen
