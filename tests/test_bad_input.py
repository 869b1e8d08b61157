"""Bad files get one clear line naming the file and what is wrong (CLI: `error: ...`, exit 2, no
traceback), and nothing on disk changes: no half-written output, no modified input."""

import hashlib
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_sd_file
from ldmkit.cli import main


def snapshot(folder):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


class Payload:
    """Pickles as a call to os.system: loading it with plain pickle would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def sd1(tmp_path):
    write_sd_file(tmp_path / "sd1.safetensors")
    return tmp_path / "sd1.safetensors"


def bad_files(folder, sd1):
    """name -> (path, words the message must contain)."""
    data = sd1.read_bytes()
    files = {}
    (folder / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    files["truncated safetensors"] = (folder / "truncated.safetensors", "truncated")
    torch.save({"state_dict": load_file(str(sd1))}, folder / "full.ckpt")
    ckpt = (folder / "full.ckpt").read_bytes()
    (folder / "full.ckpt").unlink()
    (folder / "truncated.ckpt").write_bytes(ckpt[: len(ckpt) // 2])
    files["truncated ckpt"] = (folder / "truncated.ckpt", "corrupt")
    (folder / "notes.safetensors").write_text("these are my notes, not a model\n")
    files["not a checkpoint"] = (folder / "notes.safetensors", "not a checkpoint")
    save_file({"encoder.layer.0.weight": torch.zeros(2, 2), "foo": torch.zeros(3)}, str(folder / "unknown.safetensors"))
    files["unknown layout"] = (folder / "unknown.safetensors", "unknown model layout")
    state = load_file(str(sd1))
    missing = dict(state)
    del missing["model.diffusion_model.out.0.weight"]
    save_file(missing, str(folder / "missing.safetensors"))
    files["missing key"] = (folder / "missing.safetensors", "missing weight(s) out.0.weight")
    wrong = dict(state)
    wrong["first_stage_model.decoder.norm_out.weight"] = torch.zeros(7)
    save_file(wrong, str(folder / "wrong-shape.safetensors"))
    files["wrong shape"] = (folder / "wrong-shape.safetensors", "decoder.norm_out.weight has shape (7,)")
    extra = dict(state)
    extra["model.diffusion_model.input_blocks.99.0.weight"] = torch.zeros(1)
    save_file(extra, str(folder / "extra.safetensors"))
    files["unexpected key"] = (folder / "extra.safetensors", "unexpected weight(s) input_blocks.99.0.weight")
    for ext in ("ckpt", "safetensors", "pt"):
        marker = folder / f"pwned-{ext}"
        torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Payload(marker)}, folder / f"evil.{ext}")
        files[f"pickled code (.{ext})"] = (folder / f"evil.{ext}", "posix.system")
    return files


def test_each_bad_file_gives_one_clear_line_and_changes_nothing(tmp_path, sd1, capsys):
    files = bad_files(tmp_path, sd1)
    before = snapshot(tmp_path)
    for name, (path, needle) in files.items():
        code, out, err = run_cli(capsys, "inspect", path)
        assert_one_line_error(code, err, str(path), needle)
        assert out == "", name
        dst = tmp_path / f"out-{path.stem}.safetensors"
        code, out, err = run_cli(capsys, "convert", path, dst, "--to", "single-file")
        assert_one_line_error(code, err, str(path))
        assert not dst.exists()
        code, out, err = run_cli(capsys, "convert", path, tmp_path / "out-folder", "--to", "diffusers")
        assert_one_line_error(code, err, str(path))
    assert snapshot(tmp_path) == before  # inputs untouched, no output, no temporary left behind
    assert not any(p.name.startswith("pwned") for p in tmp_path.iterdir())  # the payload never ran


def test_failed_convert_keeps_an_existing_destination(tmp_path, sd1, capsys):
    dst = tmp_path / "keep.safetensors"
    dst.write_bytes(b"previous content")
    (tmp_path / "bad.safetensors").write_bytes(sd1.read_bytes()[:1000])
    code, _, err = run_cli(capsys, "convert", tmp_path / "bad.safetensors", dst, "--to", "single-file")
    assert_one_line_error(code, err, "bad.safetensors")
    assert dst.read_bytes() == b"previous content"


def test_interrupted_write_leaves_the_old_file(tmp_path, sd1, monkeypatch):
    from ldmkit.checkpoints import files
    from ldmkit.checkpoints.single_file import load_model, save_single_file

    model = load_model(sd1)
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"old")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_single_file(model, dst)
    assert dst.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "sd1.safetensors"]


def test_missing_path_and_bad_options(tmp_path, sd1, capsys):
    code, _, err = run_cli(capsys, "inspect", tmp_path / "nope.safetensors")
    assert_one_line_error(code, err, "nope.safetensors", "no such file")
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "inspect", tmp_path / "empty")
    assert_one_line_error(code, err, "not a diffusers model")
    code, _, err = run_cli(capsys, "inspect", sd1, "--clip-skip", "0")
    assert_one_line_error(code, err, "clip_skip")
    code, _, err = run_cli(capsys, "convert", sd1, sd1, "--to", "single-file")
    assert_one_line_error(code, err, "destination is the source")


def test_console_script_exit_code_and_stderr(tmp_path):
    (tmp_path / "x.ckpt").write_text("hello")
    proc = subprocess.run(
        [sys.executable, "-m", "ldmkit", "inspect", str(tmp_path / "x.ckpt")], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == f"error: {tmp_path / 'x.ckpt'}: not a checkpoint (neither safetensors nor a PyTorch zip/pickle file)"
    )


def png_declaring(width, height):
    """A PNG of a few dozen bytes whose header declares width x height RGB pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def test_cli_images_declaring_huge_sizes_give_one_line(tmp_path, capsys):
    from PIL import Image

    bomb, big, good = tmp_path / "bomb.png", tmp_path / "big.png", tmp_path / "good.png"
    bomb.write_bytes(png_declaring(100_000, 100_000))
    big.write_bytes(png_declaring(9000, 9000))  # under Pillow's own guard, over ldmkit's limit
    Image.new("RGB", (8, 8)).save(good)
    out = tmp_path / "out.png"
    for image in (bomb, big):
        for options, option in [
            (["--init-image", image], "--init-image"),
            (["--init-image", good, "--mask", image], "--mask"),
            (["--control", f"canny:{image}"], "--control"),
            (["--from-png", image], "--from-png"),
        ]:
            code, stdout, err = run_cli(capsys, "generate", "a cat", *options, "-o", out)
            assert_one_line_error(code, err, option, str(image), "pixels")
            assert stdout == "" and not out.exists()
