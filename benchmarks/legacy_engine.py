"""The serving app's batching from before the step engine, as a baseline for ``benchmarks/engine_batching.py``.

Request-level batches, as the app shipped them: a batch holds one parameter set (and one seed, when
sampling: a batch had one generator), it starts only when the decoder is empty, and every row decodes
until its sampler ends it however small ``max_tokens`` or however early a stop string (the text is cut
afterwards). Each answer is still sent when its own row ends, not when the whole batch does, which makes
this baseline kinder than the original, not harsher. Product code keeps no trace of it: this subclass
overrides the engine's admission and its choice to end a row once its text is final.
"""

from __future__ import annotations

import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serve_apps.batching import ContinuousEngine  # noqa: E402
from serve_apps.requests import GenerationRequest  # noqa: E402


def group_key(req: GenerationRequest) -> tuple:
    """A legacy batch shares one parameter set, and one seed when sampling."""
    sampling = getattr(req.params, "temperature", 0.0) > 0
    return req.params, req.seed if sampling else None


class LegacyEngine(ContinuousEngine):
    """Request-level batches of one parameter set whose rows decode to their sampler's end."""

    STOP_ROWS_AT_TEXT_END = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{**kwargs, "batching": "request"})

    def _admit_batch(self) -> None:
        """The oldest request and every queued one that shares its parameters, while their rows fit."""
        now, free, group = time.monotonic(), self.max_batch_size, []
        with self._cond:
            key, rest = None, collections.deque()
            for item in self._pending:
                if item.cancelled or now > item.deadline:
                    self._gone(item)
                    continue
                if key is None:
                    key = group_key(item.req)
                if group_key(item.req) == key and item.req.n <= free:
                    group.append(item)
                    free -= item.req.n
                else:
                    rest.append(item)
            self._pending = rest
        for item in group:
            self._start(item)
