"""Using video models: the files clips are written to (formats, parameters inside, atomic writes), the
`generate-video` command, and one clear line for each wrong input."""

import json

import numpy as np
import pytest
from PIL import Image
from test_svd import build, draw

from ldmkit.cli import main
from ldmkit.errors import ConfigError
from ldmkit.videos import FORMATS, frame_count, read_video_parameters, write_video


def frames(n=5, size=(48, 32)):
    rng = np.random.RandomState(0)
    return [Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("ext", sorted(FORMATS))
def test_each_format_holds_the_frames_and_the_parameters(tmp_path, ext):
    clip = frames()
    path = tmp_path / f"clip{ext}"
    text = "Steps: 25, Sampler: Euler, Seed: 7, Frames: 5, FPS: 7"
    write_video(path, clip, 7, text)
    assert frame_count(path) == 5
    assert read_video_parameters(path) == text
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_animated_png_is_lossless_and_plays_at_the_rate(tmp_path):
    clip = frames()
    write_video(tmp_path / "clip.png", clip, 8)
    with Image.open(tmp_path / "clip.png") as im:
        assert im.info["duration"] == pytest.approx(125)
        for i, original in enumerate(clip):
            im.seek(i)
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(original))


def test_mp4_frames_are_the_frames(tmp_path):
    import av

    clip = [Image.new("RGB", (64, 48), c) for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]
    write_video(tmp_path / "clip.mp4", clip, 5)
    with av.open(str(tmp_path / "clip.mp4")) as container:
        decoded = [f.to_image() for f in container.decode(video=0)]
        assert float(container.streams.video[0].average_rate) == 5
    assert len(decoded) == 3
    for a, b in zip(decoded, clip):
        assert np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean() < 4


@pytest.mark.parametrize(
    "name,clip,fps,match",
    [
        ("clip.avi", frames(), 7, r"\.avi names no video format; allowed: \.png"),
        ("clip", frames(), 7, r"\(none\) names no video format"),
        ("clip.webp", [], 7, "no frames"),
        ("clip.gif", frames(2) + frames(1, (32, 32)), 7, "different sizes"),
        ("clip.mp4", frames(2, (33, 32)), 7, "even sides"),
        ("clip.png", frames(), 0, "fps: 0"),
    ],
)
def test_bad_clips_are_refused_in_one_line(tmp_path, name, clip, fps, match):
    with pytest.raises(ConfigError, match=match):
        write_video(tmp_path / name, clip, fps)
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def svd_folder(tmp_path_factory):
    spec = draw(3)
    folder = tmp_path_factory.mktemp("svd") / "model"
    build(spec, folder)
    return folder


@pytest.fixture
def start_image(tmp_path):
    path = tmp_path / "start.png"
    frames(1, (80, 64))[0].save(path)
    return path


