"""Runs the controllers' delayed steps (a rollout finishing, a Job ending) in due order."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


class Scheduler:
    """Runs delayed controller steps in due order on one thread, under the cluster lock."""

    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock
        self._cond = threading.Condition()
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="kube-emulator-controllers")
        self._thread.daemon = True
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def call_later(self, delay: float, step: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._queue, (time.monotonic() + max(0.0, delay), next(self._seq), step))
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping:
                    now = time.monotonic()
                    if self._queue and self._queue[0][0] <= now:
                        break
                    self._cond.wait(self._queue[0][0] - now if self._queue else None)
                if self._stopping:
                    return
                _, _, step = heapq.heappop(self._queue)
            try:
                with self._lock:
                    step()
            except Exception:  # one broken step must not stop every later one
                logger.exception("kube emulator controller step failed")
