"""Helpers of the node-loss tests: run a stage in a thread while a node is removed, and report what happened.

Each test prints one ``NODE_LOSS {json}`` line (what was removed and when, rows lost or doubled,
resume step, requests failed and hung, seconds without service): docs/fault_tolerance.md's table
is made of these lines.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Background:
    """``fn()`` in a daemon thread; :meth:`result` joins it (bounded) and returns its value or raises its error."""

    fn: Callable[[], Any]
    value: Any = None
    error: Exception | None = None
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.value = self.fn()
        except Exception as err:  # noqa: BLE001 - handed to the test thread, which re-raises it in result()
            self.error = err
        finally:
            self.finished = time.monotonic()

    def done(self) -> bool:
        return not self.thread.is_alive()

    def result(self, timeout_s: float):
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise TimeoutError(f"the stage did not finish within {timeout_s:.0f} s of waiting")
        if self.error is not None:
            raise self.error
        return self.value


def report(test: str, **figures) -> dict:
    """Print the test's figures as one ``NODE_LOSS`` line (``pytest -s`` shows it) and return them."""
    record = {"test": test, **figures}
    print("NODE_LOSS " + json.dumps(record, sort_keys=True, default=str), flush=True)
    return record
