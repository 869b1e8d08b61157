"""`ldmkit bench --quick`: the benchmark's smoke test (tiny preset; timings are not asserted, only that
every implementation ran on identical weights and agrees with ldmkit, and that the report names its
machine)."""

import json

import pytest

from ldmkit.cli import main
from ldmkit.evaluation import bench, bench_report


def test_bench_quick_compares_like_for_like(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--precision", "fp32", "--json", str(out), "-q"]) == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert report["vs"] == ["diffusers"] and report["disagreements"] == []
    r = report["results"]["fp32"]
    assert set(r) == {"unet_pair_64", "unet_pair_32", "vae_decode", "image"}
    for name in ("unet_pair_64", "unet_pair_32", "vae_decode"):
        theirs = r[name]["diffusers"]
        assert theirs["max_abs_diff"] <= 1e-4 and theirs["ratio"] > 0 and theirs["agrees"]
    # a ratio of two timings: no upper bound, a loaded machine measures its peak low
    assert r["unet_pair_64"]["tflop"] > 0 and r["unet_pair_64"]["ldmkit_peak_fraction"] > 0
    assert r["image"]["diffusers"]["mean_abs_pixel_diff"] <= 1.0 and r["image"]["ldmkit_peak_rss_mb"] > 100
    m = report["machine"]
    assert m["peak_gflops"]["fp32"] > 0 and m["diffusers"] == "0.42.1"
    assert m["cpu"] and m["threads"] >= 1 and set(m["isa"]) <= set(bench_report.ISA_FLAGS)


def test_bench_quick_vs_openvino_agrees_with_ldmkit(tmp_path, capsys):
    """OpenVINO (in the test extra, as a reference): diffusers'
    UNet and decoder converted and compiled for the CPU in f32 give ldmkit's outputs within 1e-4, and
    the whole image (diffusers' scheduler around them) within one level of 255 on average. The table
    on stderr starts with the machine."""
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--vs", "openvino", "--precision", "fp32", "--json", str(out)]) == 0
    err = capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["vs"] == ["openvino"] and report["disagreements"] == []
    # the hint read back from the compiled model: an fp32 row runs f32, whatever the CPU prefers
    assert report["peer_settings"]["fp32"]["openvino"]["inference_precision"] == "f32"
    r = report["results"]["fp32"]
    for name in ("unet_pair_64", "unet_pair_32", "vae_decode"):
        ov = r[name]["openvino"]
        assert ov["max_abs_diff"] <= 1e-4 and ov["agrees"] and ov["setup_s"] > 0 and ov["s"] > 0
        assert "diffusers" not in r[name]
    assert r["image"]["openvino"]["mean_abs_pixel_diff"] <= 1.0 and r["image"]["openvino"]["setup_s"] > 0
    assert report["machine"]["openvino"].startswith("2026.4")
    table = err[err.index("machine: ") :]
    assert report["machine"]["cpu"] in table.splitlines()[0] and "openvino" in table


@pytest.mark.parametrize(
    "vs, words",
    [
        ("diffusers,tensorrt", ["tensorrt", "unknown peer", "openvino"]),
        ("sdcpp", ["sdcpp"]),  # not with --quick (or not installed): refused either way, before any work
    ],
)
def test_bench_refuses_peers_it_cannot_run_in_one_line(capsys, vs, words):
    assert main(["bench", "--quick", "--vs", vs]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("error: --vs ")
    assert all(w in captured.err for w in words)


def test_bench_names_a_missing_peer_package(monkeypatch, capsys):
    real = bench.importlib.util.find_spec
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None if name == "openvino" else real(name))
    assert main(["bench", "--quick", "--vs", "diffusers,openvino"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "openvino package, which is not installed" in err and "ldmkit[bench]" in err


def test_bench_quick_sdxl_compares_like_for_like(tmp_path, capsys):
    """The SDXL bench's smoke test: a tiny SDXL-shaped model (addition embedding, two towers) measured
    in both implementations on identical weights and inputs."""
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "sdxl", "--quick", "--precision", "fp32", "--json", str(out), "-q"]) == 0
    capsys.readouterr()
    report = json.loads(out.read_text())
    assert (report["model"], report["image_steps"]) == ("tiny-xl", 2)
    r = report["results"]["fp32"]
    assert set(r) == {"unet_pair_64", "vae_decode", "image"}
    for name in ("unet_pair_64", "vae_decode"):
        assert r[name]["diffusers"]["max_abs_diff"] <= 1e-4
    assert r["image"]["diffusers"]["mean_abs_pixel_diff"] <= 1.0


def test_bench_quick_sd35_transformer_compares_like_for_like(tmp_path, capsys):
    """The SD3.5 bench's smoke test: a tiny transformer of SD3.5 Medium's shape (QK-norm, dual attention)
    run by both implementations on identical weights and inputs."""
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "sd3.5-medium", "--quick", "--precision", "fp32", "--json", str(out), "-q"]) == 0
    capsys.readouterr()
    report = json.loads(out.read_text())
    r = report["results"]["fp32"]
    assert report["mode"] == "sd3.5-medium-quick" and report["tflop"] > 0 and report["machine"]["cpu"]
    # the peak fraction is a ratio of two timings: on a loaded machine the peak measures low, so no upper bound
    assert r["max_abs_diff"] <= 1e-4 and r["ratio"] > 0 and r["ldmkit_peak_fraction"] > 0
    assert r["ldmkit_peak_rss_mb"] > 100 and r["diffusers_peak_rss_mb"] > 100


def test_bench_quick_unet_rows_of_ours_on_openvino(tmp_path, capsys):
    """`--rows unet` measures the UNet calls alone; `ldmkit-openvino` is ours with `--backend openvino`: the
    same outputs as ours within 1e-4, its conversion and compilation reported apart as setup."""
    pytest.importorskip("openvino")
    out = tmp_path / "bench.json"
    argv = ["bench", "--quick", "--vs", "ldmkit-openvino", "--rows", "unet", "--precision", "fp32"]
    assert main(argv + ["--json", str(out), "-q"]) == 0
    report = json.loads(out.read_text())
    r = report["results"]["fp32"]
    assert report["rows"] == "unet" and set(r) == {"unet_pair_64", "unet_pair_32"} and not report["disagreements"]
    for name in r:
        ours_ov = r[name]["ldmkit-openvino"]
        assert ours_ov["max_abs_diff"] <= 1e-4 and ours_ov["agrees"] and ours_ov["setup_s"] > 0 and ours_ov["s"] > 0
