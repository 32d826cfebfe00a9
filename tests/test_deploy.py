"""The Kubernetes manifests in deploy/: valid for the API server (kubernetes-validate's
strict schemas, offline) and consistent with the gateway and image they deploy."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from phi_gateway.config import GatewayConfig, load_config

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="in the dev extra")

ROOT = Path(__file__).parents[1]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))
# The oldest Kubernetes deploy/README.md supports (the preStop sleep action is on by default
# from 1.30); kubernetes-validate ships strict schemas for it.
KUBERNETES = "1.30"
SETTINGS = {f.name for f in dataclasses.fields(GatewayConfig)}


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def _all() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in _documents(path)]


def _one(kind: str, name: str) -> dict[str, Any]:
    (doc,) = (d for d in _all() if d["kind"] == kind and d["metadata"]["name"] == name)
    return doc


def _pod() -> dict[str, Any]:
    spec: dict[str, Any] = _one("Deployment", "phi-gateway")["spec"]["template"]["spec"]
    return spec


def _container() -> dict[str, Any]:
    (container,) = _pod()["containers"]
    return dict(container)


def _port(name_or_number: str | int) -> int:
    ports = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    return ports[name_or_number] if isinstance(name_or_number, str) else name_or_number


def _selects_pods(selector: dict[str, str]) -> bool:
    labels = _one("Deployment", "phi-gateway")["spec"]["template"]["metadata"]["labels"]
    return bool(selector) and selector.items() <= labels.items()


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_kubernetes(path: Path) -> None:
    documents = _documents(path)
    assert documents
    for doc in documents:
        # SchemaNotFoundError (an unknown kind or apiVersion) fails the test too.
        assert kubernetes_validate.validate(doc, KUBERNETES, strict=True) == KUBERNETES


def test_validation_catches_a_misspelled_field() -> None:
    deployment = copy.deepcopy(_one("Deployment", "phi-gateway"))
    security = deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    security["readOnlyRootFileSystem"] = security.pop("readOnlyRootFilesystem")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


def test_every_part_is_there() -> None:
    assert {(d["kind"], d["metadata"]["name"]) for d in _all()} >= {
        ("Namespace", "phi-gateway"),
        ("ConfigMap", "phi-gateway-config"),
        ("ConfigMap", "phi-gateway-policies"),
        ("Deployment", "phi-gateway"),
        ("Service", "phi-gateway"),
        ("Service", "phi-gateway-metrics"),
        ("ServiceAccount", "phi-gateway"),
        ("PodDisruptionBudget", "phi-gateway"),
        ("NetworkPolicy", "phi-gateway"),
    }


def test_policies_configmap_is_the_policy_file() -> None:
    data = _one("ConfigMap", "phi-gateway-policies")["data"]
    assert "patients.yaml" in data
    for name, text in data.items():
        assert text == (ROOT / "policies" / name).read_text(encoding="utf-8"), (
            f"deploy/configmap-policies.yaml: {name} differs from policies/{name}; copy the file in"
        )


def test_every_setting_named_in_deploy_exists() -> None:
    named = set()
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            named |= set(re.findall(r"\bPHI_GATEWAY_([A-Z0-9_]+)\b", path.read_text(encoding="utf-8")))
    assert named
    assert {n.lower() for n in named} <= SETTINGS
    # Every key of the settings ConfigMap is a setting: envFrom would pass on anything.
    assert all(key.startswith("PHI_GATEWAY_") for key in _one("ConfigMap", "phi-gateway-config")["data"])


def test_settings_configmap_makes_a_complete_config_that_fits_the_pod() -> None:
    container = _container()
    assert container["envFrom"] == [{"configMapRef": {"name": "phi-gateway-config"}}]
    config = load_config(env=_one("ConfigMap", "phi-gateway-config")["data"]).check()
    assert config.workers == 1
    everywhere = "0.0.0.0"  # noqa: S104 - in a pod, the pod's own network namespace
    assert (config.host, config.port) == (everywhere, _port("http"))
    assert (config.admin_host, config.admin_port) == (everywhere, _port("admin"))
    assert config.kms_key_ids
    assert config.keyring is None
    assert config.pepper_secret_id
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert config.policies == [mounts["policies"]]
    assert config.jwt_jwks_file is not None
    assert Path(config.jwt_jwks_file).parent == Path(mounts["jwt"])


def test_probes_use_the_admin_port() -> None:
    container = _container()
    kinds = ("startupProbe", "livenessProbe", "readinessProbe")
    probes = {kind: container[kind]["httpGet"] for kind in kinds}
    assert probes["startupProbe"]["path"] == probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert {_port(p["port"]) for p in probes.values()} == {9090}


def test_container_runs_unprivileged() -> None:
    pod, container = _pod(), _container()
    dockerfile_user = re.search(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert dockerfile_user is not None
    for context in (pod["securityContext"], container["securityContext"]):
        assert context["runAsNonRoot"] is True
        assert context["runAsUser"] == int(dockerfile_user[1]) == 10001
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    assert {"cpu", "memory"} <= container["resources"]["limits"].keys()


def test_aws_access_comes_from_the_service_account_role() -> None:
    assert not [d for d in _all() if d["kind"] == "Secret"]
    text = "".join(p.read_text(encoding="utf-8") for p in MANIFESTS)
    assert not re.search(r"AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN)", text)
    account = _one("ServiceAccount", "phi-gateway")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    assert _pod()["serviceAccountName"] == "phi-gateway"
    assert _pod()["automountServiceAccountToken"] is False


def test_shutdown_removes_the_endpoint_before_the_drain() -> None:
    pod = _pod()
    sleep = _container()["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert 0 < sleep < pod["terminationGracePeriodSeconds"] - 30  # 30 s: upstream_read_timeout


def test_services_budget_and_network_policy_select_the_gateway() -> None:
    service = _one("Service", "phi-gateway")
    assert _selects_pods(service["spec"]["selector"])
    assert [_port(p["targetPort"]) for p in service["spec"]["ports"]] == [8080]  # never the admin port
    metrics = _one("Service", "phi-gateway-metrics")
    assert _selects_pods(metrics["spec"]["selector"])
    assert [_port(p["targetPort"]) for p in metrics["spec"]["ports"]] == [9090]
    assert _selects_pods(_one("PodDisruptionBudget", "phi-gateway")["spec"]["selector"]["matchLabels"])
    policy = _one("NetworkPolicy", "phi-gateway")["spec"]
    assert _selects_pods(policy["podSelector"]["matchLabels"])
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert {p["port"] for rule in policy["ingress"] for p in rule["ports"]} == {8080, 9090}
    assert {p["port"] for rule in policy["egress"] for p in rule["ports"]} >= {53, 443}
