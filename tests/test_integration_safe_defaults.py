"""Safe defaults: loopback binding, Ray token auth on, safetensors-only weights, no paths from requests;
and cluster.yaml passes Ray's own cluster-config validation."""

import copy
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT

from wanray.config import Config, load_config


class Trap:
    """Unpickling this writes a file: evidence that a loader ran code from a pickle."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path(self.path).write_text, ("code ran",))


@pytest.mark.parametrize("preset", [None, "tiny.yaml", "t2v_a14b.yaml"])
def test_services_bind_to_loopback_by_default(preset):
    cfg = Config() if preset is None else load_config(ROOT / "configs" / preset)
    assert cfg.infer.host == "127.0.0.1"


def test_the_cluster_launcher_turns_token_authentication_on():
    """Ray's default is RAY_AUTH_MODE=disabled: cluster.yaml starts every node with token mode and the token
    copied from the launcher, and never turns it off (the test below shows what a cluster with it does to a
    client without the token)."""
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    commands = [
        c
        for key in ("head_start_ray_commands", "worker_start_ray_commands", "setup_commands")
        for c in raw.get(key, [])
    ]
    assert commands and not any(re.search(r"RAY_AUTH_MODE\s*=\s*['\"]?disabled", c) for c in commands)
    starts = [
        c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in raw[key] if "ray start" in c
    ]
    assert len(starts) == 2 and all(c.index("export RAY_AUTH_MODE=token") < c.index("ray start") for c in starts)
    assert raw["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}


def test_cluster_rejects_a_client_without_the_token(ray_cluster, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token here
    code = f"import ray; ray.init(address='{ray_cluster}'); print('joined')"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "joined" not in out.stdout
    assert re.search(r"(?i)token|authenticat", out.stdout + out.stderr)


def test_weights_load_from_safetensors_only(tiny_model, tmp_path):
    from wanray import models

    assert not [p for p in tiny_model.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    pickled = tmp_path / "pickled"
    (pickled / "transformer").mkdir(parents=True)
    (pickled / "transformer" / "config.json").write_text((tiny_model / "transformer" / "config.json").read_text())
    torch.save(
        models.load_expert(tiny_model, "high").state_dict(), pickled / "transformer" / "diffusion_pytorch_model.bin"
    )
    with pytest.raises(OSError, match="no file named diffusion_pytorch_model.safetensors"):
        models.load_expert(pickled, "high")
    # a booby-trapped pickle beside the safetensors: loading the expert never unpickles it
    trapped = tmp_path / "trapped"
    shutil.copytree(tiny_model, trapped)
    marker = tmp_path / "unpickled"
    with (trapped / "transformer" / "diffusion_pytorch_model.bin").open("wb") as f:
        pickle.dump(Trap(str(marker)), f)
    expert = models.load_expert(trapped, "high")
    assert not marker.exists() and sum(p.numel() for p in expert.parameters()) > 0


def test_requests_carry_no_paths():
    from pydantic import ValidationError

    from wanray.infer.api import GenerateRequest

    assert not [f for f in GenerateRequest.model_fields if re.search("path|file|dir|model|url", f)]
    with pytest.raises(ValidationError):
        GenerateRequest(prompt="a cat", model_path="/etc/passwd")


def test_cluster_yaml_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))  # what `ray up` runs before starting anything
    assert raw["provider"]["type"] == "local"
    workers = " ".join(raw["worker_start_ray_commands"])
    assert '"NPU": 8' in workers and "wanray/node-kind=cpu" in workers
    assert "[npu]" in " ".join(raw["setup_commands"]) and "set_env.sh" in " ".join(raw["setup_commands"])
    broken = copy.deepcopy(raw)
    broken["max_worker"] = broken.pop("max_workers")
    from jsonschema import ValidationError

    with pytest.raises(ValidationError, match="'max_worker' was unexpected"):
        validate_config(prepare_config(broken))
