"""Driver plumbing shared by the pipelines: joining Ray, and one-line errors on bad input."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from wanray.config import ConfigError
from wanray.data.manifest import ManifestError
from wanray.models import ModelDirError


class RequestError(ValueError):
    """A generation request the platform will not run (out of the configured bounds, malformed);
    the server sends the message back to the client as is."""


# Errors caused by what the user passed in: reported as one line, exit status 2.
USER_ERRORS = (ConfigError, ManifestError, ModelDirError, FileNotFoundError, RequestError)


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


@contextlib.contextmanager
def fail(program: str):
    try:
        yield
    except USER_ERRORS as e:
        print(f"{Path(program).name}: error: {e}", file=sys.stderr)
        sys.exit(2)
