"""Driver plumbing shared by the pipelines, tests and benchmarks: joining Ray, one-line errors on
bad input, a free local port. Library functions never join Ray themselves: the driver does."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from wanray.errors import USER_ERRORS


def connect_ray(verbose: bool = False, **kwargs):
    """Join the cluster named by RAY_ADDRESS, or start a local Ray instance.

    Unless `verbose`, the console holds wanray's own lines only: Ray's driver logging below errors,
    its workers' output (per-report, per-block and library lines; the training ranks' progress
    reaches the console through the driver, see wanray.train.console.Follow) and Ray Data's
    progress lines stay in Ray's log files; on a terminal Ray Data still draws its progress bars."""
    import logging

    import ray

    if not verbose:
        logging.getLogger("ray").setLevel(logging.ERROR)
        # the C++ core's own stderr lines (e.g. a spurious one per Ray Data actor pool, ray#53727)
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        _quiet_ray_data_console()
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = verbose or sys.stderr.isatty()
    if not ray.is_initialized():
        # Read by a local instance this starts (a cluster keeps its own setting). Ray kills idle
        # workers beyond num_cpus; with fractional-CPU Ray Data tasks, each run would start new
        # worker processes that import the decode code again. The many small actors of a run would
        # also set off the raylet's "N worker processes have been started" warning on a small machine.
        cpus = kwargs.get("num_cpus") or os.cpu_count() or 1
        os.environ.setdefault("RAY_num_workers_soft_limit", str(4 * max(1, round(cpus))))
        os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(max(16, round(cpus))))
        with contextlib.nullcontext() if verbose else _stderr_silenced():  # the C++ core's note that it read
            ray.init(
                address=os.environ.get("RAY_ADDRESS") or None,
                log_to_driver=verbose,  # the level
                logging_level=logging.INFO if verbose else logging.ERROR,
                **kwargs,
            )
    return ray


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 to /dev/null for the block (C++ code writes there directly); an exception
    raised in the block is printed after it is restored."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _quiet_ray_data_console() -> None:
    """Ray Data's console handler at ERROR; its log file (ray-data.log in the session's logs) keeps
    everything. Ray Data has no public switch: its logging config file (RAY_DATA_LOGGING_CONFIG),
    which it reads again whenever it reconfigures, is its documented way in."""
    import copy
    import tempfile

    import yaml
    from ray.data._internal import logging as data_logging

    if "RAY_DATA_LOGGING_CONFIG" in os.environ:
        return
    config = copy.deepcopy(data_logging.DEFAULT_CONFIG)
    config["handlers"]["console"]["level"] = "ERROR"
    path = Path(tempfile.gettempdir()) / f"wanray-ray-data-logging-{os.getpid()}.yaml"
    path.write_text(yaml.safe_dump(config))
    os.environ["RAY_DATA_LOGGING_CONFIG"] = str(path)
    data_logging.configure_logging()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STORE_ERRORS = ("AWS Error", "google::cloud::Status", "GCS Error", "Azure Error")
"""What pyarrow's object-store filesystems put in the OSErrors they raise."""


@contextlib.contextmanager
def fail(program: str):
    """A driver's user error as one line and exit status 2; a Ctrl-C as "interrupted" and status 130 (the
    process's exit ends the Ray actors it owns: Ray Train's controllers and their workers)."""
    try:
        yield
    except USER_ERRORS as e:
        print(f"{Path(program).name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if not any(mark in str(e) for mark in STORE_ERRORS):
            raise
        # an object store refused or could not be reached (endpoint, credentials, bucket): pyarrow's message
        # names the operation, the bucket and key, and the store's error code
        print(f"{Path(program).name}: error: object storage: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{Path(program).name}: interrupted", file=sys.stderr)
        sys.exit(130)
