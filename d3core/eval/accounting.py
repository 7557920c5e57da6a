"""Per-sandbox totals: CPU seconds, memory, processes and output of all of a sandbox's processes.

Two sources of the same :class:`Usage`:

* :class:`CgroupV1`: the sandbox's own cgroups in the v1 ``cpuacct``, ``memory`` and ``pids``
  hierarchies, where this process may write them (root on this machine and CI). The kernel
  enforces the memory and process limits; its counters (OOM kills, ``memory.failcnt``,
  ``pids.peak``) say which was reached.
* :class:`PidNamespace`: otherwise, a scan of ``/proc`` for the processes in the sandbox's PID
  namespace (CPU = their times plus their reaped children's, memory = summed RSS);
  :class:`Session` scans the same way for the processes of one session (the opted-in unsandboxed
  mode, which has no namespace to scan).

Output is counted apart: :class:`Output` is the pipe that the sandbox's stdout and stderr
write to, drained by a thread that keeps the first ``output_mb`` and counts every byte.

These totals, that count and the kernel's counters are the only sources of a verdict's
``limit``: never the program's exit status or exception text. Stragglers are killed only
through a pidfd and after checking they still belong to the sandbox, so a recycled pid is never
signalled.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable

logger = logging.getLogger(__name__)

KILL_WAIT_S = 10.0
_CHUNK = 1 << 16
_PREFIX = "d3ray-sandbox-"
STALE_AFTER_S = 3600.0  # a sandbox cgroup older than this whose harness is gone is removed
EXTRA_PROCESSES = 3  # the outer bwrap, pid 1 and the launcher's user-namespace holder share the pids cgroup


@dataclass(frozen=True)
class Usage:
    cpu_s: float
    memory_bytes: int
    processes: int


# -- cgroups ------------------------------------------------------------------------------------
def _own_cgroup_dirs(controllers: tuple[str, ...]) -> dict[str, str]:
    """controller -> this process's cgroup directory in its v1 hierarchy (writable ones only)."""
    mounts = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(tail) >= 3 and tail[0] == "cgroup":
                for opt in tail[2].split(","):
                    mounts[opt] = (fields[3], fields[4])  # (root within the hierarchy, mount point)
    dirs = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            for name in names.split(","):
                if name in controllers and name in mounts:
                    root, point = mounts[name]
                    rel = os.path.relpath(path, root) if path.startswith(root) else path.lstrip("/")
                    d = os.path.normpath(os.path.join(point, rel))
                    if os.access(d, os.W_OK):
                        dirs[name] = d
    return dirs


class CgroupV1:
    """One sandbox's cgroups in the v1 ``memory``, ``pids`` and ``cpuacct`` hierarchies."""

    CONTROLLERS = ("memory", "pids", "cpuacct")
    _counter = 0
    _lock = threading.Lock()

    def __init__(self, bases: dict[str, str], memory_bytes: int, max_processes: int) -> None:
        with CgroupV1._lock:
            CgroupV1._counter += 1
            name = f"{_PREFIX}{os.getpid()}-{CgroupV1._counter}"
        self.name = name
        self.dirs = {c: os.path.join(bases[c], name) for c in self.CONTROLLERS}
        self.max_processes = max_processes
        try:
            for d in self.dirs.values():
                os.mkdir(d)
            memory = str(memory_bytes)
            self._write("memory", "memory.limit_in_bytes", memory)
            if os.path.exists(os.path.join(self.dirs["memory"], "memory.memsw.limit_in_bytes")):
                self._write("memory", "memory.memsw.limit_in_bytes", memory)
            self._write("pids", "pids.max", str(max_processes + EXTRA_PROCESSES))
        except OSError:
            self.close()
            raise

    @staticmethod
    def bases() -> dict[str, str] | None:
        """Where this process may create sandbox cgroups (all three controllers), or None.

        Also removes the empty cgroups, older than an hour, of harness processes that died without
        cleaning up.
        """
        dirs = _own_cgroup_dirs(CgroupV1.CONTROLLERS)
        if len(dirs) != len(CgroupV1.CONTROLLERS):
            return None
        for base in dirs.values():
            for entry in os.scandir(base):
                owner = entry.name.split("-")[2] if entry.name.startswith(_PREFIX) else ""
                stale = time.time() - entry.stat().st_mtime > STALE_AFTER_S
                if owner.isdigit() and stale and not os.path.exists(f"/proc/{owner}"):
                    try:
                        os.rmdir(entry.path)
                    except OSError:  # not empty: something still runs in it
                        logger.warning("stale sandbox cgroup %s still holds processes", entry.path)
        return dirs

    def _write(self, controller: str, name: str, value: str) -> None:
        with open(os.path.join(self.dirs[controller], name), "w") as f:
            f.write(value)

    def _read(self, controller: str, name: str) -> str:
        with open(os.path.join(self.dirs[controller], name)) as f:
            return f.read()

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.dirs.values()]

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in self._read("pids", "cgroup.procs").split()]
        except OSError:
            return []

    def usage(self) -> Usage:
        return Usage(int(self._read("cpuacct", "cpuacct.usage")) / 1e9,
                     int(self._read("memory", "memory.max_usage_in_bytes")), len(self.pids()))

    def limit_hit(self) -> str | None:
        """``memory`` if a charge ever hit the memory limit (``failcnt``) or the OOM killer acted, ``processes``
        if the process count reached its cap: the kernel's counters, which nothing in the sandbox can write."""
        oom = dict(line.split() for line in self._read("memory", "memory.oom_control").splitlines() if line)
        if int(oom.get("oom_kill", 0)) > 0 or int(self._read("memory", "memory.failcnt")) > 0:
            return "memory"
        events = dict(line.split() for line in self._read("pids", "pids.events").splitlines() if line)
        # RLIMIT_NPROC (per sandbox uid) usually refuses the fork first; pids.peak shows it got there
        peak_file = os.path.join(self.dirs["pids"], "pids.peak")
        peak = int(self._read("pids", "pids.peak")) if os.path.exists(peak_file) else 0
        return "processes" if int(events.get("max", 0)) > 0 or peak >= self.max_processes else None

    def holds(self, pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                return any(line.rstrip("\n").endswith("/" + self.name) for line in f)
        except OSError:
            return False

    def close(self) -> None:
        """Kill what is left in the cgroups and remove them."""
        deadline = time.monotonic() + KILL_WAIT_S
        for d in self.dirs.values():
            while os.path.isdir(d):
                for pid in self.pids():
                    kill_if(pid, self.holds)
                try:
                    os.rmdir(d)
                except OSError:
                    if time.monotonic() > deadline:
                        logger.warning("could not remove cgroup %s: processes remain in it", d)
                        break
                    time.sleep(0.01)


# -- /proc accounting (no cgroups) ----------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class _Scan:
    """Processes found by scanning /proc with :meth:`holds` (used where cgroups are not writable)."""

    def __init__(self) -> None:
        self.peak_processes = 0

    def holds(self, pid: int) -> bool:
        raise NotImplementedError

    def pids(self) -> list[int]:
        return [int(name) for name in os.listdir("/proc") if name.isdigit() and self.holds(int(name))]

    def running(self) -> list[int]:
        """:meth:`pids` less zombies: those hold nothing, and an orphan waits for a host reaper that may be slow."""
        out = []
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):  # exited meanwhile
                continue
            if state not in ("Z", "X"):
                out.append(pid)
        return out

    def usage(self) -> Usage:
        cpu, rss, pids = 0.0, 0, self.pids()
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{pid}/statm") as f:
                    rss += int(f.read().split()[1]) * _PAGE
                cpu += sum(int(x) for x in fields[11:15]) / _TICK  # utime stime cutime cstime
            except (OSError, IndexError, ValueError):  # exited while being read
                continue
        self.peak_processes = max(self.peak_processes, len(pids))
        return Usage(cpu, rss, len(pids))


