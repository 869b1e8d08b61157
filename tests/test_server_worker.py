"""The server's worker (ldmkit.server.worker): jobs in arrival order, and `on_idle` once the queue runs
empty — before the last job is answered, never between queued jobs, and never the worker's end if it
fails."""

import threading

from ldmkit.server.worker import Worker


def test_on_idle_runs_when_the_queue_empties_before_the_last_answer():
    events: list[str] = []
    gate = threading.Event()

    def job(name: str):
        def run(worker):
            if name == "a":
                gate.wait(10)  # b and c queue up behind it
            events.append(name)
            return name

        return run

    def idle():
        events.append(f"idle after {len(events)} with {sum(j.future.done() for j in jobs)} answered")
        if len(events) == 4:
            raise RuntimeError("the first call fails")

    worker = Worker(max_queue=8, on_idle=idle)
    try:
        jobs = [worker.submit("txt2img", job(n)) for n in "abc"]
        gate.set()
        assert [j.future.result(10) for j in jobs] == ["a", "b", "c"]
        assert events == ["a", "b", "c", "idle after 3 with 2 answered"]
        # the worker outlived on_idle's failure; the queue ran empty again: on_idle again
        assert worker.submit("txt2img", job("d")).future.result(10) == "d"
        assert events[-2:] == ["d", "idle after 5 with 3 answered"]
    finally:
        worker.stop()
