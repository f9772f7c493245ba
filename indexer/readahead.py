"""`map` over a worker pool of daemon threads, in order, with bounded read-ahead and a time limit per call.

What indexing and evaluation decode images with. Daemon threads, unlike concurrent.futures' workers (which
the interpreter joins at exit): a thread stuck for good in a read (a hung network drive) never keeps the
process from ending, so Ctrl-C always ends it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def bounded_map(fn: Callable[[T], R], items: Iterable[T], workers: int, ahead: int = 64,
                timeout: float | None = None, on_timeout: Callable[[T], R] | None = None,
                max_stuck: int | None = None) -> Iterator[R]:
    """`map` in daemon threads, in order, with at most `ahead` results waiting beyond the one asked for.

    An item whose call has run `timeout` seconds gives `on_timeout(item)` instead, and a fresh thread takes
    the stuck one's place; past `max_stuck` such calls, `TooManyStuck` is raised. workers=0 runs one thread
    that never runs ahead of the consumer (no overlap, for measuring what the overlap brings).
    """
    pool = _DaemonPool(fn, max(workers, 1), timeout, on_timeout, max_stuck)
    ahead = ahead if workers else 0
    pending: deque[_Task[T, R]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(item))
            if len(pending) > ahead:
                yield pool.result(pending.popleft())
        while pending:
            yield pool.result(pending.popleft())
    finally:  # also when the consumer stops early (an error, Ctrl-C): queued work is dropped, never waited for
        pool.close()


class TooManyStuck(Exception):
    def __init__(self, count: int, item):
        super().__init__(f"{count} calls did not return")
        self.count, self.item = count, item


class _Task(Generic[T, R]):
    def __init__(self, item: T):
        self.item = item
        self.started: float | None = None  # time.monotonic() when a thread took it
        self.done = threading.Event()
        self.result: R | None = None
        self.error: BaseException | None = None
        self.abandoned = False  # timed out: its thread leaves the pool when (if ever) the call returns


class _DaemonPool(Generic[T, R]):
    """Threads that call `fn` on submitted items. Daemon threads: unlike concurrent.futures' workers, which
    the interpreter joins at exit, one blocked for good in a read never keeps the process from ending."""

    def __init__(self, fn: Callable[[T], R], threads: int, timeout: float | None,
                 on_timeout: Callable[[T], R] | None, max_stuck: int | None):
        self.fn, self.timeout, self.on_timeout, self.max_stuck = fn, timeout, on_timeout, max_stuck
        self.tasks: queue.SimpleQueue[_Task[T, R] | None] = queue.SimpleQueue()
        self.threads, self.stuck = 0, 0
        for _ in range(threads):
            self._start_thread()

    def submit(self, item: T) -> _Task[T, R]:
        task = _Task(item)
        self.tasks.put(task)
        return task

    def result(self, task: _Task[T, R]) -> R:
        while not task.done.wait(0.1):  # short waits: Ctrl-C is seen at once on every platform
            if self.timeout is not None and task.started is not None \
                    and time.monotonic() - task.started > self.timeout:
                return self._give_up(task)
        if task.error is not None:
            raise task.error
        return task.result

    def _give_up(self, task: _Task[T, R]) -> R:
        task.abandoned = True
        self.stuck += 1
        if self.max_stuck is not None and self.stuck > self.max_stuck:
            raise TooManyStuck(self.stuck, task.item)
        self._start_thread()  # in the stuck one's place
        if self.on_timeout is None:
            raise TimeoutError(f"no answer within {self.timeout:g} s")
        return self.on_timeout(task.item)

    def close(self) -> None:
        """Drop the queued items and let the threads end; a thread stuck in a call is left behind."""
        while True:
            try:
                self.tasks.get_nowait()
            except queue.Empty:
                break
        for _ in range(self.threads):
            self.tasks.put(None)

    def _start_thread(self) -> None:
        self.threads += 1
        threading.Thread(target=self._work, name="blipsearch-read", daemon=True).start()

    def _work(self) -> None:
        while (task := self.tasks.get()) is not None:
            task.started = time.monotonic()
            try:
                task.result = self.fn(task.item)
            except BaseException as exc:  # handed to the consumer, raised there
                task.error = exc
            task.done.set()
            if task.abandoned:
                return  # a fresh thread took this one's place
