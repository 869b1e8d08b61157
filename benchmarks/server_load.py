"""The server's memory under hostile uploads, and its status routes under a full queue
(docs/server-hardening.md). Prints JSON.

    python benchmarks/server_load.py [--model MODEL] [--port PORT] [--bursts N]

Starts `python -m ldmkit serve` in a subprocess with its default limits (a tiny random model made with
`ldmkit init-model` unless --model is given), records its idle resident memory, then:

1. posts four img2img requests at once, each carrying a PNG of 83 bytes whose header declares
   13000x13000 RGBA pixels (676 MB decoded): the server must refuse each from its header (422);
2. posts four img2img requests at once, each carrying a 2048x2048 PNG of noise (12 MB decoded, a 17 MB
   body): the largest image the default limits allow, decoded on the worker one at a time (N bursts,
   the resident memory after each); then the same four images to png-info (decoded on the request
   threads, no job);
3. fills the queue (one job running, --max-queue waiting), checks one more is refused (503), and times the
   status routes (progress, interrupt, options) while the queue is full.

The peak of each phase is the kernel's VmHWM of the server process (reset before the phase through
/proc/PID/clear_refs) and, as a cross-check, the highest VmRSS read every 10 ms."""

import argparse
import base64
import datetime
import io
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def declared_png(width: int, height: int) -> bytes:
    """PNG signature, an IHDR declaring width x height RGBA pixels, a small IDAT, IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 4096))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + chunk(b"IEND", b"")


def noise_png(size: int) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of the process, in MB."""
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v.split()[0]) / 1024 for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")}


