"""`ldmkit bench --quick`: the benchmark's smoke test (tiny preset; timings are not asserted, only that
both implementations ran on identical weights and agree)."""

import json

from ldmkit.cli import main


def test_bench_quick_compares_like_for_like(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--precision", "fp32", "--json", str(out), "-q"]) == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    r = report["results"]["fp32"]
    assert set(r) == {"unet_pair_64", "unet_pair_32", "vae_decode", "image"}
    for name in ("unet_pair_64", "unet_pair_32", "vae_decode"):
        assert r[name]["max_abs_diff"] <= 1e-4 and r[name]["ratio"] > 0
    assert r["unet_pair_64"]["tflop"] > 0 and 0 < r["unet_pair_64"]["ldmkit_peak_fraction"] < 1
    assert r["image"]["mean_abs_pixel_diff"] <= 1.0 and r["image"]["ldmkit_peak_rss_mb"] > 100
    assert report["peak_gflops"]["fp32"] > 0 and report["machine"]["diffusers"] == "0.42.1"


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
    assert r["unet_pair_64"]["max_abs_diff"] <= 1e-4 and r["vae_decode"]["max_abs_diff"] <= 1e-4
    assert r["image"]["mean_abs_pixel_diff"] <= 1.0


def test_bench_quick_sd35_transformer_compares_like_for_like(tmp_path, capsys):
    """The SD3.5 bench's smoke test: a tiny transformer of SD3.5 Medium's shape (QK-norm, dual attention)
    run by both implementations on identical weights and inputs."""
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "sd3.5-medium", "--quick", "--precision", "fp32", "--json", str(out), "-q"]) == 0
    capsys.readouterr()
    report = json.loads(out.read_text())
    r = report["results"]["fp32"]
    assert report["mode"] == "sd3.5-medium-quick" and report["tflop"] > 0
    assert r["max_abs_diff"] <= 1e-4 and r["ratio"] > 0 and 0 < r["ldmkit_peak_fraction"] < 1
    assert r["ldmkit_peak_rss_mb"] > 100 and r["diffusers_peak_rss_mb"] > 100