class PidNamespace(_Scan):
    """The processes of one PID namespace (a sandbox's, seen from the host)."""

    def __init__(self, pid1: int) -> None:
        super().__init__()
        self.link = os.readlink(f"/proc/{pid1}/ns/pid")
        if self.link == os.readlink("/proc/self/ns/pid"):
            raise RuntimeError(f"pid {pid1} is not in a PID namespace of its own: the sandbox did not start as "
                               "expected; refusing to account for it")

    def holds(self, pid: int) -> bool:
        try:
            return os.readlink(f"/proc/{pid}/ns/pid") == self.link
        except OSError:  # exited meanwhile
            return False


class Session(_Scan):
    """The processes of the session that ``leader`` started (the unsandboxed mode: a ``setsid`` escapes it)."""

    def __init__(self, leader: int) -> None:
        super().__init__()
        self.sid = leader

    def holds(self, pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return int(f.read().rsplit(")", 1)[1].split()[3]) == self.sid  # state ppid pgrp session
        except (OSError, IndexError, ValueError):
            return False


# -- output ------------------------------------------------------------------------------------------
class Output:
    """A sandbox's stdout and stderr: a pipe that a thread drains, keeping the first ``cap`` bytes.

    :attr:`count` is every byte the sandbox wrote (past the cap too: the thread keeps reading, so the
    writer never blocks, and the watcher ends the sandbox). The program cannot change it: seeking,
    truncating or preallocating a pipe does nothing.
    """

    def __init__(self, cap: int) -> None:
        self.cap, self.count = cap, 0
        self._kept = bytearray()
        self._lock = threading.Lock()
        self._read_fd, self.write_fd = os.pipe()
        self._thread = threading.Thread(target=self._drain, name="sandbox-output", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        try:
            while True:
                chunk = os.read(self._read_fd, _CHUNK)
                if not chunk:  # every writer is gone
                    return
                with self._lock:
                    self._kept += chunk[:max(self.cap - len(self._kept), 0)]
                    self.count += len(chunk)
        finally:
            os.close(self._read_fd)

    def close_writer(self) -> None:
        """Close the harness's copy of the write end (once the sandbox holds its own), so EOF can come."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def finish(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the sandbox's last writes (after its processes are gone)."""
        self.close_writer()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("sandbox output still open %.0f s after the sandbox was killed", timeout)

    def tail(self, chars: int) -> str:
        with self._lock:
            return bytes(self._kept[-chars:]).decode("utf-8", errors="replace")


def kill_if(pid: int, belongs: Callable[[int], bool]) -> None:
    """SIGKILL ``pid`` only if, once pinned by a pidfd, it still ``belongs`` (no kill of a reused pid)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # already gone
        return
    try:
        if belongs(pid):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(fd)
