"""The Helm chart, rendered and linted by Helm's own Go engine and validated against Kubernetes.

``helm-python-sdk`` binds ``libhelm_c`` (Helm v4's Go SDK behind a C ABI) with ctypes: rendering,
``lint`` and ``values.schema.json`` validation below are Helm's, offline, with no helm binary.
Every rendered object is validated with ``kubernetes-validate`` (the upstream OpenAPI schemas in
their strict form, which reject unknown fields) for the oldest and newest Kubernetes versions it
ships. ServiceMonitor is a Prometheus Operator CRD that kubernetes-validate has no schema for: it is
validated against the pydantic models ``cloudcoil-models-prometheus-operator`` generates from the
operator's CRD (v0.80), with a round trip that fails on any field the model does not know.
The rendered environment is also fed to the real ``service.settings.Settings``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import sys
import tomllib
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "pose-service"
RELEASE = "pose-service"
NAMESPACE = "vision"


def _kube_versions() -> list[str]:
    """The oldest Kubernetes the chart declares (Chart.yaml ``kubeVersion: ">=1.27.0-0"``) and the
    newest kubernetes-validate ships schemas for."""
    declared = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    floor = re.fullmatch(r">=\s*(\d+\.\d+)\.0-0", declared)
    assert floor, declared
    return sorted({f"{floor[1]}.0", all_versions()[-1]})


KUBE_VERSIONS = _kube_versions()

# Settings the chart derives from other values instead of taking them under `settings`.
CHART_MANAGED_SETTINGS = {"host", "http_port", "grpc_port", "weights", "api_keys"}

SHA = "0" * 64
ALL_ON: dict[str, Any] = {
    "replicaCount": 2,
    "image": {"repository": "registry.example/pose-service", "tag": "1.2.3"},
    "imagePullSecrets": [{"name": "regcred"}],
    "settings": {
        "max_batch_size": 32,
        "max_delay_ms": 2.5,
        "max_body_bytes": 33554432,
        "flip_test": False,
        "precision": "fp16",
        "log_level": "debug",
        "drain_grace_s": 60,
    },
    "weights": {
        "source": "url",
        "url": {"href": "https://models.example/distilpose_s.pth", "sha256": SHA},
    },
    "auth": {"apiKeys": ["key-one", "key-two"]},
    "gpu": {"count": 2},
    "autoscaling": {
        "enabled": True,
        "minReplicas": 2,
        "maxReplicas": 8,
        "cpu": {"enabled": True},
        "queueWait": {"enabled": True},
    },
    "podDisruptionBudget": {"enabled": True},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus"}}},
    "podAnnotations": {"team": "vision"},
    "podLabels": {"tier": "inference"},
    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    "tolerations": [
        {"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}
    ],
    "affinity": {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {
                            "matchLabels": {"app.kubernetes.io/name": "pose-service"}
                        },
                    },
                }
            ]
        }
    },
    "runtimeClassName": "nvidia",
    "priorityClassName": "inference",
}
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "all-on": ALL_ON,
    "cpu-pvc-queue-wait": {
        "gpu": {"count": 0},
        "weights": {"source": "pvc", "pvc": {"claimName": "pose-weights"}},
        "auth": {"existingSecret": "pose-keys"},
        "autoscaling": {"enabled": True, "cpu": {"enabled": False}, "queueWait": {"enabled": True}},
        "podDisruptionBudget": {"enabled": True, "maxUnavailable": None, "minAvailable": "50%"},
    },
}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    """The chart, loaded once by Helm."""
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Render like ``helm template`` and parse every manifest (NOTES.txt left out)."""
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects: list[dict[str, Any]] = []
    for path, text in sorted(manifests.items()):
        if path.endswith(".yaml"):
            objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The single object of ``kind``."""
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The server container of the Deployment."""
    containers = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["pose-service"]
    return typing.cast(dict[str, Any], containers[0])


