"""The one training loop: steps, logging, checkpoints, resume, NaN guard. What is trained lives in
a Task (training/autoencoder.py, and the latent tasks on training/latent_task.py), which the loop calls
through train_step(step, indices, lr) -> logged values, evaluate, sample, finish, state_dict,
load_state_dict and, when it has one, prepare(progress, stopping) before the first step.

A run is a pure function of its config: global batch b holds global samples b*B .. (b+1)*B - 1 and
every random draw of sample g comes from its own generator (data/images.py), so a resumed run
continues exactly where it stopped. Checkpoints hold the task (models, EMA, optimisers) and the step;
they are written atomically, the last K and the best are kept, and they load with
torch.load(weights_only=True)."""

import csv
import json
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ldmkit.checkpoints.files import atomic_write, write_json
from ldmkit.errors import ConfigError, Stopped, TrainingError
from ldmkit.images import image_grid as image_grid  # the training tasks take it from here
from ldmkit.training import distributed as dist

log = logging.getLogger(__name__)
LINE_END = "\n"  # the csv module's default is \r\n; every file a run writes ends its lines with \n


@dataclass
class RunConfig:
    dir: str = "runs/run"
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 500
    sample_every: int = 500
    ckpt_every: int = 500
    keep_last: int = 2
    threads: int = 0  # 0: torch's default
    # bf16: forward passes under bf16 autocast (weights, gradients and the optimiser stay fp32), the
    # autoencoder's in channels-last too -- about 3x faster for it on CPUs with AMX / AVX-512 BF16.
    precision: str = "fp32"

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"run.precision: {self.precision!r}; allowed: fp32, bf16")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"run.batch_size {self.batch_size} is not a multiple of run.grad_accum {self.grad_accum}")
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "log_every",
            "eval_every",
            "sample_every",
            "ckpt_every",
            "keep_last",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"run.{name}: {getattr(self, name)}; allowed: 1 or more")

    def autocast(self):
        """The forward passes' precision (a context manager; fp32: nothing changes)."""
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.precision == "bf16" else torch.contiguous_format

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then constant."""
        return self.lr * min(1.0, (step + 1) / max(1, self.warmup))


class Trainer:
    def __init__(self, task, run: RunConfig, resume: bool = False, config_record: dict | None = None):
        self.task, self.run = task, run
        self.dir = Path(run.dir).expanduser()
        self.ckpt_dir = self.dir / "checkpoints"
        self.step, self.best = 0, None
        self.main = dist.rank() == 0
        existing = sorted(self.ckpt_dir.glob("step-*.pt"))
        if resume:
            if not existing:
                raise ConfigError(f"--resume: no checkpoint in {self.ckpt_dir}")
            self._load(existing[-1])
            if self.step > run.steps:  # finishing now would label later weights as this step's
                raise ConfigError(f"run.steps {run.steps}: the run in {self.dir} is already at step {self.step}")
        elif existing:
            raise ConfigError(
                f"{self.dir} already holds checkpoints: pass --resume to continue, or choose a new run.dir"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir.mkdir(exist_ok=True)
        if config_record is not None and self.main:
            write_json(self.dir / "config.json", config_record)
        self._columns: list[str] | None = None  # loss.csv's header, once read or written
        if self.main:
            self._trim_logs()

    # --- checkpoints -------------------------------------------------------------------------------
    def _load(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.task.load_state_dict(state["task"])
        self.step, self.best = int(state["step"]), state.get("best")
        log.info("resumed from %s at step %d", path, self.step)

    def ckpt_path(self, step: int) -> Path:
        return self.ckpt_dir / f"step-{step:08d}.pt"

    def save(self) -> Path:
        state = {"step": self.step, "best": self.best, "task": self.task.state_dict()}
        path = self.ckpt_path(self.step)
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        keep = {p.name for p in sorted(self.ckpt_dir.glob("step-*.pt"))[-self.run.keep_last :]}
        for p in self.ckpt_dir.glob("step-*.pt"):
            if p.name not in keep:
                p.unlink()
        return path

    # --- log -----------------------------------------------------------------------------------------
    # loss.csv (a header, then one row per step) and metrics.jsonl (one JSON object per evaluation), both
    # with \n line ends: a resumed run's files are byte for byte an uninterrupted run's.
    @property
    def log_path(self) -> Path:
        return self.dir / "loss.csv"

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    def _read_log(self) -> list[list[str]]:
        if not self.log_path.exists():
            return []
        with open(self.log_path, newline="") as f:
            return list(csv.reader(f))

    def _write_log(self, rows: list[list[str]]) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                csv.writer(f, lineterminator=LINE_END).writerows(rows)

        atomic_write(self.log_path, write)

    def _trim_logs(self) -> None:
        """Drop what an interrupted run logged beyond its last checkpoint (the resumed run logs those
        steps again), and any row a kill cut short. Rows of steps 0..S-1 and evaluations at steps up to S
        belong to the checkpoint of step S: it is written after both."""
        rows = self._read_log()
        if rows and rows[0][:1] == ["step"]:
            header = rows[0]
            self._write_log(
                [header] + [r for r in rows[1:] if len(r) == len(header) and r[0].isdigit() and int(r[0]) < self.step]
            )
        elif self.log_path.exists():  # empty, or its header cut short: start afresh
            self.log_path.unlink()
        if self.metrics_path.exists():
            kept = []
            for line in self.metrics_path.read_text().splitlines():
                try:
                    if int(json.loads(line)["step"]) <= self.step:
                        kept.append(line + LINE_END)
                except (ValueError, KeyError, TypeError):  # a line cut short
                    continue
            atomic_write(self.metrics_path, lambda tmp: tmp.write_bytes("".join(kept).encode()))

    def _log(self, step: int, values: dict) -> None:
        row = {"step": str(step), **{k: f"{v:.8g}" for k, v in values.items()}}
        if self._columns is None or not row.keys() <= set(self._columns):
            self._widen_log(list(row))
        with open(self.log_path, "a", newline="") as f:
            csv.writer(f, lineterminator=LINE_END).writerow([row.get(k, "") for k in self._columns])

    def _widen_log(self, columns: list[str]) -> None:
        """Give the log's header `columns` too, new ones at the end and earlier rows blank in them: a new
        log gets its header, and a log stays one table when a run begun by a version that logged fewer
        columns is resumed, or when a step logs fewer or more values than the others."""
        rows = self._read_log()
        header = rows[0] if rows else []
        wider = header + [c for c in columns if c not in header]
        if wider != header:
            self._write_log([wider] + [r + [""] * (len(wider) - len(r)) for r in rows[1:]])
        self._columns = wider

    # --- the loop ------------------------------------------------------------------------------------
    def fit(self, progress: bool = True) -> dict:
        with StopSignals() as stop:
            return self._fit(progress, stop)

    def _fit(self, progress: bool, stop: "StopSignals") -> dict:
        from tqdm import tqdm

        # Pin the thread count even when it is not configured: left alone, MKL uses fewer threads when
        # the machine is busy (its "dynamic" mode), which changes float rounding -- and a resumed run
        # would no longer repeat the uninterrupted one (measured: ~1e-6 drift per step under load).
        torch.set_num_threads(self.run.threads or torch.get_num_threads())
        B = self.run.batch_size
        progress = progress and self.main
        prepare = getattr(self.task, "prepare", None)  # what a task does once before its first step
        if prepare is not None and self.step < self.run.steps:
            prepare(progress, lambda: stop.signum)
        bar = tqdm(total=self.run.steps, initial=self.step, desc="training", unit="step", disable=not progress)
        try:
            t0, seen = time.perf_counter(), 0
            last = {}
            while self.step < self.run.steps:
                step = self.step
                local = dist.local_slice(range(step * B, (step + 1) * B))
                values = self.task.train_step(step, local, self.run.lr_at(step))
                bad = [k for k, v in values.items() if not math.isfinite(v)]
                if bad:
                    good = sorted(self.ckpt_dir.glob("step-*.pt"))
                    raise TrainingError(
                        f"{bad[0]} is {values[bad[0]]} at step {step}: stopping; last good checkpoint: "
                        f"{good[-1] if good else 'none'}"
                    )
                if self.main:
                    self._log(step, values)
                self.step = step + 1
                seen += B
                last = values
                if progress:
                    bar.set_postfix(
                        loss=f"{values.get('loss', float('nan')):.4f}", img_s=f"{seen / (time.perf_counter() - t0):.1f}"
                    )
                    bar.update(1)
                if self.main:  # only rank 0 evaluates and writes
                    self._after_step()
                if dist.any_rank(stop.signum is not None):  # every rank stops after the same step
                    self._stop(stop.signum)
        finally:
            bar.close()
        if self.main:
            self.task.finish(self.dir)
            plot_losses(self.log_path, self.dir / "loss.png")
        return last

    def _after_step(self) -> None:
        """Evaluation, samples and the checkpoint, each at its interval and at the last step."""
        last = self.step == self.run.steps
        if self.step % self.run.eval_every == 0 or last:
            metrics = self.task.evaluate(self.step)
            if metrics:
                self._log_metrics(metrics)
        if self.step % self.run.sample_every == 0 or last:
            self.task.sample(self.step, self.dir / "samples")
        if self.step % self.run.ckpt_every == 0 or last:
            self.save()

    def _stop(self, signum: int | None) -> None:
        """After a signal (on any rank): a checkpoint at this step, unless one was just written; then stop."""
        path = self.ckpt_path(self.step)
        if self.main and not path.exists():
            path = self.save()
        name = signal.Signals(signum).name if signum else "a signal to another process"
        message = f"stopped by {name} at step {self.step}: checkpoint {path}; continue with --resume"
        raise Stopped(message, signum or signal.SIGTERM)

    def _log_metrics(self, metrics: dict) -> None:
        with open(self.metrics_path, "a", newline="") as f:
            f.write(json.dumps({"step": self.step, **metrics}) + LINE_END)
        score = metrics.get("score")
        if score is not None and (self.best is None or score > self.best):
            self.best = score
            best = {"step": self.step, "task": self.task.state_dict(), "best": score}
            atomic_write(self.ckpt_dir / "best.pt", lambda tmp: torch.save(best, tmp))


class StopSignals:
    """While a run trains, SIGTERM and SIGINT ask it to stop after the step under way, with a checkpoint
    there: `kill` or Ctrl-C loses no steps (SIGKILL still loses those since the last checkpoint). A second
    signal stops at once. Installed from the main thread only (Python's rule for signal handlers)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _note(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._note) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def plot_losses(csv_path: Path, out: Path, column: str = "loss", width: int = 640, height: int = 360) -> None:
    """The loss curve as a PNG (raw values faint, a running mean bold), no plotting library needed."""
    if not csv_path.exists():
        return
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    points = [(int(r["step"]), float(r[column])) for r in rows if r.get(column) not in (None, "")]
    points = [(s, v) for s, v in points if math.isfinite(v)]
    if len(points) < 2:
        return
    steps = [s for s, _ in points]
    vals = [math.log10(max(v, 1e-12)) for _, v in points]
    smooth, acc = [], None
    for v in vals:
        acc = v if acc is None else 0.95 * acc + 0.05 * v
        smooth.append(acc)
    lo, hi = min(vals), max(vals)
    hi = hi if hi > lo else lo + 1
    m = 50
    im = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(im)
    d.rectangle([m, 10, width - 10, height - 30], outline=(0, 0, 0))

    def xy(s, v):
        x = m + (s - steps[0]) / max(1, steps[-1] - steps[0]) * (width - 10 - m)
        return x, 10 + (hi - v) / (hi - lo) * (height - 40)

    d.line([xy(s, v) for s, v in zip(steps, vals)], fill=(170, 190, 230), width=1)
    d.line([xy(s, v) for s, v in zip(steps, smooth)], fill=(20, 60, 160), width=2)
    d.text((m, height - 25), f"step {steps[0]} .. {steps[-1]}", fill=(0, 0, 0))
    d.text((4, 10), f"{10**hi:.3g}", fill=(0, 0, 0))
    d.text((4, height - 45), f"{10**lo:.3g}", fill=(0, 0, 0))
    d.text((width // 2, height - 25), f"{column} (log scale)", fill=(0, 0, 0))
    atomic_write(out, lambda tmp: im.save(tmp, format="PNG"))
