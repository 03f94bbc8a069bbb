"""One worker thread that runs every model call, fed by a bounded queue of jobs.

MLX is not called from several threads at once: the event loop only queues jobs and
reads the events they emit.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any


class Cancelled(Exception):
    """The client went away: the job stops at its next check."""


class Busy(Exception):
    """The queue is full."""


class Job:
    """A unit of model work; it emits (kind, value) events to the event loop that queued it:
    "progress", "text", then "done" (its result), "error" (an exception) or "cancelled"."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._cancelled = threading.Event()

    def emit(self, kind: str, value: Any = None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check(self) -> None:
        """Raise Cancelled if the client has gone (called between batches and tokens)."""
        if self._cancelled.is_set():
            raise Cancelled


class Engine:
    """Runs jobs one at a time on its own thread; at most `limit` jobs wait or run."""

    def __init__(self, limit: int):
        self.limit = limit
        self._pending = 0
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="mlx-sharedllm-model", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        with self._lock:
            return self._pending

    def submit(self, work: Callable[[Job], Any]) -> Job:
        """Queue `work(job)`; raise Busy when `limit` jobs are already queued or running."""
        with self._lock:
            if self._pending >= self.limit:
                raise Busy
            self._pending += 1
        job = Job(asyncio.get_running_loop())
        self._queue.put((job, work))
        return job

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            job, work = item
            try:
                job.check()
                job.emit("done", work(job))
            except Cancelled:
                job.emit("cancelled")
            except Exception as e:  # the job's own error, reported to its client
                job.emit("error", e)
            finally:
                with self._lock:
                    self._pending -= 1

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread after the jobs already queued."""
        self._queue.put(None)
        self._thread.join(timeout)
