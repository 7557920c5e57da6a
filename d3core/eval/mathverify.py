"""math-verify in a worker process with a hard timeout.

math-verify's own timeouts use ``SIGALRM``: they only work on the main thread, and even there
they cannot interrupt one long C call, such as SymPy evaluating ``9^{9^{9}}``. So the comparison
runs in a separate, persistent worker process (math-verify and SymPy are imported once); the
caller waits for its answer at most ``timeout_s`` and otherwise kills the worker, which is
restarted for the next comparison. Safe from any thread; comparisons are serialised.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

TIMEOUT_S = 10.0  # per comparison, wall clock, enforced by killing the worker
INNER_TIMEOUT_S = 5  # math-verify's own (SIGALRM) timeouts inside the worker's main thread
START_TIMEOUT_S = 120.0  # importing SymPy on a loaded machine
_ROOT = str(Path(__file__).resolve().parents[2])


class MathVerifier:
    """``verify(gold, pred)`` -> bool through a killable worker; ``None`` if it timed out."""

    def __init__(self, timeout_s: float = TIMEOUT_S) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s}: must be > 0 seconds")
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen | None = None
        self._buffer = b""
        self._lock = threading.Lock()
        self.timeouts = 0

    def _start(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([_ROOT, os.environ.get("PYTHONPATH", "")]))
        self._proc = subprocess.Popen([sys.executable, "-m", "d3core.eval.mathverify"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, env=env)
        self._buffer = b""
        if self._line(START_TIMEOUT_S) != {"ready": True}:
            self._stop()
            raise RuntimeError("the math-verify worker did not start: is math-verify installed (pip install "
                               "'math-verify>=0.9,<0.10')?")

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for stream in (self._proc.stdin, self._proc.stdout):
                stream.close()
            self._proc = None

    def _line(self, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def verify(self, gold: str, pred: str) -> bool | None:
        """Whether LaTeX ``pred`` equals ``gold``; ``None`` when the comparison ran out of time."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            try:
                self._proc.stdin.write(json.dumps({"gold": gold, "pred": pred}).encode() + b"\n")
                self._proc.stdin.flush()
            except BrokenPipeError:
                self._stop()
                return None
            reply = self._line(self.timeout_s)
            if reply is None:
                self.timeouts += 1
                logger.warning("math-verify gave no answer within %.0f s for %r: scored as wrong", self.timeout_s,
                               pred[:80])
                self._stop()
                return None
            return bool(reply.get("equal"))

    def close(self) -> None:
        with self._lock:
            self._stop()


_shared: MathVerifier | None = None
_shared_lock = threading.Lock()


def shared() -> MathVerifier:
    """The process-wide verifier (started on first use, stopped at exit)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = MathVerifier()
            atexit.register(_shared.close)
        return _shared


def _serve() -> None:
    """The worker: one JSON request per line on stdin, one ``{"equal": bool}`` per line on stdout."""
    from math_verify import parse, verify

    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            gold = parse(request["gold"], parsing_timeout=INNER_TIMEOUT_S)
            pred = parse(request["pred"], parsing_timeout=INNER_TIMEOUT_S)
            equal = bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=INNER_TIMEOUT_S))
        except Exception as err:  # math-verify's own timeout, or a SymPy failure on odd input
            logger.debug("math-verify failed: %s", err)
            equal = False
        out.write(json.dumps({"equal": equal}) + "\n")
        out.flush()


if __name__ == "__main__":
    _serve()