class Peak:
    """The peak resident memory of a process over a phase: VmHWM reset at the start, and VmRSS polled."""

    def __init__(self, pid: int):
        self.pid = pid

    def __enter__(self):
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        self.polled = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.polled = max(self.polled, status(self.pid)["VmRSS"])
            self.samples += 1
            time.sleep(0.01)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.hwm = status(self.pid)["VmHWM"]


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    import httpx

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="default: a tiny random model made with `ldmkit init-model`")
    ap.add_argument("--port", type=int, default=0, help="default: a free port")
    ap.add_argument("--bursts", type=int, default=4, help="bursts of four large img2img uploads (RSS after each)")
    args = ap.parse_args()
    report = {
        "command": " ".join(["python", "benchmarks/server_load.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg()[0],
    }
    work = Path(tempfile.mkdtemp(prefix="server_load-"))
    model = args.model
    if model is None:
        model = str(work / "tiny.safetensors")
        subprocess.run(
            [sys.executable, "-m", "ldmkit", "init-model", model, "--seed", "0"], check=True, capture_output=True
        )
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "ldmkit", "serve", "--model", model, "--port", str(port), "--outputs", str(work)]
    report["server"] = " ".join(["python", *command[1:]]).replace(str(work), "TMP")
    log = (work / "server.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise SystemExit((work / "server.log").read_text())
            try:
                if httpx.get(f"{url}/sdapi/v1/options", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server was not ready in 300 s")
            time.sleep(0.2)
        report["rss_after_start_mb"] = round(status(server.pid)["VmRSS"])
        small = {"prompt": "a red circle", "width": 32, "height": 32, "steps": 1, "seed": 1}
        png32 = base64.b64encode(noise_png(32)).decode()
        with httpx.Client(base_url=url, timeout=600) as http:
            for body in (small, {**small, "init_images": [png32]}):  # warm-up: both routes once
                http.post(f"/sdapi/v1/{'img2img' if 'init_images' in body else 'txt2img'}", json=body)
            time.sleep(1)
            idle = status(server.pid)["VmRSS"]
            report["idle_rss_mb"] = round(idle)

            def phase(image_b64: str, route: str = "img2img") -> dict:
                body = {**small, "init_images": [image_b64], "denoising_strength": 0.5}
                if route == "png-info":
                    body = {"image": image_b64}
                before = status(server.pid)["VmRSS"]
                with Peak(server.pid) as peak, ThreadPoolExecutor(4) as pool:
                    start = time.perf_counter()
                    answers = list(pool.map(lambda _: http.post(f"/sdapi/v1/{route}", json=body), range(4)))
                    seconds = time.perf_counter() - start
                return {
                    "statuses": [r.status_code for r in answers],
                    "response_bytes": max(len(r.content) for r in answers),
                    "detail": answers[0].json().get("detail") if answers[0].status_code != 200 else None,
                    "seconds": round(seconds, 2),
                    "peak_rss_mb": round(peak.hwm),
                    "peak_over_idle_mb": round(peak.hwm - idle),
                    "rss_before_mb": round(before),
                    "peak_over_rss_before_mb": round(peak.hwm - before),
                    "rss_after_mb": round(status(server.pid)["VmRSS"]),
                    "polled_peak_rss_mb": round(peak.polled),
                    "polls": peak.samples,
                }

            bomb = declared_png(13000, 13000)
            report["hostile_13000x13000_header"] = {"upload_bytes": len(bomb), **phase(base64.b64encode(bomb).decode())}
            large = noise_png(2048)
            report["large_2048x2048_noise"] = {
                "upload_bytes": len(large),
                **phase(base64.b64encode(large).decode()),
            }
            rss_after_bursts = [report["large_2048x2048_noise"]["rss_after_mb"]]
            for _ in range(args.bursts - 1):  # does what the allocator keeps grow with every burst?
                rss_after_bursts.append(phase(base64.b64encode(large).decode())["rss_after_mb"])
            report["large_2048x2048_noise"]["rss_after_each_burst_mb"] = rss_after_bursts
            # the same four uploads to png-info: decoded on the request threads (two at a time), no job, no echo
            report["large_2048x2048_noise_png_info"] = phase(base64.b64encode(large).decode(), "png-info")
            del large
            report["full_queue"] = full_queue(http, server.pid)
            report["rss_end_mb"] = round(status(server.pid)["VmRSS"])
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    report["server_log_tracebacks"] = (work / "server.log").read_text().count("Traceback")
    report["load_average_at_end"] = os.getloadavg()[0]
    print(json.dumps(report, indent=1))


def full_queue(http, pid: int) -> dict:
    """Jobs submitted one after another (each queued before the next) until one is refused: then one job
    runs and the queue is full. The slowest answer of each status route meanwhile."""
    body = {"prompt": "a", "width": 64, "height": 64, "steps": 50, "seed": 1}  # seconds each
    threads, answers = [], {}

    def post(i: int) -> None:
        answers[i] = http.post("/sdapi/v1/txt2img", json={**body, "force_task_id": f"task(fill-{i})"})

    for i in range(200):
        threads.append(threading.Thread(target=post, args=(i,)))
        threads[-1].start()
        while i not in answers:
            p = http.get("/sdapi/v1/progress", params={"id_task": f"task(fill-{i})", "skip_current_image": "true"})
            if p.json()["queue_position"] is not None:
                break
            time.sleep(0.005)
        if i in answers and answers[i].status_code == 503:
            break
    beyond = answers[i]
    waiting = http.get("/sdapi/v1/progress", params={"skip_current_image": "true"}).json()["queue_pending"]
    times: dict[str, list[float]] = {}
    routes = [
        ("GET /sdapi/v1/progress", "GET", "/sdapi/v1/progress", {"skip_current_image": "true"}),
        ("GET /sdapi/v1/progress (with preview)", "GET", "/sdapi/v1/progress", {}),
        ("GET /sdapi/v1/options", "GET", "/sdapi/v1/options", {}),
        ("GET /sdapi/v1/sd-models", "GET", "/sdapi/v1/sd-models", {}),
    ]
    with Peak(pid) as peak:
        for name, method, path, params in routes * 10 + [
            ("POST /sdapi/v1/interrupt", "POST", "/sdapi/v1/interrupt", {})
        ]:
            start = time.perf_counter()
            r = http.request(method, path, params=params)
            times.setdefault(name, []).append(time.perf_counter() - start)
            assert r.status_code == 200, (name, r.status_code, r.text)
    while any(t.is_alive() for t in threads):  # drain: each job stops at its first step
        http.post("/sdapi/v1/interrupt")
        time.sleep(0.05)
    for t in threads:
        t.join()
    return {
        "jobs_submitted": len(threads),
        "waiting_when_measured": waiting,
        "one_more": {"status": beyond.status_code, "retry_after": beyond.headers.get("retry-after")},
        "slowest_s": {k: round(max(v), 4) for k, v in times.items()},
        "median_s": {k: round(sorted(v)[len(v) // 2], 4) for k, v in times.items()},
        "statuses": sorted({a.status_code for a in answers.values()}),
        "peak_rss_mb": round(peak.hwm),
    }


if __name__ == "__main__":
    main()
