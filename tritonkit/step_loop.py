"""What every in-flight decoder loop shares (chat: `tritonkit.chat_loop`; Whisper:
`tritonkit.whisper_loop`): a thread owned by the model instance that, between decoding steps,
takes what the model's `execute` queued, drops cancelled work, admits the newcomers and runs a
step; a bound on the queue (QueueFull, whose message the OpenAI gateway turns into 429); the rows
in flight reported as they change; and, in process, waiting for every result of a set of jobs.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from tritonkit.errors import TritonkitError

LOGGER = logging.getLogger(__name__)
REPORT_EVERY_S = 0.05  # how often the rows in flight are reported while they change
# Ends the message of a request refused because the decoder is full; the OpenAI gateway answers it
# with 429 and Retry-After (the message also reaches it on streams, whose errors carry no status).
BUSY_MARK = "are waiting for this decoder; retry later"


class QueueFull(TritonkitError):
    """The loop holds as many requests as it may (rows in flight and queued): retry later."""


class CancelledError(TritonkitError):
    """The client cancelled the request (or went away) before its answer was complete."""


class Answer:
    """The answer to one Triton request whose rows finish in a loop: `answered` (set holding
    `lock`, before the final response is sent) at most once, and its rows' work moot once it is
    (`cancelled`).

    Once answered, Triton is never asked about the request again: the Python backend of 2.51 asks
    through the request's response factory, which the final response frees (asking after it is a
    use after free in tritonserver). A request fails at its first failed row, so its other rows
    are still in the loop when that happens. The question and the claim share `lock`, so the
    final response is sent only once any question in flight has been answered."""

    def __init__(self, request):
        self._asked = getattr(request, "is_cancelled", lambda: False)
        self.lock = threading.Lock()
        self.answered = False

    def cancelled(self) -> bool:
        with self.lock:
            return self.answered or bool(self._asked())


_WAKE = object()  # queued to wake an idle loop when work to continue arrives
Job = TypeVar("Job")
Work = TypeVar("Work")  # what a queued job becomes once taken (the loop's own record of it)


class StepLoop(Generic[Job, Work]):
    """The thread and queue of an in-flight decoder loop. A subclass says how many rows run
    (`running`), how a queued job is taken (`_taken`), what cancellation drops
    (`_drop_cancelled`), how newcomers join (`_admit`), what one step is (`_step_all`) and how
    everything in flight fails (`_fail_all`); `start()` ends its `__init__`."""

    name = "tritonkit-step-loop"  # the thread's name, and the log's

    def __init__(
        self,
        max_rows: int,
        max_queued: int,
        on_rows: Callable[[int, int], None] | None = None,
        cancel_check_s: float = 0.1,
    ):
        self.max_rows = max_rows
        self.max_queued = max_queued
        self.on_rows = on_rows  # called with (rows running, requests queued) when they change (metrics)
        self.cancel_check_s = cancel_check_s  # asking a request whether it was cancelled costs a message to Triton
        self._checked_at = 0.0
        self._reported_at, self._unreported = 0.0, False
        self.queue: queue.Queue[Any] = queue.Queue()  # jobs; None stops the loop, _WAKE wakes it
        # work of requests already admitted (a long file's next window): taken before the queue
        self.continuing: collections.deque[Job] = collections.deque()
        self._submitting = threading.Lock()
        self.steps = 0
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    # -- what a loop is made of -----------------------------------------------------------
    @property
    def running(self) -> int:
        raise NotImplementedError

    def _taken(self, job: Job) -> Work:
        raise NotImplementedError

    def _drop_cancelled(self) -> None:
        raise NotImplementedError

    def _admit(self, newcomers: list[Work]) -> None:
        raise NotImplementedError

    def _step_all(self) -> None:
        raise NotImplementedError

    def _fail_all(self, exc: Exception, waiting: Sequence[Work] = ()) -> None:
        raise NotImplementedError

    # -- the public side ------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        self.queue.put(None)
        self._thread.join(timeout=10)

    def submit_all(self, jobs: Sequence[Job], queued_anyway: bool = False) -> None:
        """Queue a request's jobs together, or none (QueueFull while `max_queued` wait);
        `queued_anyway`: work of a request already admitted (a long file's next window)."""
        if queued_anyway:  # its request waits on it: it goes first, and is never refused
            self.continuing.extend(jobs)
            self.queue.put(_WAKE)
            return
        if self.queue.qsize() >= self.max_queued:
            raise QueueFull(f"{self.running} are in flight and {self.queue.qsize()} {BUSY_MARK}")
        with self._submitting:  # the loop takes a request's jobs in one turn (its choices share a prefill)
            for job in jobs:
                self.queue.put(job)
        self._report()

    def submit(self, job: Job) -> None:
        self.submit_all([job])

    @property
    def in_flight(self) -> int:
        return self.running + self.queue.qsize()

    # -- the loop -------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopped:
            newcomers: list[Work] = []
            try:
                newcomers = self._take()
                if self._stopped:
                    break
                if self._cancel_check_due():
                    self._drop_cancelled()
                    self._report()
                if newcomers:
                    self._admit(newcomers)
                    newcomers = []
                if self.running:
                    self._step_all()
                if self._unreported:
                    self._report()
            except Exception as exc:  # a bug or an out-of-memory: everything in flight fails, the loop goes on
                LOGGER.exception("%s: a step failed", self.name)
                self._fail_all(exc, newcomers)

    def _take(self, taken: list[Work] | None = None) -> list[Work]:
        """Queued jobs to admit now, after `taken` (work the subclass puts first), up to
        `max_rows` running; waiting for one when nothing runs and nothing is taken."""
        taken = list(taken or [])
        room = self.max_rows - self.running
        while self.continuing and len(taken) < room:
            taken.append(self._taken(self.continuing.popleft()))
        if not self.running and not taken:
            job = self.queue.get()
            if job is None:
                return []
            if job is _WAKE:  # work to continue arrived: taken at the next turn
                return taken
            taken.append(self._taken(job))
        with self._submitting:
            while len(taken) < room:
                try:
                    job = self.queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._stopped = True
                    break
                if job is not _WAKE:
                    taken.append(self._taken(job))
        return taken

    def _cancel_check_due(self) -> bool:
        now = time.monotonic()
        if now - self._checked_at < self.cancel_check_s:
            return False
        self._checked_at = now
        return True

    def _report(self) -> None:
        """on_rows, at most every REPORT_EVERY_S while rows run (at once when the loop is idle)."""
        now = time.monotonic()
        if self.running and now - self._reported_at < REPORT_EVERY_S:
            self._unreported = True
            return
        self._reported_at, self._unreported = now, False
        if self.on_rows is not None:
            try:
                self.on_rows(self.running, self.queue.qsize())
            except Exception:  # metrics must never stop the loop
                LOGGER.exception("%s: reporting its rows failed", self.name)

    @staticmethod
    def _deliver(callback: Callable[[Any], None], value: Any) -> None:
        """A result or an error to its request: one that cannot be sent (the client went away)
        must not stop the loop."""
        try:
            callback(value)
        except Exception:
            LOGGER.exception("answering a request failed")


def wait_all(submit: Callable[[dict, Callable, Callable], None], jobs: Sequence[dict], timeout_s: float) -> list:
    """Each job submitted with `submit(fields, on_done, on_error)`, then every result (or its
    exception) in order: a loop used in process (tests, benchmarks)."""
    results: list[Any] = [None] * len(jobs)
    done = threading.Event()
    left = [len(jobs)]
    lock = threading.Lock()

    def finisher(k):
        def finish(value):
            with lock:
                results[k] = value
                left[0] -= 1
                if not left[0]:
                    done.set()

        return finish

    for k, fields in enumerate(jobs):
        submit(fields, finisher(k), finisher(k))
    if not done.wait(timeout_s):
        raise TimeoutError(f"{left[0]} of {len(jobs)} results not ready after {timeout_s} s")
    return results
