"""Training without anyone running `ipm train`: `ipm serve --train-after S` and `ipm mcp
--train-after S`.

Until a namespace is trained again, a memory added to it is found only by its words (a
`pending` hit). A server that trains a namespace by itself, once its memories have stopped
changing for a while, keeps its index current; waiting for the changes to settle trains once
after a burst of adds, not once per add.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterable

from .engine import IPM
from .errors import IPMError, TrainingInProgress

log = logging.getLogger("ipm.autotrain")


class AutoTrain:
    """Watches namespaces of `mem` (`namespaces`, or every one that holds memories) and calls
    `train(namespace)` for one whose memories are not all in its index (`IPM.untrained`) once
    they have not changed for `quiet_s` seconds. It polls the store, so changes made by another
    process (an `ipm add` beside a server) count too. A namespace is tried once per change: a
    failed training waits for the next change rather than retrying on every poll.

    `busy(namespace)`, if given, says a training of that namespace started elsewhere (a
    `POST /train` job) is under way: the namespace is then left until that one ends, and tried
    if it left memories out of the index (it failed, or it started before the last change)."""

    def __init__(self, mem: IPM, quiet_s: float, train: Callable[[str], object],
                 namespaces: Iterable[str] | None = None, poll_s: float | None = None,
                 busy: Callable[[str], bool] | None = None):
        if not quiet_s > 0:
            raise ValueError("quiet_s must be positive")
        self.mem = mem
        self.quiet_s = quiet_s
        self.train = train
        self.namespaces = list(namespaces) if namespaces is not None else None
        self.busy = busy
        self.poll_s = poll_s if poll_s is not None else min(max(quiet_s / 2, 0.5), 10.0)
        self._changed: dict[str, tuple[int, float]] = {}  # namespace -> (generation, when first seen)
        self._tried: dict[str, int] = {}  # namespace -> the generation last trained (or tried)
        self._stop = threading.Event()
        self._lock = threading.Lock()  # orders `stop` and the start of a training
        self._thread: threading.Thread | None = None
        self._training = False  # inside `train` now

    def check(self, now: float | None = None) -> list[str]:
        """One poll: train every namespace that is due; returns those it trained (or submitted).
        `now` (a `time.monotonic()` reading) is for tests."""
        started = []
        for ns in self.namespaces if self.namespaces is not None else self.mem.namespaces():
            now_ns = time.monotonic() if now is None else now  # a training before this one took time
            generation = self.mem.store.generation(ns)
            if self._changed.get(ns, (None,))[0] != generation:
                self._changed[ns] = (generation, now_ns)
            if self._tried.get(ns) == generation or now_ns - self._changed[ns][1] < self.quiet_s:
                continue
            if self.busy is not None and self.busy(ns):
                continue  # see how that training ends before trying one
            self._tried[ns] = generation
            try:
                untrained = self.mem.untrained(ns)
            except IPMError as e:  # e.g. a damaged index: said once a change, the other namespaces go on
                log.warning("could not train namespace %s: %s", ns, e)
                continue
            if not untrained:
                continue
            log.info("training namespace %s: %d memories not in its index", ns, len(untrained))
            with self._lock:
                if self._stop.is_set():
                    break
                self._training = True
            try:
                self.train(ns)
            except TrainingInProgress:  # an `ipm train` in another process: see how it ends, next poll
                self.retry_later(ns)
                continue
            except IPMError as e:
                if self.busy is not None and self.busy(ns):
                    self._tried.pop(ns, None)  # another training began meanwhile: see how it ends
                else:
                    log.warning("could not train namespace %s: %s", ns, e)
                continue
            finally:
                with self._lock:
                    self._training = False
            started.append(ns)
        return started

    def retry_later(self, namespace: str) -> None:
        """Try `namespace` again at a poll to come, with no new change needed: its training was
        refused because another one was under way (`TrainingInProgress`; in the server, seen by
        the job that ran it)."""
        log.info("namespace %s is being trained by another process; trying again later", namespace)
        self._tried.pop(namespace, None)

    def start(self) -> "AutoTrain":
        self._thread = threading.Thread(target=self._run, name="ipm-autotrain", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> bool:
        """Start no more trainings. Returns whether one is under way in `train` now: a process
        about to exit must then not end the interpreter under it (see mcp_server.run)."""
        with self._lock:
            self._stop.set()
            return self._training

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except Exception:  # a bug or a damaged home: say so, keep serving, try again
                log.exception("automatic training failed")
