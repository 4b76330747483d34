"""Serve a Wan2.2 model: REST API, Gradio UI, one Ray Serve deployment per stage.

    python pipelines/serve.py --config configs/tiny.yaml [--model DIR] [--host 127.0.0.1] [--port 8000]
    python pipelines/serve.py --config configs/t2v_a14b.yaml --plan    # memory per stage device, no weights

Runs on the cluster in RAY_ADDRESS, else on a local Ray it starts; prints the URL and
serves until interrupted (Ctrl-C or SIGTERM removes the application). Binds infer.host
(127.0.0.1 unless told otherwise).
"""

import os
import signal
import sys

if __name__ == "__main__":  # run as the driver (not imported as a RayService's app)
    # SIGTERM before Ray is connected has nothing to clean up: exit 0 at once, also while the imports below load.
    # os._exit, not sys.exit: a library's bare `except:` around an optional import would swallow SystemExit.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))

import argparse
import threading
import time
from pathlib import Path

from wanray.config import add_config_args, load_config
from wanray.infer.api import exposure_warning, serving_token
from wanray.infer.plan import print_plan
from wanray.infer.serve import UI_PATH, remove_app, start
from wanray.model_files import ensure_model
from wanray.runtime import connect_ray, fail

ROOT = Path(__file__).resolve().parents[1]
UI_DIR = ROOT / "ui"


def get_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--model", help="diffusers-format Wan2.2 directory to serve (sets model.path)")
    parser.add_argument("--host", help="address to bind (sets infer.host; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, help="port to bind (sets infer.port)")
    parser.add_argument("--no-ui", action="store_true", help="serve the REST API only")
    parser.add_argument(
        "--plan",
        action="store_true",
        help="print each stage device's memory at the largest request (infer.max_*) instead of serving",
    )
    return parser.parse_args()


def main(args):
    overrides = list(args.overrides)
    if args.model:
        overrides += [f"model.path={args.model}", "model.create_tiny=false"]
    overrides += [f"infer.host={args.host}"] if args.host else []
    overrides += [f"infer.port={args.port}"] if args.port else []
    cfg = load_config(args.config, overrides)
    if args.plan:
        sys.exit(0 if print_plan(cfg, "serve") else 1)
    model_dir = ensure_model(cfg.model)
    ui = None if args.no_ui else page()
    # `kill` cleans up like Ctrl-C, also mid-start. The interrupt is raised where the signal lands, which may be
    # inside Ray's or Serve's code, whose handlers can swallow it: the flag is checked after each step as well.
    stopping = threading.Event()

    def interrupt(signum, frame):
        stopping.set()
        raise KeyboardInterrupt

    def stop_if_asked():
        if stopping.is_set():
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        # py_modules ships ui/ to every node; Serve deployments inherit the job's runtime_env.
        connect_ray(args.verbose, runtime_env={"py_modules": [str(UI_DIR)]})
        # again: connecting installs Ray core's own SIGTERM handler (it logs the signal and exits 15)
        signal.signal(signal.SIGTERM, interrupt)
        stop_if_asked()
        print(
            f"starting the deployments for {model_dir} (text encoder, high-noise expert, low-noise expert, VAE)",
            flush=True,
        )
        url = start(cfg, str(model_dir), ui)
        stop_if_asked()
        print(f"wanray is serving {model_dir} at {url}", flush=True)
        if (warning := exposure_warning(cfg, serving_token(cfg))) is not None:
            print(warning, file=sys.stderr, flush=True)
        print(f"  REST API: POST {url}/v1/generate, GET {url}/v1/health", flush=True)
        if ui is not None:
            print(f"  UI:       {url}{UI_PATH}/", flush=True)
        while not stopping.is_set():
            time.sleep(1)
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        import ray

        if ray.is_initialized():  # interrupted while connecting: nothing of ours is deployed yet either
            remove_app()
            ray.shutdown()
        # Done, and the status is 0: end here. A fresh-clone CI run saw this driver, SIGTERMed as Serve started,
        # exit by SIGINT (-2) with nothing printed after this cleanup: CPython sets _Py_UnhandledKeyboardInterrupt
        # when a KeyboardInterrupt leaves code run through its PyRun_* entry points (a library's, here), keeps it
        # when the exception is caught further up, and kills itself with SIGINT at exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def page():
    """The UI: ui/app.py of this checkout (py_modules ships ui/ to every node)."""
    sys.path.insert(0, str(ROOT))
    from ui.app import build_ui

    return build_ui


APP_ARGS = ("config", "set", "ui", "open")


def app(args: dict):
    """The application for a RayService's serveConfigV2 (deploy/kuberay/rayservice.yaml): `import_path:
    pipelines.serve:app` with args `config` (a path, relative to this checkout), `set` (key=value
    overrides), `ui` (default true) and `open` (default false: without an API token it refuses to build).
    Serve calls it in the cluster; the API token comes from WANRAY_API_TOKEN there (or infer.api_token)."""
    from wanray.errors import ConfigError
    from wanray.infer.serve import build_app

    if unknown := sorted(set(args) - set(APP_ARGS)):
        raise ConfigError(f"unknown application args {unknown}; pipelines.serve:app takes {list(APP_ARGS)}")
    if "config" not in args:
        raise ConfigError("pipelines.serve:app needs args.config (a config file, e.g. configs/t2v_a14b.yaml)")
    cfg = load_config(ROOT / args["config"], [str(s) for s in args.get("set", [])])
    if not serving_token(cfg) and not args.get("open", False):
        # a RayService's proxy listens on every address; Serve builds the application in a task on any node, so
        # a token set in one group's containers only may not be here
        raise ConfigError(
            "no API token where the application is built: set WANRAY_API_TOKEN in every group's containers (or "
            "infer.api_token), or args.open: true to serve without one"
        )
    ui = page() if args.get("ui", True) else None
    return build_app(cfg, str(ensure_model(cfg.model)), ui)


if __name__ == "__main__":
    with fail(sys.argv[0]):
        main(get_args())
