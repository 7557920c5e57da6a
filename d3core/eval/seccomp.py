"""The code sandbox's system-call filter: a deny list that libseccomp compiles to a BPF program.

Namespaces decide what a sandboxed program can *see*; this filter narrows which parts of the
kernel it can *call*. It refuses the interfaces a confined, unprivileged program has no use for
and that have been the way out of containers before:

* io_uring, the key store, ``bpf``, ``userfaultfd``, ``perf_event_open``;
* ``ptrace``, ``process_vm_readv``/``writev`` and ``pidfd_getfd`` (another process's memory or files);
* the mount family, ``unshare``, ``setns``, and ``clone`` with a namespace flag; ``clone3`` as a
  whole, because its flags sit in memory a filter cannot read (glibc then falls back to ``clone``,
  whose flags it can: the usual container-runtime arrangement);
* kexec and kernel modules, plus a few host-only calls (``open_by_handle_at``, ``iopl``, ``reboot``...);
* ``socket(AF_VSOCK)``: vsock is not network-namespaced, so it would reach the VM's host.

A refused call fails with ``ENOSYS``, as if the kernel did not have it (``EAFNOSUPPORT`` for
vsock, as if it were not built in): programs that probe for a feature fall back, and the answer
cannot be mistaken for the kernel's own ``EPERM``. A system call of another ABI (i386 through
``int 0x80``, x32 numbers on x86_64) kills the process. Everything else is allowed.

The program is built once per process with `pyseccomp <https://pypi.org/project/pyseccomp/>`_
(ctypes over the system ``libseccomp.so.2``) and handed to bubblewrap (``--seccomp FD``), or, in
the opted-in unsandboxed mode, loaded by the in-sandbox server before the candidate's first line.
Where libseccomp cannot be loaded, :func:`program` warns once and returns None, and verdicts name
the confinement without ``+seccomp``. A deny list covers only the calls libseccomp knows by name
(calls newer than its table are allowed; names it does not know are listed in a warning).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import tempfile

logger = logging.getLogger(__name__)

REFUSED = errno.ENOSYS  # what a denied call returns
DENIED = {
    "io_uring": ("io_uring_setup", "io_uring_enter", "io_uring_register"),
    "keys": ("add_key", "request_key", "keyctl"),
    "bpf": ("bpf",),
    "userfaultfd": ("userfaultfd",),
    "perf": ("perf_event_open",),
    "ptrace": ("ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd"),
    "mount": ("mount", "umount2", "pivot_root", "move_mount", "open_tree", "fsopen", "fsmount", "fsconfig",
              "fspick", "mount_setattr"),
    "namespaces": ("unshare", "setns", "clone3"),
    "kexec": ("kexec_load", "kexec_file_load"),
    "modules": ("init_module", "finit_module", "delete_module"),
    "host": ("open_by_handle_at", "iopl", "ioperm", "acct", "swapon", "swapoff", "reboot", "syslog", "quotactl",
             "fanotify_init", "lookup_dcookie"),
}
# clone()'s namespace flags (linux/sched.h). CLONE_NEWTIME (0x80) shares its bit with clone()'s exit
# signal and exists only for clone3 and unshare, which are refused whole.
CLONE_NAMESPACES = {"CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000, "CLONE_NEWUTS": 0x04000000,
                    "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
                    "CLONE_NEWNET": 0x40000000}
AF_VSOCK = 40
_LOW32 = 0xFFFFFFFF  # int arguments: the kernel reads the low 32 bits, so the filter compares only those
FIX = ("install the dependency (pip install pyseccomp; it needs the system libseccomp.so.2: apt-get install "
       "libseccomp2 / dnf install libseccomp)")


def _library():
    try:
        import pyseccomp
    except (ImportError, OSError, RuntimeError) as err:  # RuntimeError: pyseccomp found no libseccomp
        return None, f"{type(err).__name__}: {err}"
    return pyseccomp, ""


@functools.lru_cache(maxsize=1)
def program() -> bytes | None:
    """The filter as a BPF program (``struct sock_filter`` array), or None where libseccomp is missing.

    Built once per process; the reason it could not be built is logged once.
    """
    sc, why = _library()
    if sc is not None:
        try:
            return _build(sc)
        except OSError as err:  # libseccomp refused the filter itself (errno names why)
            why = f"libseccomp could not build the filter: {err}"
    logger.warning("code sandbox: NO system-call filter (%s). Sandboxed programs can reach io_uring, bpf, the key "
                   "store and the rest of the kernel; verdicts name the confinement without '+seccomp'. Fix: %s",
                   why, FIX)
    return None


def _build(sc) -> bytes:
    rules = sc.SyscallFilter(sc.ALLOW)
    try:
        rules.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    except OSError:  # libseccomp < 2.4 or a kernel without SECCOMP_RET_KILL_PROCESS: kill the thread
        rules.set_attr(sc.Attr.ACT_BADARCH, sc.KILL)
    unknown = []
    for names in DENIED.values():
        for name in names:
            try:
                rules.add_rule(sc.ERRNO(REFUSED), name)
            except OSError:  # a name this libseccomp's system-call table lacks
                unknown.append(name)
    flags_arg = 1 if sc.system_arch() in (sc.Arch.S390, sc.Arch.S390X) else 0  # clone(flags, ...) elsewhere
    for flag in CLONE_NAMESPACES.values():
        rules.add_rule(sc.ERRNO(REFUSED), "clone", sc.Arg(flags_arg, sc.MASKED_EQ, flag, flag))
    rules.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), "socket", sc.Arg(0, sc.MASKED_EQ, _LOW32, AF_VSOCK))
    if unknown:
        logger.warning("code sandbox: the system-call filter cannot refuse %s: this libseccomp does not know them. "
                       "Fix: a newer libseccomp (2.5.4 knows them all)", ", ".join(unknown))
    with tempfile.TemporaryFile() as out:
        rules.export_bpf(out)
        out.seek(0)
        return out.read()


def number(name: str) -> int:
    """The native number of system call ``name`` (for probes), from libseccomp's table."""
    sc, why = _library()
    if sc is None:
        raise RuntimeError(f"cannot look up system call {name!r}: libseccomp could not be loaded ({why}). Fix: {FIX}")
    return sc.resolve_syscall(sc.Arch.NATIVE, name)


def program_fd(code: bytes) -> int:
    """An anonymous file holding ``code``, read from its start (bubblewrap's ``--seccomp FD``); close it after use."""
    fd = os.memfd_create("d3ray-seccomp")
    try:
        os.write(fd, code)
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError:
        os.close(fd)
        raise
    return fd
