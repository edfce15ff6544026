"""The job queue: one generation at a time on one thread, any number waiting; the state A1111's
``/progress`` reports, and its interrupt and skip. Request handlers submit a job and await its
future, so the server keeps answering (progress, lists) while a job runs."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from ..jobs import Drawn, Interrupted, Job, ModelCache, Skipped, generate
from ..pipelines.inputs import to_pil
from .a1111 import encode_png


@dataclass
class State:
    """What ``/progress`` reads (A1111's ``shared.state``), guarded by ``Worker.lock``."""

    job: str = ""
    job_count: int = 0  # running + waiting
    job_no: int = 0  # images done in the running job
    job_images: int = 0  # images in the running job
    sampling_step: int = 0
    sampling_steps: int = 0
    started: float = 0.0
    interrupted: bool = False
    skipped: bool = False
    current_image: str | None = None  # base64 PNG of the latest preview
    textinfo: str | None = None
    timestamp: str = ""

    def progress(self) -> tuple[float, float]:
        """(fraction of the running job done, estimated seconds left), as A1111 computes them."""
        if self.job_images == 0 or self.sampling_steps == 0:
            return 0.0, 0.0
        done = (self.job_no + self.sampling_step / self.sampling_steps) / self.job_images
        elapsed = time.time() - self.started
        eta = elapsed / done - elapsed if done > 0 else 0.0
        return min(done, 1.0), max(eta, 0.0)


@dataclass
class Task:
    """A job to draw, or (``fn``) work on the models to do between jobs, such as a model switch."""

    job: Job | None = None
    fn: Callable[[], Any] | None = None
    future: Future = field(default_factory=Future)
    warnings: list[str] = field(default_factory=list)


class Worker:
    """Runs submitted jobs in order on its own thread, with the models of ``cache``. A preview of
    the latents is decoded every ``preview_every`` steps (0: none), on this thread."""

    def __init__(self, cache: ModelCache, preview_every: int = 5):
        self.cache, self.preview_every = cache, preview_every
        self.state, self.lock = State(), threading.Lock()
        self._queue: queue.Queue[Task | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="unfog-jobs", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Task:
        task = Task(job)
        with self.lock:
            self.state.job_count += 1
        self._queue.put(task)
        return task

    def run_now(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the worker's thread between jobs (a model switch), in queue order."""
        task = Task(fn=fn)
        self._queue.put(task)
        return task.future

    def interrupt(self) -> None:
        with self.lock:
            if self.state.job_images:
                self.state.interrupted = True

    def skip(self) -> None:
        with self.lock:
            if self.state.job_images:
                self.state.skipped = True

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    # ------------------------------------------------------------ the worker's thread

    def _loop(self) -> None:
        while (task := self._queue.get()) is not None:
            if not task.future.set_running_or_notify_cancel():
                continue
            try:
                if task.job is None:
                    task.future.set_result(task.fn())
                else:
                    task.future.set_result(self._run(task))
            except BaseException as err:  # noqa: BLE001 - every failure goes back to its request
                task.future.set_exception(err)
            finally:
                if task.job is not None:
                    with self.lock:
                        self.state = State(job_count=self.state.job_count - 1)

    def _run(self, task: Task) -> list[Drawn]:
        job = task.job
        with self.lock:
            self.state = replace(self.state, job="txt2img" if job.mode == "txt2img" else "img2img",
                                 job_images=job.batch_size, job_no=0, started=time.time(),
                                 timestamp=time.strftime("%Y%m%d%H%M%S"))
        drawn: list[Drawn] = []
        for d in generate(job, self.cache, warn=task.warnings.append, progress=self._progress):
            drawn.append(d)
            with self.lock:
                self.state.job_no += 1
        return drawn

    def _progress(self, total: int, desc: str) -> _Steps:
        return _Steps(self, total, desc)


class _Steps:
    """The progress of one sampling run: counts steps into the worker's state, raises ``Skipped``
    or ``Interrupted`` when asked to, and keeps a preview of the denoised latents."""

    def __init__(self, worker: Worker, total: int, desc: str):
        self.worker, self.total, self.desc = worker, total, desc

    def __enter__(self) -> _Steps:
        with self.worker.lock:
            self.worker.state.sampling_steps, self.worker.state.sampling_step = self.total, 0
            self.worker.state.textinfo = desc_text(self.desc)
        return self

    def __exit__(self, *exc) -> None:
        pass

    def callback(self, info: dict) -> None:
        w = self.worker
        with w.lock:
            w.state.sampling_step = info["i"] + 1
            interrupted, skipped = w.state.interrupted, w.state.skipped
            w.state.skipped = False
        if interrupted:
            raise Interrupted(info.get("denoised"))
        if skipped:
            raise Skipped()
        if w.preview_every and (info["i"] + 1) % w.preview_every == 0 and "denoised" in info:
            preview = _preview(w, info["denoised"][:1])
            with w.lock:
                w.state.current_image = preview


def desc_text(desc: str) -> str:
    return f"Sampling {desc}"


def _preview(worker: Worker, latents) -> str | None:
    pipe = worker.cache.last  # the job's base model: the last one handed out
    if pipe is None:
        return None
    return encode_png(to_pil(pipe.decode(latents))[0], None)
