"""The web page in a real browser: Debian's headless Chromium driven by Playwright. It opens the page,
enters a prompt, generates, sees the progress and the image appear, and reuses the settings; with a
tiny decoder, it sees the TAESD live preview before the final image. The screenshot is kept in
artifacts/ (not in git). .ci/run installs Chromium and sets LDMKIT_REQUIRE_BROWSER=1, so there the test
cannot be skipped."""

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from ldmkit.cli import main

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ARTIFACTS = Path(__file__).parent.parent / "artifacts"

if not Path(CHROMIUM).exists() and not os.environ.get("LDMKIT_REQUIRE_BROWSER"):
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)


def serve(config):
    """A real uvicorn server for `config` on a free port: (url, stop)."""
    import uvicorn

    from ldmkit.server.app import create_app

    app = create_app(config)
    app.state.ready.result()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)

    def stop():
        srv.should_exit = True
        thread.join(30)

    return f"http://127.0.0.1:{port}", stop


def ready_page(playwright, url: str):
    """(browser, page): Chromium on the page, once it says it is ready."""
    from playwright.sync_api import expect

    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
    page = browser.new_page()
    page.goto(url)
    expect(page.get_by_test_id("status")).to_have_text("ready", timeout=30000)
    return browser, page


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from conftest import write_tiny_decoder
    from ldmkit.server.app import ServeConfig

    folder = tmp_path_factory.mktemp("browser")
    assert main(["init-model", str(folder / "tiny.safetensors")]) == 0
    tiny = str(write_tiny_decoder(folder / "mine.safetensors"))
    url, stop = serve(ServeConfig(str(folder / "tiny.safetensors"), outputs=str(folder / "out"), tiny_decoder=tiny))
    yield url
    stop()


def test_the_page_untouched_draws_what_the_cli_draws(tmp_path):
    """A newcomer's first image from the page, changing nothing but the prompt and the seed: the bundled
    default model's own settings, and the very image `ldmkit generate` makes with no options."""
    import base64
    import io

    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    from ldmkit.server.app import ServeConfig

    assert main(["generate", "a red circle", "--seed", "3", "-q", "-o", str(tmp_path / "cli.png")]) == 0
    cli = Image.open(tmp_path / "cli.png")
    url, stop = serve(ServeConfig(outputs=str(tmp_path / "out")))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page()
            page.goto(url)
            expect(page.get_by_test_id("status")).to_have_text("ready", timeout=30000)
            expect(page.get_by_test_id("decode-method")).to_be_hidden()  # no tiny decoder: no TAESD offered
            assert page.locator("#show_progress_type option[value=TAESD]").count() == 0
            page.get_by_test_id("prompt").fill("a red circle")
            page.get_by_test_id("seed").fill("3")
            page.get_by_test_id("generate").click()
            item = page.get_by_test_id("gallery").locator(".item").first
            expect(item.locator("img")).to_be_visible(timeout=60000)
            src = item.locator("img").get_attribute("src")
            text = item.locator("pre").inner_text()
            browser.close()
    finally:
        stop()
    image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert text.strip() == cli.info["parameters"].strip()
    assert image.convert("RGB").tobytes() == cli.convert("RGB").tobytes()


def test_generate_from_the_page(server):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        page.goto(server)
        expect(page.get_by_test_id("status")).to_have_text("ready", timeout=30000)
        assert page.locator("#width").input_value() == "64"  # the model's own size
        page.get_by_test_id("prompt").fill("a blue square")
        page.locator("#steps").fill("40")  # long enough to watch the progress
        page.get_by_test_id("generate").click()
        expect(page.get_by_test_id("status")).to_contain_text("step ", timeout=30000)
        expect(page.get_by_test_id("preview").locator("img")).to_be_visible(timeout=30000)
        item = page.get_by_test_id("gallery").locator(".item").first
        expect(item.locator("img")).to_be_visible(timeout=60000)
        expect(page.get_by_test_id("status")).to_contain_text("done: seed", timeout=5000)
        used = item.get_by_test_id("used-seed").inner_text()
        assert page.get_by_test_id("seed").input_value() == "-1"
        assert "a blue square" in item.locator("pre").inner_text()
        item.get_by_test_id("reuse").click()
        assert page.get_by_test_id("seed").input_value() == used  # the seed actually used, now fixed
        assert page.get_by_test_id("error").inner_text() == ""
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "browser.png"), full_page=True)
        browser.close()


# The order in which the page first shows a live preview and a final image, as the DOM changes.
SEEN_ORDER = """
window.seen = [];
new MutationObserver(() => {
  const note = (what, found) => { if (found && !window.seen.includes(what)) window.seen.push(what); };
  note("preview", document.querySelector("#preview img"));
  note("final", document.querySelector("#gallery .item img"));
}).observe(document, {childList: true, subtree: true});
"""