def pod_environment(objects: list[dict[str, Any]]) -> dict[str, str]:
    """The POSE_* environment the server container gets (ConfigMap envFrom + Secret env)."""
    config = one(objects, "ConfigMap")
    server = container(objects)
    assert server["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    env = dict(config["data"])
    secrets = {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == "Secret"}
    for var in server.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        ref = var["valueFrom"]["secretKeyRef"]
        if ref["name"] in secrets:  # an existing Secret is not rendered: nothing to read
            env[var["name"]] = base64.b64decode(secrets[ref["name"]]["data"][ref["key"]]).decode()
    return env


# --- Helm: lint, schema -------------------------------------------------------------------------


def test_chart_metadata_matches_the_package() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    with helm.Chart.load(CHART) as loaded:
        assert loaded.metadata["name"] == "pose-service"
        assert loaded.metadata["appVersion"] == pyproject["project"]["version"]
        assert loaded.schema is not None


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values_name", sorted(VALUE_SETS))
def test_lint_strict_is_clean(values_name: str, kube_version: str) -> None:
    report = helm.lint(
        CHART,
        VALUE_SETS[values_name],
        strict=True,
        namespace=NAMESPACE,
        kube_version=f"v{kube_version}",
    )
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    # Severity 1 is INFO ("icon is recommended"); strict mode fails on 2 (WARNING) and 3 (ERROR).
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize(
    "values",
    [
        {"replicaCont": 2},
        {"settings": {"max_batch_sise": 8}},
        {"settings": {"api_keys": ["k"]}},  # chart-managed: goes under auth.apiKeys
        {"settings": {"log_level": "verbose"}},
        {"autoscaling": {"cpu": {"targetUtilisationPercent": 50}}},
        {"metrics": {"serviceMonitor": {"enable": True}}},
        {"weights": {"source": "s3"}},
        {"weights": {"pvc": {"claim": "x"}}},
        {"resources": {"limits": {"nvidia.com/gpu": 1}}},  # GPUs come from gpu.count
        {"probes": {"readiness": {"periodSecond": 5}}},
        {"podDisruptionBudget": {"enabled": "yes"}},
        {"auth": {"apiKeys": ["two words"]}},
    ],
    ids=lambda values: str(values),
)
def test_schema_rejects_typos_and_bad_values(chart: helm.Chart, values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmValuesError):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert helm.lint(CHART, values, strict=True)["errors"]


def _open_objects(node: Any, path: str = "") -> Iterator[str]:
    """Paths of object schemas that accept keys they do not list."""
    if isinstance(node, dict):
        if node.get("type") == "object" and node.get("additionalProperties", True) is True:
            yield path
        for key, child in node.items():
            yield from _open_objects(child, f"{path}/{key}")
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from _open_objects(child, f"{path}/{index}")


def test_schema_is_closed_at_every_level(chart: helm.Chart) -> None:
    """Every object lists its keys (maps say what their values are); only Kubernetes' own affinity
    types, which Helm passes through and the API server checks, are left open."""
    open_paths = set(_open_objects(chart.schema))
    affinity = "/properties/affinity/properties"
    assert open_paths == {
        f"{affinity}/{kind}" for kind in ("nodeAffinity", "podAffinity", "podAntiAffinity")
    }
    chart.validate_schema(chart.values)


def test_settings_cover_every_settings_field(chart: helm.Chart) -> None:
    """values.settings lists every Settings field the chart does not set itself, with its enums."""
    schema = typing.cast(dict[str, Any], chart.schema)
    properties = schema["properties"]["settings"]["properties"]
    assert set(properties) | CHART_MANAGED_SETTINGS == set(Settings.model_fields)
    assert not set(properties) & CHART_MANAGED_SETTINGS
    assert set(chart.values["settings"]) == set(properties)
    for name, field in Settings.model_fields.items():
        if typing.get_origin(field.annotation) is typing.Literal:
            assert properties[name]["enum"] == [*typing.get_args(field.annotation), None], name


# --- Kubernetes schemas --------------------------------------------------------------------------


def _validate_service_monitor(obj: dict[str, Any]) -> None:
    """Prometheus Operator CRD: pydantic models generated from its OpenAPI schema, and a round trip
    that must give back every field (pydantic drops unknown ones)."""
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

    model = ServiceMonitor.model_validate(obj)
    assert model.model_dump(by_alias=True, exclude_unset=True, mode="json") == obj


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values_name", sorted(VALUE_SETS))
def test_rendered_objects_validate(chart: helm.Chart, values_name: str, kube_version: str) -> None:
    objects = render(chart, VALUE_SETS[values_name])
    for obj in objects:
        if obj["apiVersion"] == "monitoring.coreos.com/v1":
            _validate_service_monitor(obj)
        else:
            kubernetes_validate.validate(obj, kube_version, strict=True)


def test_servicemonitor_check_catches_unknown_fields(chart: helm.Chart) -> None:
    monitor = one(render(chart, ALL_ON), "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["scrapeIntervall"] = "5s"
    with pytest.raises(AssertionError):
        _validate_service_monitor(monitor)


def test_default_and_optional_objects(chart: helm.Chart) -> None:
    kinds = sorted(obj["kind"] for obj in render(chart))
    assert kinds == ["ConfigMap", "Deployment", "Service"]
    kinds = sorted(obj["kind"] for obj in render(chart, ALL_ON))
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "ServiceMonitor",
    ]
    for obj in render(chart, ALL_ON):
        expected = f"{RELEASE}-api-keys" if obj["kind"] == "Secret" else RELEASE
        assert obj["metadata"]["name"] == expected
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


# --- What the objects say -----------------------------------------------------------------------


def test_probes(chart: helm.Chart) -> None:
    server = container(render(chart))
    assert server["startupProbe"]["grpc"] == {"port": 50051}
    assert (
        server["startupProbe"]["failureThreshold"] * server["startupProbe"]["periodSeconds"] >= 300
    )
    assert server["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert server["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}


def test_ports_and_selectors(chart: helm.Chart) -> None:
    objects = render(chart, ALL_ON)
    deployment, service = one(objects, "Deployment"), one(objects, "Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert container(objects)["ports"] == [
        {"name": "http", "containerPort": 8000, "protocol": "TCP"},
        {"name": "grpc", "containerPort": 50051, "protocol": "TCP"},
    ]
    ports = {
        p["name"]: (p["port"], p["targetPort"], p["appProtocol"]) for p in service["spec"]["ports"]
    }
    assert ports == {
        "http": (8000, "http", "http"),
        "grpc": (50051, "grpc", "grpc"),
        "metrics": (9090, "http", "http"),
    }
    for selector in (
        service["spec"]["selector"],
        deployment["spec"]["selector"]["matchLabels"],
        one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= pod_labels.items()
    monitor = one(objects, "ServiceMonitor")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


def test_environment_is_accepted_by_settings(
    chart: helm.Chart, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rendered POSE_* variables build the real Settings (which refuses unknown names)."""
    for name in list(os.environ):
        if name.upper().startswith("POSE_"):
            monkeypatch.delenv(name)
    env = pod_environment(render(chart, ALL_ON))
    assert all(name.startswith("POSE_") or name == "HOME" for name in env)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()  # type: ignore[call-arg]  # every field comes from the environment
    assert (settings.host, settings.http_port, settings.grpc_port) == ("0.0.0.0", 8000, 50051)
    assert settings.devices() == ["cuda:0", "cuda:1"]
    assert settings.weights == "/models/distilpose_s.pth"
    assert settings.api_keys == ["key-one", "key-two"]
    assert (settings.max_batch_size, settings.max_delay_ms, settings.max_body_bytes) == (
        32,
        2.5,
        33554432,
    )
    assert (settings.flip_test, settings.precision, settings.log_level) == (False, "fp16", "debug")
    assert settings.drain_grace_s == 60


def test_default_environment(chart: helm.Chart) -> None:
    env = pod_environment(render(chart))
    assert env == {
        "POSE_HOST": "0.0.0.0",
        "POSE_HTTP_PORT": "8000",
        "POSE_GRPC_PORT": "50051",
        "POSE_DEVICE": "cuda",
        "POSE_DETECTOR": "auto",
        "POSE_DRAIN_GRACE_S": "30",
        "POSE_LOG_LEVEL": "info",
        "HOME": "/tmp",
    }


def test_security_context(chart: helm.Chart) -> None:
    for values in VALUE_SETS.values():
        objects = render(chart, values)
        pod = one(objects, "Deployment")["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        assert pod["enableServiceLinks"] is False  # POSE_<SERVICE>_* names would be refused
        for box in pod["containers"] + pod.get("initContainers", []):
            assert box["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
            }
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes["tmp"]
        assert {"name": "tmp", "mountPath": "/tmp"} in pod["containers"][0]["volumeMounts"]


def test_gpu_limits_and_device(chart: helm.Chart) -> None:
    cases = {0: ("cpu", None), 1: ("cuda", 1), 2: ("cuda:0,cuda:1", 2)}
    for count, (device, limit) in cases.items():
        objects = render(chart, {"gpu": {"count": count}})
        server = container(objects)
        assert server["resources"]["limits"].get("nvidia.com/gpu") == limit
        assert one(objects, "ConfigMap")["data"]["POSE_DEVICE"] == device
        tolerations = one(objects, "Deployment")["spec"]["template"]["spec"].get("tolerations", [])
        assert (count > 0) == any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    explicit = render(chart, {"gpu": {"count": 1}, "settings": {"device": "cuda:3"}})
    assert one(explicit, "ConfigMap")["data"]["POSE_DEVICE"] == "cuda:3"


def test_termination_grace_covers_the_drain(chart: helm.Chart) -> None:
    pod = one(render(chart), "Deployment")["spec"]["template"]["spec"]
    assert pod["containers"][0]["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "5"]}}
    assert pod["terminationGracePeriodSeconds"] == 5 + 30 + 15
    pod = one(render(chart, {"settings": {"drain_grace_s": 120.5}}), "Deployment")
    assert pod["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 5 + 121 + 15
    pod = one(render(chart, {"terminationGracePeriodSeconds": 90}), "Deployment")
    assert pod["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 90
    with pytest.raises(helm.HelmRenderError, match="must exceed"):
        render(chart, {"terminationGracePeriodSeconds": 35})


def test_weights_from_a_pvc(chart: helm.Chart) -> None:
    objects = render(chart, VALUE_SETS["cpu-pvc-queue-wait"])
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    assert {
        "name": "weights",
        "persistentVolumeClaim": {"claimName": "pose-weights", "readOnly": True},
    } in pod["volumes"]
    assert {"name": "weights", "mountPath": "/models", "readOnly": True} in pod["containers"][0][
        "volumeMounts"
    ]
    assert one(objects, "ConfigMap")["data"]["POSE_WEIGHTS"] == "/models/distilpose_s.pth"
    with pytest.raises(helm.HelmRenderError, match="claimName"):
        render(chart, {"weights": {"source": "pvc"}})


def test_weights_from_a_url(chart: helm.Chart) -> None:
    pod = one(render(chart, ALL_ON), "Deployment")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["image"] == container(render(chart, ALL_ON))["image"]
    assert {"name": "weights", "mountPath": "/models"} in init["volumeMounts"]
    assert {"name": "weights", "emptyDir": {"sizeLimit": "2Gi"}} in pod["volumes"]
    with pytest.raises(helm.HelmRenderError, match="sha256"):
        render(chart, {"weights": {"source": "url", "url": {"href": "https://x.example/w.pth"}}})


def test_weights_init_container_downloads_and_checks(chart: helm.Chart, tmp_path: Path) -> None:
    """Run the init container's script as rendered, offline on a file:// URL in place of the
    https one: it installs the file only when the sha256 matches."""
    payload = b"weights" * 1000
    source = tmp_path / "source.pth"
    source.write_bytes(payload)
    good = hashlib.sha256(payload).hexdigest()
    href = "https://models.example/distilpose_s.pth"
    values = {"weights": {"source": "url", "url": {"href": href, "sha256": good}}}
    (init,) = one(render(chart, values), "Deployment")["spec"]["template"]["spec"]["initContainers"]
    assert init["command"] == ["python", "-c"]
    env = {var["name"]: var["value"] for var in init["env"]}
    assert env == {
        "WEIGHTS_URL": href,
        "WEIGHTS_SHA256": good,
        "WEIGHTS_PATH": "/models/distilpose_s.pth",
    }
    target = tmp_path / "models" / "distilpose_s.pth"
    target.parent.mkdir()
    env["WEIGHTS_URL"] = source.as_uri()
    env["WEIGHTS_PATH"] = str(target)  # the container's /models, here
    run = [sys.executable, "-c", init["args"][0]]
    subprocess.run(run, env={**env, "PATH": os.environ["PATH"]}, check=True, timeout=60)
    assert target.read_bytes() == payload
    target.unlink()
    env["WEIGHTS_SHA256"] = "f" * 64
    failed = subprocess.run(
        run, env={**env, "PATH": os.environ["PATH"]}, capture_output=True, text=True, timeout=60
    )
    assert failed.returncode != 0 and "sha256" in failed.stderr
    assert not target.exists()


def test_api_keys_from_an_existing_secret(chart: helm.Chart) -> None:
    objects = render(chart, VALUE_SETS["cpu-pvc-queue-wait"])
    assert not [obj for obj in objects if obj["kind"] == "Secret"]
    assert {
        "name": "POSE_API_KEYS",
        "valueFrom": {"secretKeyRef": {"name": "pose-keys", "key": "POSE_API_KEYS"}},
    } in container(objects)["env"]
    assert not [v for v in container(render(chart))["env"] if v["name"] == "POSE_API_KEYS"]


def test_autoscaling(chart: helm.Chart) -> None:
    objects = render(chart, ALL_ON)
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert "replicas" not in one(objects, "Deployment")["spec"]  # the HPA owns the count
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": RELEASE,
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    cpu, queue = hpa["spec"]["metrics"]
    assert cpu["resource"] == {
        "name": "cpu",
        "target": {"type": "Utilization", "averageUtilization": 70},
    }
    assert queue["pods"] == {
        "metric": {"name": "pose_queue_wait_seconds"},
        "target": {"type": "AverageValue", "averageValue": "100m"},
    }
    only_queue = one(render(chart, VALUE_SETS["cpu-pvc-queue-wait"]), "HorizontalPodAutoscaler")
    assert [m["type"] for m in only_queue["spec"]["metrics"]] == ["Pods"]
    with pytest.raises(helm.HelmRenderError, match="enable autoscaling"):
        render(chart, {"autoscaling": {"enabled": True, "cpu": {"enabled": False}}})
    with pytest.raises(helm.HelmRenderError, match=r"requests\.cpu"):
        render(chart, {"autoscaling": {"enabled": True}, "resources": {"requests": {"cpu": None}}})


def test_pod_disruption_budget(chart: helm.Chart) -> None:
    pdb = one(render(chart, ALL_ON), "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    pdb = one(render(chart, VALUE_SETS["cpu-pvc-queue-wait"]), "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == "50%" and "maxUnavailable" not in pdb["spec"]
    with pytest.raises(helm.HelmRenderError, match="exactly one"):
        render(chart, {"podDisruptionBudget": {"enabled": True, "minAvailable": 1}})


def test_config_change_rolls_the_pods(chart: helm.Chart) -> None:
    def checksum(values: dict[str, Any]) -> str:
        pod = one(render(chart, values), "Deployment")["spec"]["template"]
        return typing.cast(str, pod["metadata"]["annotations"]["checksum/config"])

    assert checksum({}) != checksum({"settings": {"max_batch_size": 4}})
