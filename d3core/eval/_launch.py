"""Start one sandbox as root: join its cgroups, give it its own user namespace, exec bubblewrap.

Run by :mod:`d3core.eval.sandbox` as ``python -I -S _launch.py SPEC_JSON`` (standard library
only, no threads, so ``fork`` here is safe). The user namespace maps two ids: root to root, so
bubblewrap can still read the Python it binds in while it sets the sandbox up, and the sandbox
uid to the same, unprivileged, host uid, which is all the candidate ever runs as (the in-sandbox
server drops to it before any candidate code runs). ``user.max_user_namespaces`` is set to 0
inside the namespace, so nothing in the sandbox can create a user namespace of its own. The fds
bubblewrap reads (``--info-fd``, and ``--seccomp`` with the system-call filter) pass through the exec.
"""

import ctypes
import json
import os
import sys

CLONE_NEWUSER = 0x10000000
USERNS_PLACEHOLDER = "@USERNS_FD@"


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _child_userns(uid: int, gid: int) -> int:
    """An fd of a fresh user namespace mapping 0->0 and uid->uid (the holder process exits)."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(ready_r)
            os.close(go_w)
            if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWUSER) == 0:
                os.write(ready_w, b"u")
                if os.read(go_r, 1) == b"m":
                    _write("/proc/sys/user/max_user_namespaces", "0")
                    code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(go_r)
    if os.read(ready_r, 1) != b"u":
        raise SystemExit("d3ray sandbox launcher: unshare(CLONE_NEWUSER) failed")
    _write(f"/proc/{pid}/uid_map", f"0 0 1\n{uid} {uid} 1\n")
    _write(f"/proc/{pid}/gid_map", f"0 0 1\n{gid} {gid} 1\n")
    fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY)
    os.write(go_w, b"m")
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise SystemExit(f"d3ray sandbox launcher: user namespace setup failed (status {status})")
    os.set_inheritable(fd, True)
    return fd


def main() -> None:
    spec = json.loads(sys.argv[1])
    for procs in spec["cgroup_procs"]:
        _write(procs, str(os.getpid()))
    argv = spec["argv"]
    if USERNS_PLACEHOLDER in argv:
        fd = _child_userns(spec["uid"], spec["gid"])
        argv = [str(fd) if a == USERNS_PLACEHOLDER else a for a in argv]
    os.execve(argv[0], argv, spec["env"])


if __name__ == "__main__":
    main()
