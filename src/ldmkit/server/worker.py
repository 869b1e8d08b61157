"""One global worker: jobs run one at a time, in arrival order (two cores cannot run two generations
usefully). Request threads submit a job and wait for its result; the progress endpoint reads the
running job's state; interrupt asks the running job to stop at its next sampling step. When the queue
runs empty, `on_idle` runs before the last job is answered (the server gives freed memory back then)."""

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ldmkit.errors import BusyError

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """What /sdapi/v1/progress reports about the running job."""

    job: str = ""
    job_no: int = 0  # batches done within the job
    job_count: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    started: float = 0.0
    interrupted: bool = False
    step_info: Any = None  # the last StepInfo: previews are made from it only when asked for
    preview_method: str = "auto"  # Pipeline.preview's, from the job's show_progress_type
    preview: tuple[Any, str] | None = None  # (StepInfo, its preview as base64 PNG): drawn once per step

    @property
    def fraction(self) -> float:
        if not self.job_count or not self.sampling_steps:
            return 0.0
        return min(1.0, (self.job_no + self.sampling_step / self.sampling_steps) / self.job_count)


@dataclass
class Job:
    id: str
    kind: str
    run: Callable[["Worker"], Any]
    future: Future = field(default_factory=Future)


class Worker:
    def __init__(self, max_queue: int = 32, on_idle: Callable[[], Any] | None = None):
        self.max_queue = max_queue  # jobs waiting; submitting beyond raises BusyError
        self.on_idle = on_idle
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self.current: Job | None = None
        self.progress = Progress()
        self.completed: list[str] = []  # job ids in completion order (the load test reads it)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="ldmkit-worker", daemon=True)
        self._thread.start()

    def submit(self, kind: str, run: Callable[["Worker"], Any], job_id: str | None = None) -> Job:
        job = Job(job_id or f"task({next(self._ids)})", kind, run)
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise BusyError(f"the server is busy: {len(self._queue)} jobs are waiting; try again later")
            self._queue.append(job)
            self._cond.notify()
        return job

    def position(self, job_id: str) -> int | None:
        """0 while running, 1.. while queued, None when unknown or finished."""
        with self._cond:
            if self.current is not None and self.current.id == job_id:
                return 0
            for i, job in enumerate(self._queue):
                if job.id == job_id:
                    return i + 1
        return None

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def interrupt(self) -> None:
        self.progress.interrupted = True

    def stop(self, timeout: float = 60.0) -> None:
        """Finish the running job, drop the queued ones (their requests get an error), end the thread."""
        with self._cond:
            self._stopping = True
            for job in self._queue:
                job.future.set_exception(RuntimeError("the server is shutting down"))
            self._queue.clear()
            self._cond.notify()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._queue.popleft()
                if not job.future.set_running_or_notify_cancel():
                    continue  # its request went away while it waited: nothing to run, nobody to answer
                self.current = job
                self.progress = Progress(job=job.kind, started=time.time())
            result, error = None, None
            try:
                result = job.run(self)
            except BaseException as e:  # handed to the waiting request, which turns it into a 4xx/5xx
                error = e
            # recorded before the request is answered: a client that has its answer finds the job completed
            with self._cond:
                self.completed.append(job.id)
                self.current = None
                idle = not self._queue
            if idle and self.on_idle is not None:  # before answering: whoever has the last answer sees it done
                try:
                    self.on_idle()
                except Exception as e:  # never the worker's end: the next job still runs
                    log.warning("after the last job: %s: %s", type(e).__name__, e)
            if error is None:
                job.future.set_result(result)
            else:
                job.future.set_exception(error)
