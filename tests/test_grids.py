"""Grids as the popular web UI makes them: its layout rule, `ldmkit generate --n-iter` with a grid next
to the images, and `ldmkit serve` saving a grid of each request of more than one image."""

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ldmkit.cli import main
from ldmkit.images import image_grid, parse_infotext, read_png_parameters
from ldmkit.server.app import ServeConfig, create_app

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (9, 9, 9)]


def tiles(n: int, size=(4, 3)) -> list[Image.Image]:
    return [Image.new("RGB", size, COLOURS[i % len(COLOURS)]) for i in range(n)]


# n images -> (rows, columns): the web UI's default (rows: sqrt(n) rounded, columns: as many as needed)
@pytest.mark.parametrize(
    "n,shape",
    [(1, (1, 1)), (2, (1, 2)), (3, (2, 2)), (4, (2, 2)), (5, (2, 3)), (6, (2, 3)), (8, (3, 3)), (10, (3, 4))],
)
def test_rows_are_the_rounded_square_root(n, shape):
    grid = image_grid(tiles(n))
    assert grid.size == (shape[1] * 4, shape[0] * 3)


def test_images_go_left_to_right_then_down_and_empty_cells_are_white():
    grid = image_grid(tiles(5))  # 2 rows of 3
    for i, colour in enumerate(COLOURS[:5]):
        assert grid.getpixel((i % 3 * 4 + 1, i // 3 * 3 + 1)) == colour
    assert grid.getpixel((2 * 4 + 1, 3 + 1)) == (255, 255, 255)


def test_rows_given_and_a_list_of_rows():
    assert image_grid(tiles(6), rows=3).size == (2 * 4, 3 * 3)
    assert image_grid(tiles(2), rows=5).size == (4, 2 * 3)  # never more rows than images
    ragged = image_grid([tiles(3), tiles(1)])  # training's sample sheets: one list per row
    assert ragged.size == (3 * 4, 2 * 3) and ragged.getpixel((5, 4)) == (255, 255, 255)


def test_smaller_images_are_centred_in_cells_of_the_largest():
    grid = image_grid([Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (2, 2), (0, 0, 255))])
    assert grid.size == (8, 4)
    assert grid.getpixel((4, 0)) == grid.getpixel((7, 3)) == (255, 255, 255)
    assert grid.getpixel((5, 1)) == grid.getpixel((6, 2)) == (0, 0, 255)


def test_training_uses_the_same_grid():
    from ldmkit.training import loop

    assert loop.image_grid is image_grid


# --- ldmkit generate ------------------------------------------------------------------------------

TINY = ["--steps", "2", "--width", "64", "--height", "64", "-q"]


def generate(capsys, *argv) -> tuple[int, dict | None, str]:
    code = main(["generate", "a red circle", *TINY, *map(str, argv)])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_n_iter_continues_the_seeds_and_writes_a_grid(tmp_path, capsys):
    code, report, err = generate(capsys, "--batch", 2, "--n-iter", 2, "--seed", 5, "-o", tmp_path / "out.png")
    assert code == 0, err
    paths = [tmp_path / f"out-{s}.png" for s in (5, 6, 7, 8)]
    assert report["seeds"] == [5, 6, 7, 8] and report["written"] == [str(p) for p in paths]
    for seed, path in zip(report["seeds"], paths):
        assert int(parse_infotext(read_png_parameters(path))[2]["Seed"]) == seed
    assert report["grid"] == str(tmp_path / "out-grid.png")
    grid = Image.open(report["grid"])
    assert grid.size == (128, 128)
    assert read_png_parameters(report["grid"]) == read_png_parameters(paths[0])
    cells = np.asarray(grid.convert("RGB"))
    for i, path in enumerate(paths):
        y, x = i // 2 * 64, i % 2 * 64
        assert np.array_equal(cells[y : y + 64, x : x + 64], np.asarray(Image.open(path).convert("RGB")))


def test_the_default_folder_holds_the_grid_and_no_grid_skips_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, report, err = generate(capsys, "--batch", 2, "--seed", 11)
    assert code == 0, err
    assert report["written"] == ["outputs/ldmkit-11.png", "outputs/ldmkit-12.png"]
    assert report["grid"] == "outputs/ldmkit-grid-11.png" and Image.open(report["grid"]).size == (128, 64)
    code, report, err = generate(capsys, "--n-iter", 2, "--seed", 21, "--no-grid")
    assert code == 0, err
    assert report["seeds"] == [21, 22] and "grid" not in report
    assert not Path("outputs/ldmkit-grid-21.png").exists()


def test_one_image_has_no_grid_and_a_random_seed_is_drawn_once(tmp_path, capsys):
    code, report, err = generate(capsys, "-o", tmp_path / "one.png")
    assert code == 0, err
    assert "grid" not in report and sorted(p.name for p in tmp_path.iterdir()) == ["one.png"]
    code, report, err = generate(capsys, "--n-iter", 3, "-o", tmp_path / "r.png")
    assert code == 0, err
    first = report["seeds"][0]
    assert report["seeds"] == [first, first + 1, first + 2]


@pytest.mark.parametrize("n", [0, -1, 65])
def test_n_iter_out_of_range_is_one_line_before_a_model_loads(n, tmp_path, capsys, monkeypatch):
    from ldmkit.pipelines import Pipeline

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(Pipeline, "load", no_load)
    code, _, err = generate(capsys, "--n-iter", n, "-o", tmp_path / "x.png")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: --n-iter") and "1 to 64" in err


# --- ldmkit serve ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs")
    app = create_app(ServeConfig(outputs=str(out)))  # the bundled default model
    app.state.ready.result()
    with TestClient(app, raise_server_exceptions=False) as c:
        c.outputs = out
        yield c


SMALL = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 2, "seed": 3}


def grids(client, kind="txt2img") -> list[Path]:
    return sorted(client.outputs.glob(f"{kind}-grids/*/grid-*.png"))


def test_the_server_saves_a_grid_of_a_request_of_several_images(client):
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "batch_size": 2})
    assert r.status_code == 200, r.text
    [grid] = grids(client)
    assert grid.name == "grid-00001.png" and Image.open(grid).size == (128, 64)
    first = json.loads(r.json()["info"])["infotexts"][0]
    assert read_png_parameters(grid) == first
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "batch_size": 2, "do_not_save_grid": True})
    assert r.status_code == 200, r.text
    r = client.post("/sdapi/v1/txt2img", json=SMALL)  # one image: no grid
    assert r.status_code == 200, r.text
    assert len(grids(client)) == 1
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "n_iter": 2})
    assert r.status_code == 200, r.text
    assert [g.name for g in grids(client)] == ["grid-00001.png", "grid-00002.png"]


def test_img2img_grids_have_their_own_folder(client):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buf, format="PNG")
    body = {**SMALL, "batch_size": 2, "init_images": [base64.b64encode(buf.getvalue()).decode()]}
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    assert len(grids(client, "img2img")) == 1