def test_generate_video_writes_the_clip_with_its_parameters(svd_folder, start_image, tmp_path, capsys):
    out = tmp_path / "clip.gif"
    args = ["generate-video", str(start_image), "--model", str(svd_folder), "--frames", "3", "--steps", "2"]
    code = main([*args, "--width", "32", "--height", "32", "--seed", "11", "--fps", "6", "-o", str(out), "-q"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {"written": [str(out)], "seeds": [11]}
    assert frame_count(out) == 3
    text = read_video_parameters(out)
    for entry in ("Steps: 2", "Seed: 11", "Frames: 3", "FPS: 6", "Motion bucket id: 127", "Size: 32x32"):
        assert entry in text


def test_a_batch_writes_one_file_per_seed(svd_folder, start_image, tmp_path, capsys):
    out = tmp_path / "clip.webp"
    args = ["generate-video", str(start_image), "--model", str(svd_folder), "--frames", "2", "--steps", "1"]
    assert main([*args, "--width", "32", "--height", "32", "--seed", "3", "--batch", "2", "-o", str(out), "-q"]) == 0
    written = json.loads(capsys.readouterr().out)["written"]
    assert written == [str(tmp_path / "clip-3.webp"), str(tmp_path / "clip-4.webp")]
    assert all(frame_count(p) == 2 for p in written)


def error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_video_input_is_one_line(svd_folder, start_image, tmp_path, tiny_pipe, capsys):
    base = ["generate-video", str(start_image), "--model", str(svd_folder)]
    assert "frames: 0; allowed: 1 or more" in error_line(capsys, [*base, "--frames", "0"])
    assert "frames: 1000; allowed: 1 to" in error_line(capsys, [*base, "--frames", "1000"])
    assert ".avi names no video format" in error_line(capsys, [*base, "-o", str(tmp_path / "x.avi")])
    assert "motion_bucket: 5000" in error_line(capsys, [*base, "--motion-bucket", "5000"])
    assert "noise_aug: -1" in error_line(capsys, [*base, "--noise-aug", "-1"])
    assert "width: 33; allowed: a multiple of" in error_line(capsys, [*base, "--width", "33", "-q"])
    no_image = ["generate-video", "a red circle", "--model", str(svd_folder)]
    assert "makes video from an image: give an image file" in error_line(capsys, no_image)
    image_model = ["generate-video", str(start_image), "--model", str(tiny_pipe[1])]
    assert "not a video model" in error_line(capsys, image_model)
    video_as_image = ["generate", "a cat", "--model", str(svd_folder)]
    assert "a video model (Stable Video Diffusion" in error_line(capsys, video_as_image)
    assert not (tmp_path / "x.avi").exists()


@pytest.fixture(scope="module")
def video_client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from conftest import write_tiny_video_model
    from ldmkit.server.app import ServeConfig, create_app

    folder = tmp_path_factory.mktemp("video-server")
    video = write_tiny_video_model(folder / "video", frames=3)
    assert main(["init-model", str(folder / "tiny.safetensors")]) == 0
    config = ServeConfig(str(folder / "tiny.safetensors"), outputs=str(folder / "out"), video_models=[str(video)])
    app = create_app(config)
    app.state.ready.result()
    with TestClient(app) as client:
        yield client, folder


def test_the_video_route_answers_a_clip_with_its_parameters(video_client, tmp_path):
    import base64

    client, folder = video_client
    assert client.get("/ldmkit/info").json()["video_models"] == ["video"]
    body = {"prompt": "a blue square moving up", "num_frames": 4, "steps": 2, "seed": 9, "format": "gif"}
    r = client.post("/ldmkit/v1/video", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert (answer["seed"], answer["frames"], answer["format"]) == (9, 4, "gif")
    (tmp_path / "clip.gif").write_bytes(base64.b64decode(answer["video"]))
    assert frame_count(tmp_path / "clip.gif") == 4
    assert read_video_parameters(tmp_path / "clip.gif") == answer["parameters"]
    assert answer["parameters"].startswith("a blue square moving up\n") and "Seed: 9" in answer["parameters"]
    assert len(list((folder / "out" / "video").glob("*/*.gif"))) == 1


@pytest.mark.parametrize(
    "body,status,detail",
    [
        ({"prompt": "x", "format": "avi"}, 422, "format 'avi'; allowed: webp, gif, png, mp4"),
        ({"prompt": "x", "num_frames": 1000}, 422, "num_frames: 1000; allowed: at most 32"),
        ({"prompt": "x", "num_frames": 0}, 422, "frames: 0; allowed: 1 or more"),
        ({"prompt": "x", "steps": 10**6}, 422, "steps: 1000000; allowed: at most 150"),
        ({"prompt": "x", "width": 4096, "height": 4096}, 422, "allowed: at most 1048576 pixels"),
        ({"prompt": "x", "frame_count": 3}, 422, "frame_count: Extra inputs are not permitted"),
        ({"prompt": "x", "model": "nope"}, 404, "video model 'nope': not offered; offered: video"),
        ({"prompt": "x", "image": "not base64!"}, 422, "image"),
        ({"prompt": "x", "fps": -3}, 422, "fps: -3; allowed: 1 to"),
        ({"prompt": "x" * 5000}, 422, "prompt: longer than 4000 characters"),
    ],
)
def test_bad_video_requests_are_one_line(video_client, body, status, detail):
    client, _ = video_client
    r = client.post("/ldmkit/v1/video", json=body)
    assert r.status_code == status, r.text
    assert detail in r.json()["detail"] and "\n" not in r.json()["detail"]


def test_an_image_for_a_text_model_is_refused(video_client):
    import base64
    import io

    client, _ = video_client
    buf = io.BytesIO()
    frames(1)[0].save(buf, format="PNG")
    r = client.post("/ldmkit/v1/video", json={"image": base64.b64encode(buf.getvalue()).decode(), "steps": 1})
    assert r.status_code == 422 and "makes video from a prompt, not from an image" in r.json()["detail"]


def test_inspect_and_models_name_a_video_model(svd_folder, capsys):
    assert main(["inspect", str(svd_folder)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "svd" and info["kind"] == "image-to-video" and info["parameters"]["temporal_layers"] > 0
    assert main(["models", "--json", str(svd_folder.parent)]) == 0
    (entry,) = json.loads(capsys.readouterr().out)["folders"][0]["entries"]
    assert (entry["kind"], entry["family"]) == ("video-model", "svd")


@pytest.mark.parametrize(
    "reader,cfg,match",
    [
        (
            "unet",
            {
                "down_block_types": ["CrossAttnDownBlockSpatioTemporal"],
                "up_block_types": ["UpBlockSpatioTemporal"],
                "block_out_channels": [32],
            },
            "do not mirror",
        ),
        (
            "unet",
            {"down_block_types": ["DownBlock3D"], "up_block_types": ["UpBlock3D"], "block_out_channels": [32]},
            "down block type 'DownBlock3D'",
        ),
        (
            "unet",
            {
                "cross_attention_dim": [16, 32],
                "block_out_channels": [32, 64],
                "down_block_types": ["DownBlockSpatioTemporal"] * 2,
                "up_block_types": ["UpBlockSpatioTemporal"] * 2,
            },
            "one width for every level",
        ),
        ("unet", {"num_attention_heads": "many"}, "num_attention_heads='many'"),
        ("vae", {"layers_per_block": 3}, "layers_per_block=3; a temporal decoder is read at 2 only"),
        ("vae", {"down_block_types": ["DownEncoderBlock3D"]}, "DownEncoderBlock3D"),
    ],
)
def test_video_configs_diffusers_cannot_mean_are_refused_by_name(reader, cfg, match):
    from ldmkit.checkpoints.svd_configs import temporal_vae_config_from_diffusers, video_unet_config_from_diffusers
    from ldmkit.errors import CheckpointError

    read = video_unet_config_from_diffusers if reader == "unet" else temporal_vae_config_from_diffusers
    with pytest.raises(CheckpointError, match=match):
        read(cfg, "config.json")


def test_a_video_file_with_weights_no_part_holds_is_refused(svd_folder, tmp_path):
    import torch
    from safetensors.torch import save_file

    from ldmkit.checkpoints.svd_file import load_svd_file
    from ldmkit.checkpoints.video_files import load_video_model
    from ldmkit.errors import CheckpointError

    marker = "model.diffusion_model.input_blocks.1.0.time_stack.in_layers.0.weight"
    save_file({marker: torch.ones(4), "stray.weight": torch.ones(2)}, tmp_path / "odd.safetensors")
    with pytest.raises(CheckpointError, match="weights no video model part holds: stray.weight"):
        load_svd_file(tmp_path / "odd.safetensors")
    save_file({"foo.weight": torch.ones(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not a video model"):
        load_video_model(tmp_path / "other.safetensors")
