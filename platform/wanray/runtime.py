"""Driver plumbing shared by the pipelines, tests and benchmarks: joining Ray, one-line errors on
bad input, a free local port. Library functions never join Ray themselves: the driver does."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from wanray.errors import USER_ERRORS


def connect_ray(**kwargs):
    """Join the cluster named by RAY_ADDRESS, or start a local Ray instance."""
    import ray

    if not ray.is_initialized():
        # Read by a local instance this starts (a cluster keeps its own setting). Ray kills idle
        # workers beyond num_cpus; with fractional-CPU Ray Data tasks, each run would start new
        # worker processes that import the decode code again.
        cpus = kwargs.get("num_cpus") or os.cpu_count() or 1
        os.environ.setdefault("RAY_num_workers_soft_limit", str(4 * max(1, round(cpus))))
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True, **kwargs)
    return ray


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def fail(program: str):
    try:
        yield
    except USER_ERRORS as e:
        print(f"{Path(program).name}: error: {e}", file=sys.stderr)
        sys.exit(2)