def test_the_tiny_decoder_previews_then_decodes_from_the_page(server):
    """With a tiny decoder the page offers TAESD (the web UI's name) for the live preview and the final
    decode: the TAESD preview shows before the final image, which says TAESD decoded it."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        page.add_init_script(SEEN_ORDER)
        sent = []
        page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/sdapi/v1/txt2img") else None)
        page.goto(server)
        expect(page.get_by_test_id("status")).to_have_text("ready", timeout=30000)
        page.get_by_test_id("preview-method").select_option("TAESD")
        page.get_by_test_id("decode-method").select_option("TAESD")
        page.locator("#steps").fill("60")  # long enough for a few progress polls
        page.get_by_test_id("generate").click()
        item = page.get_by_test_id("gallery").locator(".item").first
        expect(item.locator("img")).to_be_visible(timeout=60000)
        assert page.evaluate("window.seen") == ["preview", "final"]
        assert "VAE Decoder: TAESD" in item.locator("pre").inner_text()
        assert page.get_by_test_id("error").inner_text() == ""
        browser.close()
    settings = sent[0]["override_settings"]
    assert settings["show_progress_type"] == "TAESD" and settings["sd_vae_decode_method"] == "TAESD"


def test_an_image_prompt_from_the_page(tmp_path):
    """With an IP-Adapter offered, the page shows its picker; an uploaded prompt image is sent as the
    ControlNet extension's IP-Adapter unit and the image's parameters name the adapter."""
    import random

    from playwright.sync_api import expect, sync_playwright
    from test_ip_adapter import draw_adapter, make_adapter, prompt_image, save_adapter, write_tower

    from ldmkit.pipelines import Pipeline
    from ldmkit.server.app import ServeConfig

    assert main(["init-model", str(tmp_path / "tiny.safetensors")]) == 0
    unet = Pipeline.load(tmp_path / "tiny.safetensors").model.unet
    spec = draw_adapter(random.Random(1), "plus")
    encoder = write_tower(spec, tmp_path / "adapters" / "image_encoder", 1)
    save_adapter(make_adapter(spec, unet, encoder, 2), tmp_path / "adapters" / "style.safetensors")
    prompt_image(7).save(tmp_path / "prompt.png")
    config = ServeConfig(
        str(tmp_path / "tiny.safetensors"),
        outputs=str(tmp_path / "out"),
        ip_adapters=[str(tmp_path / "adapters" / "style.safetensors")],
    )
    url, stop = serve(config)
    try:
        with sync_playwright() as p:
            browser, page = ready_page(p, url)
            page.locator("#ip_section summary").click()
            page.get_by_test_id("ip-image").set_input_files(str(tmp_path / "prompt.png"))
            page.get_by_test_id("prompt").fill("a red circle")
            page.locator("#steps").fill("4")
            page.get_by_test_id("generate").click()
            item = page.get_by_test_id("gallery").locator(".item").first
            expect(item.locator("img")).to_be_visible(timeout=60000)
            text = item.locator("pre").inner_text()
            assert page.get_by_test_id("error").inner_text() == ""
            browser.close()
    finally:
        stop()
    assert 'IP-Adapter 0: "Model: style, Weight: 0.6' in text


def test_a_video_from_the_page(tmp_path):
    """With a video model offered, the page shows its section; the prompt makes a clip that plays in the gallery
    with its parameters."""
    from playwright.sync_api import expect, sync_playwright

    from conftest import write_tiny_video_model
    from ldmkit.server.app import ServeConfig

    video = write_tiny_video_model(tmp_path / "video", frames=3)
    assert main(["init-model", str(tmp_path / "tiny.safetensors")]) == 0
    config = ServeConfig(str(tmp_path / "tiny.safetensors"), outputs=str(tmp_path / "out"), video_models=[str(video)])
    url, stop = serve(config)
    try:
        with sync_playwright() as p:
            browser, page = ready_page(p, url)
            page.locator("#video_section summary").click()
            expect(page.get_by_test_id("video-model")).to_have_value("video")
            page.get_by_test_id("prompt").fill("a red circle moving right")
            page.get_by_test_id("num-frames").fill("4")
            page.get_by_test_id("make-video").click()
            item = page.get_by_test_id("gallery").locator("[data-testid=video-item]").first
            expect(item.locator("img")).to_be_visible(timeout=60000)
            width = item.locator("img").evaluate("img => img.naturalWidth")  # the browser decoded the clip
            text = item.locator("pre").inner_text()
            assert page.get_by_test_id("error").inner_text() == ""
            browser.close()
    finally:
        stop()
    assert width == 64
    assert text.startswith("a red circle moving right") and "Frames: 4" in text
    assert len(list((tmp_path / "out" / "video").glob("*/*.webp"))) == 1
