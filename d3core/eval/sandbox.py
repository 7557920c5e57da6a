"""Run untrusted benchmark code (HumanEval / MBPP solutions) in a confined child process.

Each program runs in a fresh Python interpreter (``-I -S -B``: no site-packages, no user
paths, no bytecode files) inside its own temporary directory, which is removed afterwards.
Layers, outermost first:

1. **Time**: a wall-clock limit (the whole process group is killed) and ``RLIMIT_CPU``.
2. **Memory and files**: ``RLIMIT_AS`` (address space), ``RLIMIT_FSIZE`` (stdout/stderr go to
   files in the work directory, so endless printing hits it too), no core dumps.
3. **Namespaces** (Linux, where the kernel lets this user create them): a new network
   namespace, so no interface but a downed loopback exists, and a new mount namespace in which
   every mount is remounted read-only except the work directory.
4. **Interpreter guard**: socket creation, process creation and signals are disabled, and file
   writes, renames and deletions outside the work directory raise ``PermissionError``. This is
   the only confinement where namespaces are unavailable; on its own it is best effort.

A program passes when it exits 0 *and* reaches its end: the runner prints a random nonce,
given on stdin, only after the program returns, so ``sys.exit(0)`` or ``os._exit(0)`` from
inside a solution counts as a failure.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

logger = logging.getLogger(__name__)

STATUSES = ("passed", "failed", "timeout")
_TAIL = 2000

_RUNNER = r'''
import ctypes, os, resource, sys

def _limits(mem, cpu, fsize):
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))

def _namespaces(work):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    newns, newnet, newuser = 0x00020000, 0x40000000, 0x10000000
    uid, gid = os.geteuid(), os.getegid()
    flags = newns | newnet | (0 if uid == 0 else newuser)
    if libc.unshare(flags) != 0:
        return "none"
    if uid != 0:
        try:
            for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"0 {uid} 1"),
                               ("/proc/self/gid_map", f"0 {gid} 1")):
                with open(path, "w") as f:
                    f.write(text)
        except OSError:
            return "net"
    def mount(src, dst, flags):
        return libc.mount(src, dst.encode(), None, flags, None) == 0
    ms_rdonly, ms_nosuid, ms_nodev, ms_noexec, ms_remount, ms_bind = 1, 2, 4, 8, 32, 4096
    ms_rec, ms_private, ms_noatime, ms_nodiratime, ms_relatime = 16384, 1 << 18, 1024, 2048, 1 << 21
    keep = {"nosuid": ms_nosuid, "nodev": ms_nodev, "noexec": ms_noexec, "noatime": ms_noatime,
            "nodiratime": ms_nodiratime, "relatime": ms_relatime}
    if not (mount(None, "/", ms_rec | ms_private) and mount(work.encode(), work, ms_bind | ms_rec)):
        return "net"
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    ok = True
    for fields in mounts:
        point = fields[4].encode().decode("unicode_escape")
        if point == work:
            continue
        extra = sum(keep.get(opt, 0) for opt in fields[5].split(","))
        ok &= mount(None, point, ms_remount | ms_bind | ms_rdonly | extra)
    return "net+fs" if ok else "net+fs-partial"

def _guard(work):
    import builtins, io, shutil, socket, subprocess
    root = os.path.realpath(work) + os.sep

    def inside(path):
        if isinstance(path, int):
            return True
        return (os.path.realpath(os.fspath(path)) + os.sep).startswith(root)

    def deny(name):
        def blocked(*args, **kwargs):
            raise PermissionError(f"d3ray sandbox: {name} is not allowed")
        return blocked

    def confined(name, fn, npaths=1):
        def wrapper(*args, **kwargs):
            for p in args[:npaths]:
                if not inside(p):
                    raise PermissionError(f"d3ray sandbox: {name} outside the work directory")
            return fn(*args, **kwargs)
        return wrapper

    real_open, real_os_open = builtins.open, os.open
    def safe_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError("d3ray sandbox: writing outside the work directory")
        return real_open(file, mode, *args, **kwargs)
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    def safe_os_open(path, flags, *args, **kwargs):
        if flags & writing and not inside(path):
            raise PermissionError("d3ray sandbox: writing outside the work directory")
        return real_os_open(path, flags, *args, **kwargs)
    builtins.open = io.open = safe_open
    os.open = safe_os_open
    for name in ("remove", "unlink", "rmdir", "removedirs", "mkdir", "makedirs", "truncate", "chmod", "chown",
                 "utime", "mkfifo"):
        if hasattr(os, name):
            setattr(os, name, confined(name, getattr(os, name)))
    for name in ("rename", "renames", "replace", "link", "symlink"):
        setattr(os, name, confined(name, getattr(os, name), npaths=2))
    for name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "execv", "execve", "execl", "execle",
                 "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnv", "spawnve", "posix_spawn",
                 "posix_spawnp", "putenv", "unsetenv", "setuid", "setgid", "chroot", "chdir", "fchdir"):
        if hasattr(os, name):
            setattr(os, name, deny("os." + name))
    for name in ("rmtree", "move", "copy", "copy2", "copyfile", "copytree", "chown"):
        setattr(shutil, name, deny("shutil." + name))
    subprocess.Popen = deny("subprocess")
    for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
        setattr(socket, name, deny("socket." + name))

def main():
    work, mem, cpu, fsize, isolate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    nonce = sys.stdin.readline().strip()
    sys.stdin.close()
    layers = _namespaces(work) if isolate == "1" else "off"
    os.chdir(work)
    _limits(mem, cpu, fsize)
    sys.stderr.write(f"d3ray-sandbox layers={layers}\n")
    sys.stderr.flush()
    with open("solution.py", encoding="utf-8") as f:
        source = f.read()
    code = compile(source, "solution.py", "exec")
    _guard(work)
    sys.argv = ["solution.py"]
    exec(code, {"__name__": "__main__", "__file__": "solution.py", "__builtins__": __builtins__})
    sys.stdout.flush()
    sys.stdout.write("\n" + nonce + "\n")
    sys.stdout.flush()

main()
'''


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one program. ``namespaces``: use network/mount namespaces where permitted."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    file_size_mb: int = 8
    namespaces: bool = True

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s={self.timeout_s}: must be > 0 seconds")
        if self.memory_mb < 64:
            raise ValueError(f"memory_mb={self.memory_mb}: a Python interpreter needs at least 64 MB")
        if self.file_size_mb < 1:
            raise ValueError(f"file_size_mb={self.file_size_mb}: must be >= 1")


@dataclass(frozen=True)
class ExecResult:
    status: str  # one of STATUSES
    returncode: int | None
    duration_s: float
    stdout_tail: str
    stderr_tail: str
    layers: str  # which confinement layers were active ("net+fs", "net", "none", "off", "?")

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - _TAIL, 0))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _layers(stderr: str) -> str:
    for line in stderr.splitlines():
        if line.startswith("d3ray-sandbox layers="):
            return line.split("=", 1)[1]
    return "?"


def run_program(source: str, limits: SandboxLimits = SandboxLimits()) -> ExecResult:
    """Run ``source`` as ``solution.py`` under ``limits``; never raises for what the program does."""
    work = Path(tempfile.mkdtemp(prefix="d3ray-sandbox-")).resolve()
    try:
        (work / "runner.py").write_text(_RUNNER, encoding="utf-8")
        (work / "solution.py").write_text(source, encoding="utf-8")
        nonce = secrets.token_hex(16)
        cmd = [sys.executable, "-I", "-S", "-B", str(work / "runner.py"), str(work), str(limits.memory_mb << 20),
               str(int(limits.timeout_s) + 1), str(limits.file_size_mb << 20), "1" if limits.namespaces else "0"]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work),
               "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        t0 = time.perf_counter()
        with open(work / "stdout", "wb") as out, open(work / "stderr", "wb") as err:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                    start_new_session=True)
            status = "failed"
            try:
                proc.stdin.write((nonce + "\n").encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                status = "timeout"
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole group, children included
                except ProcessLookupError:
                    pass
                proc.wait()
        duration = time.perf_counter() - t0
        stdout, stderr = _tail(work / "stdout"), _tail(work / "stderr")
        if status != "timeout" and proc.returncode == 0 and stdout.rstrip().endswith(nonce):
            status = "passed"
        return ExecResult(status, proc.returncode, duration, stdout, stderr, _layers(stderr))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_programs(
    sources: Sequence[str], limits: SandboxLimits = SandboxLimits(), workers: int = 2, progress: bool = False
) -> list[ExecResult]:
    """Run many programs, ``workers`` at a time (each in its own process); results in input order."""
    if workers < 1:
        raise ValueError(f"workers={workers}: must be >= 1")
    if not sources:
        return []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda s: run_program(s, limits), sources)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(sources), desc="sandbox", unit="program")
        return list(results)


def pass_at_1(results: Sequence[ExecResult]) -> float:
    """pass@1 with one sample per problem: the fraction of programs that passed."""
    return sum(r.passed for r in results) / len(results) if results else 0.0
