"""Step-level (iteration-level) batching: one scheduler thread owns the engines and drives every admitted request.

Each request is its pipeline state machine (`Pipeline.machine`: encode -> inversion steps -> denoising steps with
IRECE at its own t* -> decode), which yields one engine call at a time (`irece_runtime.calls.Call`). At every tick
the scheduler takes the pending call of each active request, whatever step it is at, groups the calls that can run
together (same kind and model, same shapes but the batch axis - e.g. the same latent size - and equal per-call
inputs), runs each group as one backend call (per-sample timesteps; a request's guidance pair stays together in its
rows) and hands every request its share of the result; the requests then advance to their next call. Requests
join at the next tick and leave as soon as they finish, fail, or their guard fires (cancelled, past a deadline or
the time limit, drained). `max_batch` caps the images per backend call (`calls.row_limit`: a UNet call carries
2 x max_batch rows); a group larger than that runs as several calls in the same tick.

Isolation: an engine error in a merged call is retried call by call, so it fails only the request that causes it.
Stop points inside an engine call (torch backend) stop a merged call only once every request in it has been
stopped; the others' results are not thrown away for one cancelled neighbour.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from irece_runtime import checkpoints
from irece_runtime.calls import Call, Machine, row_limit, run_merged

log = logging.getLogger("irece.server")


class Job:
    """One admitted request in the scheduler: its machine, its guard (raises to end it), its outcome."""

    def __init__(self, machine: Machine, guard: Callable[[], None]):
        self.machine, self.guard = machine, guard
        self.call: Call | None = None
        self.result = None
        self.error: BaseException | None = None
        self.done = threading.Event()


class Scheduler:
    def __init__(self, backend, max_batch: int, gather_s: float = 0.0, metrics=None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if gather_s < 0:
            raise ValueError(f"gather window must be >= 0 seconds, got {gather_s}")
        self.backend, self.max_batch, self.gather_s, self.metrics = backend, max_batch, gather_s, metrics
        self._cv = threading.Condition()
        self._inbox: list[Job] = []
        self._active: list[Job] = []
        self._closed = False
        self.ticks = 0
        self._thread = threading.Thread(target=self._loop, daemon=True, name="irece-scheduler")
        self._thread.start()

    # -- the request's side ----------------------------------------------------------------------------------
    def run(self, machine: Machine, guard: Callable[[], None]):
        """Run one request's machine among the others; blocks until it has left the scheduler and returns its
        result or raises what ended it (its guard's exception, the machine's own, or the engine's)."""
        job = Job(machine, guard)
        with self._cv:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            self._inbox.append(job)
            self._cv.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def close(self) -> None:
        """No new requests; the thread ends once the active ones have left."""
        with self._cv:
            self._closed = True
            self._cv.notify()

    # -- the loop ------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._inbox and not self._active and not self._closed:
                    self._cv.wait()
                if self._closed and not self._inbox and not self._active:
                    return
                if not self._active and self.gather_s > 0:  # idle -> busy: let requests arriving together meet
                    deadline = time.monotonic() + self.gather_s
                    while len(self._inbox) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                        self._cv.wait(left)
                new, self._inbox = self._inbox, []
            try:
                for job in new:
                    self._start(job)
                self._tick()
            except BaseException as exc:  # a bug here must not leave requests waiting forever
                log.exception("scheduler tick failed")
                for job in self._active:
                    self._finish(job, error=exc)
            self._active = [j for j in self._active if not j.done.is_set()]

    def _start(self, job: Job) -> None:
        try:
            job.guard()  # cancelled or expired while it waited for the tick
        except BaseException as exc:
            self._finish(job, error=exc)
            return
        self._active.append(job)
        self._advance(job, None, first=True)

    def _tick(self) -> None:
        self.ticks += 1
        for job in self._active:  # cancelled, expired or drained requests leave before the tick, not after it
            if not job.done.is_set():
                try:
                    job.guard()
                except BaseException as exc:
                    self._finish(job, error=exc)
        groups: dict[tuple, list[Job]] = {}
        for job in self._active:
            if not job.done.is_set():
                groups.setdefault(job.call.key(), []).append(job)
        for jobs in groups.values():
            limit = row_limit(jobs[0].call.kind, self.max_batch)
            chunk, rows = [], 0
            for job in jobs:
                if chunk and rows + job.call.rows > limit:
                    self._run(chunk)
                    chunk, rows = [], 0
                chunk.append(job)
                rows += job.call.rows
            self._run(chunk)

    def _run(self, chunk: list[Job]) -> None:
        """One backend call for the chunk's calls; each job advances with its share, or ends."""
        if self.metrics is not None:
            self.metrics.batch_size.labels(chunk[0].call.kind).observe(len(chunk))
        try:
            with checkpoints.checking(lambda: self._any_alive(chunk)):
                results = run_merged(self.backend, [j.call for j in chunk])
        except Exception as exc:
            stopped = {id(j): self._guard_error(j) for j in chunk}
            alive = [j for j in chunk if stopped[id(j)] is None]
            for j in chunk:
                if stopped[id(j)] is not None:
                    self._finish(j, error=stopped[id(j)])
            if len(chunk) > 1 and alive:  # which request's call failed? each alone, so the others go on
                log.warning("a merged %s call of %d requests failed (%s); retrying each alone",
                            chunk[0].call.kind, len(chunk), type(exc).__name__)
                for j in alive:
                    self._run([j])
            else:
                for j in alive:
                    self._finish(j, error=exc)
            return
        for job, result in zip(chunk, results):
            self._advance(job, result)

    @staticmethod
    def _guard_error(job: Job) -> BaseException | None:
        try:
            job.guard()
        except BaseException as exc:
            return exc
        return None

    @staticmethod
    def _any_alive(chunk: list[Job]) -> None:
        """The stop point inside a merged engine call: it stops only when no request in it wants the result."""
        first = None
        for job in chunk:
            try:
                job.guard()
                return
            except BaseException as exc:
                first = first or exc
        raise first

    def _advance(self, job: Job, value, first: bool = False) -> None:
        """Hand the job its call's result and run its machine to its next call (its callback - progress, the
        guard - runs here), or finish it."""
        try:
            with checkpoints.checking(job.guard):
                job.call = next(job.machine) if first else job.machine.send(value)
        except StopIteration as stop:
            self._finish(job, result=stop.value)
        except BaseException as exc:
            self._finish(job, error=exc)

    def _finish(self, job: Job, result=None, error: BaseException | None = None) -> None:
        if job.done.is_set():
            return
        job.result, job.error, job.call = result, error, None
        if error is not None:
            try:
                job.machine.close()  # a machine suspended at a yield (cancelled between calls) ends here
            except Exception:
                log.exception("closing an ended request's machine failed")
        job.done.set()
