"""Where the main job's output goes: the console shows each stage's progress bar, the report's path and errors;
every log record and every Ray worker's output goes to files under ``RUN_DIR/logs/``.

- ``driver.log``: every log record (INFO and above) of the driver process: d3ray's own, Ray's,
  Ray Data's, Ray Train's, transformers', Python warnings, and what native code writes to the
  process's stderr (Ray's core worker). The console keeps d3ray's warnings and errors.
- ``workers.log``: what the Ray worker processes print (their log records, warnings, Ray Data's
  progress inside training workers, ...) when the job starts its own Ray; on a cluster the job
  joins, the workers' output stays in Ray's logs on each node. Either way Ray forwards nothing to
  the console (``log_to_driver=False``), and Ray Data draws no progress bars of its own.

A refusal before the run directory is claimed (``recipe.yaml`` written) leaves the run directory as
it was: until then the driver's log is kept in a temporary directory, then moved to
``RUN_DIR/logs/``. A remote run directory's logs are written locally and copied there at the end.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile

from pipelines import _io

LOGS = "logs"
DRIVER_LOG = "driver.log"
WORKERS_LOG = "workers.log"
WORKER_LOG_ENV = "D3RAY_WORKER_LOG"  # the file Ray worker processes print to (set in their runtime_env)
FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
# Loggers that print by themselves (a console handler of their own, no propagation): sent to the files instead.
SELF_PRINTING = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "transformers")


class RunLogs:
    """``with RunLogs(run_dir) as logs:`` routes the main job's logs; :meth:`claim` moves them into the run
    directory once it is the run's; an error on the way out is followed by where the logs are."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        local = "://" not in run_dir or run_dir.startswith("file://")
        self.final = os.path.abspath(os.path.join(run_dir.removeprefix("file://"), LOGS)) if local else None
        self.dir = tempfile.mkdtemp(prefix="d3ray-logs-")  # until claim()
        self.claimed = False
        self._file: logging.Handler | None = None
        self._console: logging.Handler | None = None
        self._stderr = sys.stderr

    def __enter__(self) -> RunLogs:
        # Python's sys.stderr stays the terminal (bars, errors); the process's fd 2, where native code writes, is
        # the log file (see _to).
        sys.stderr.flush()
        sys.stderr = os.fdopen(os.dup(2), "w", buffering=1)
        self._console = logging.StreamHandler(sys.stderr)
        self._console.setLevel(logging.WARNING)
        self._console.addFilter(lambda record: record.name.startswith("d3ray"))
        self._console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(self._console)
        root.setLevel(logging.INFO)
        self._to(os.path.join(self.dir, DRIVER_LOG))
        _quiet_libraries()
        return self

    def __exit__(self, kind, error, tb) -> None:
        refused = isinstance(error, (ValueError, FileNotFoundError)) and not self.claimed  # one line says it all
        if error is not None and not refused and not isinstance(error, KeyboardInterrupt):
            self._file.handle(logging.LogRecord("d3ray.full", logging.ERROR, __file__, 0, "the job failed", None,
                                                (kind, error, tb)))
            print(f"logs: {self.dir}", file=sys.stderr)
        root = logging.getLogger()
        for handler in (self._console, self._file):
            root.removeHandler(handler)
            handler.close()
        sys.stderr.flush()
        os.dup2(sys.stderr.fileno(), 2)
        sys.stderr.close()
        sys.stderr = self._stderr
        if self.final is None and self.claimed:  # a remote run dir: its logs are copied there
            try:
                fs, root_path = _io.fs_root(_io.join(self.run_dir, LOGS))
                fs.put(self.dir.rstrip("/") + "/", root_path, recursive=True)
            except OSError as err:
                print(f"warning: the logs stay in {self.dir}: copying them to {self.run_dir} failed ({err})",
                      file=sys.stderr)

    def claim(self) -> None:
        """The run directory is the run's now: the logs move into ``RUN_DIR/logs/`` (a local run dir)."""
        self.claimed = True
        if self.final is None or self.dir == self.final:
            return
        os.makedirs(self.final, exist_ok=True)
        staged, target = os.path.join(self.dir, DRIVER_LOG), os.path.join(self.final, DRIVER_LOG)
        self._file.flush()
        with open(staged, "rb") as src, open(target, "ab") as dst:
            shutil.copyfileobj(src, dst)
        self._to(target)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = self.final

    def ray_options(self) -> dict:
        """``ray.init`` options of a Ray this job starts: its workers print to ``workers.log``."""
        path = os.path.join(self.final or self.dir, WORKERS_LOG)
        return {"log_to_driver": False, "runtime_env": {"env_vars": {WORKER_LOG_ENV: path},
                                                        "worker_process_setup_hook": f"{__name__}.worker_setup"}}

    def _to(self, path: str) -> None:
        """The driver's log records, and what native code writes to its stderr, go to ``path`` from now on."""
        handler = logging.FileHandler(path)
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter(FORMAT))
        os.dup2(handler.stream.fileno(), 2)
        root = logging.getLogger()
        if self._file is not None:
            root.removeHandler(self._file)
            self._file.close()
        root.addHandler(handler)
        self._file = handler


def _quiet_libraries() -> None:
    """Libraries that print by themselves log through the root logger (to the file); Ray Data draws no bars."""
    import ray.data
    import transformers

    for name in SELF_PRINTING:
        lg = logging.getLogger(name)
        lg.handlers = [h for h in lg.handlers if not isinstance(h, logging.StreamHandler)
                       or isinstance(h, logging.FileHandler)]
        lg.propagate = True
    transformers.logging.disable_default_handler()
    transformers.logging.enable_propagation()
    logging.captureWarnings(True)
    ray.data.DataContext.get_current().enable_progress_bars = False


# The lines Ray prints into every worker's output to attribute it (they mean nothing in the run's log).
RAY_MARKERS = (":job_id:", ":actor_name:", ":task_name:")


class _ToRunLog:
    """A worker's stdout or stderr: the run's workers log once its directory exists (the run dir is claimed),
    Ray's own log of the worker until then."""

    def __init__(self, original, path: str) -> None:
        self._original, self._path, self._file = original, path, None
        self._marker = False  # the last write was one of Ray's markers: drop the newline print() sends after it

    def _target(self):
        if self._file is None and os.path.isdir(os.path.dirname(self._path)):
            self._file = open(self._path, "a", buffering=1)
        return self._file or self._original

    def write(self, text: str) -> int:
        target = self._target()
        if target is self._file and (text.startswith(RAY_MARKERS) or (self._marker and text == "\n")):
            self._marker = not self._marker
            return len(text)
        self._marker = False
        return target.write(text)

    def flush(self) -> None:
        self._target().flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str):  # fileno, encoding, ...: the stream Ray gave the worker
        return getattr(self._original, name)


def worker_setup() -> None:
    """Ray's ``worker_process_setup_hook`` (see :meth:`RunLogs.ray_options`): this worker prints to the run's log."""
    path = os.environ.get(WORKER_LOG_ENV)
    if path:
        sys.stdout, sys.stderr = _ToRunLog(sys.stdout, path), _ToRunLog(sys.stderr, path)
        handler = logging.StreamHandler(sys.stderr)  # d3ray's records in a worker (training steps, ...)
        handler.setFormatter(logging.Formatter(FORMAT))
        d3ray = logging.getLogger("d3ray")
        d3ray.addHandler(handler)
        d3ray.setLevel(logging.INFO)
        d3ray.propagate = False
