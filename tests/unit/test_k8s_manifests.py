"""The Kubernetes manifests under deploy/k8s: one Deployment, Service and migration Job per
service, configured only through settings that exist, probed over gRPC health (on the
plaintext health-only port: the service port requires mTLS), wired to each other's Services,
serving mTLS with the service's own certificate mounted from a cert-manager Secret, verifying
tokens with a mounted JWKS and holding no token secret, and all listed in the kustomizations."""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

import pytest
import yaml

from shared.cli import SERVICES
from shared.server import SHUTDOWN_MARGIN
from shared.settings import Settings

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
BASE = K8S / "base"
PRODUCTION = K8S / "overlays" / "production"

# Every variable Settings.from_env reads.
SETTINGS_ENV = frozenset(Settings.env_names().values())

# The other services whose gRPC address each service needs in its pod (quota follows billing's
# standings; billing calls quota and reads its events, and asks notification who hears an
# account's alerts; notification reads both streams).
DIALS = {
    "quota": {"billing"},
    "billing": {"quota", "notification"},
    "notification": {"quota", "billing"},
}


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _manifests() -> list[tuple[Path, dict]]:
    files = sorted([*K8S.rglob("*.yaml"), *K8S.rglob("*.yml")])
    return [(path, doc) for path in files for doc in _documents(path)]


MANIFESTS = _manifests()


def _of_kind(kind: str) -> dict[str, dict]:
    found: dict[str, dict] = {}
    for path, doc in MANIFESTS:
        if doc.get("kind") == kind:
            name = doc["metadata"]["name"]
            assert name not in found, f"two {kind}s named {name} (second in {path})"
            found[name] = doc
    return found


DEPLOYMENTS = _of_kind("Deployment")
SERVICES_K8S = _of_kind("Service")
JOBS = _of_kind("Job")
CERTIFICATES = _of_kind("Certificate")


def _containers(workload: dict) -> list[dict]:
    return workload["spec"]["template"]["spec"]["containers"]


def _container(name: str) -> dict:
    (container,) = _containers(DEPLOYMENTS[name])
    return container


def _env(container: dict) -> dict[str, str]:
    return {item["name"]: item.get("value") for item in container.get("env", [])}


def _secrets(container: dict) -> list[str]:
    return [ref["secretRef"]["name"] for ref in container.get("envFrom", []) if "secretRef" in ref]


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _grpc_service_name(service: str) -> str:
    """The full proto name of a service (allot.quota.v1.QuotaService), from its stubs."""
    module = import_module(f"allot.{service}.v1.{service}_service_pb2")
    (name,) = module.DESCRIPTOR.services_by_name
    return module.DESCRIPTOR.services_by_name[name].full_name


def test_the_settings_variables_were_found():
    assert {"ALLOT_QUOTA_ADDR", "ALLOT_BILLING_DATABASE_URL", "ALLOT_SMTP_URL"} <= SETTINGS_ENV
    assert all(name.startswith("ALLOT_") for name in SETTINGS_ENV)


def test_every_service_has_a_deployment_a_service_a_certificate_and_a_migration_job():
    assert set(DEPLOYMENTS) == set(SERVICES)
    assert set(SERVICES_K8S) == set(SERVICES)
    assert set(CERTIFICATES) == set(SERVICES)
    assert set(JOBS) == {f"{name}-migrate" for name in SERVICES}


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_the_deployment_runs_its_service_module(name):
    container = _container(name)
    assert container["command"] == ["python", "-m", SERVICES[name]]
    labels = DEPLOYMENTS[name]["spec"]["template"]["metadata"]["labels"]
    assert DEPLOYMENTS[name]["spec"]["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("name", sorted({*DEPLOYMENTS, *JOBS}))
def test_environment_names_are_settings_the_service_reads(name):
    workload = DEPLOYMENTS.get(name) or JOBS[name]
    for container in _containers(workload):
        unknown = set(_env(container)) - SETTINGS_ENV
        assert not unknown, f"{name}/{container['name']} sets unknown variables {unknown}"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_the_migration_job_migrates_the_service_with_its_secret(name):
    (job,) = _containers(JOBS[f"{name}-migrate"])
    assert job["command"] == ["allot", "migrate", name]
    assert _secrets(job) == _secrets(_container(name))
    assert _secrets(job), f"{name}-migrate has no secret with the database URL"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_the_service_listens_on_all_interfaces_at_its_container_port(name):
    container = _container(name)
    listen = _env(container).get(f"ALLOT_{name.upper()}_ADDR")
    assert listen is not None, f"{name} would listen on the loopback default"
    assert listen.rsplit(":", 1)[0] == "0.0.0.0"
    assert _port(listen) in {p["containerPort"] for p in container["ports"]}


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_readiness_is_grpc_health_and_liveness_a_tcp_check_of_the_health_port(name):
    """Health turns NOT_SERVING while the database is away (docs/faults.md): that must take
    the pod out of the Service, not get it restarted, so liveness only asks whether the
    process still listens."""
    container = _container(name)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    health = _env(container).get("ALLOT_HEALTH_ADDR")
    assert health is not None, f"{name}: kubelet cannot probe the mTLS port without it"
    assert health.rsplit(":", 1)[0] == "0.0.0.0"
    assert ports.get("health") == _port(health)
    for probe in ("readinessProbe", "livenessProbe"):
        assert probe in container, f"{name} has no {probe}"
    readiness, liveness = container["readinessProbe"], container["livenessProbe"]
    assert "grpc" in readiness, f"{name}'s readinessProbe is not a gRPC health check"
    assert readiness["grpc"]["port"] == _port(health)
    assert readiness["grpc"]["service"] == _grpc_service_name(name)
    assert "grpc" not in liveness, f"{name}'s livenessProbe would restart it without a database"
    assert liveness.get("tcpSocket", {}).get("port") == _port(health)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_shutdown_fits_in_the_termination_grace_period(name):
    """SIGTERM ends the process within ALLOT_SHUTDOWN_GRACE_SECONDS plus a few seconds
    (shared/server.py); kubelet must not SIGKILL it before."""
    pod = DEPLOYMENTS[name]["spec"]["template"]["spec"]
    grace = int(_env(_container(name)).get("ALLOT_SHUTDOWN_GRACE_SECONDS", "10"))
    assert pod.get("terminationGracePeriodSeconds", 30) >= grace + SHUTDOWN_MARGIN + 2


def _mounted(workload: dict, container: dict, path: str) -> tuple[dict, str]:
    """The pod volume mounted whole (no subPath) over the folder of `path`, and the file name."""
    folder, _, filename = path.rpartition("/")
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == folder]
    assert len(mounts) == 1, f"nothing (or several) mounted at {folder}"
    assert "subPath" not in mounts[0], "subPath mounts never see a rotated file"
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
    return volumes[mounts[0]["name"]], filename


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_the_service_serves_mtls_with_its_own_certificate_from_a_secret(name):
    container, env = _container(name), _env(_container(name))
    assert env.get("ALLOT_TLS_CLIENT_AUTH") == "require"
    files = {}
    for variable, key in (
        ("ALLOT_TLS_CERT_FILE", "tls.crt"),
        ("ALLOT_TLS_KEY_FILE", "tls.key"),
        ("ALLOT_TLS_CA_FILE", "ca.crt"),
    ):
        assert env.get(variable), f"{name} does not set {variable}"
        volume, filename = _mounted(DEPLOYMENTS[name], container, env[variable])
        assert filename == key, f"{variable} is not the Secret's {key}"
        files[variable] = volume
    secret_names = {v["secret"]["secretName"] for v in files.values()}
    assert len(secret_names) == 1, f"{name}'s certificate, key and CA come from one Secret"
    (secret_name,) = secret_names
    certificate = CERTIFICATES[name]["spec"]
    assert certificate["secretName"] == secret_name
    assert certificate["uris"] == [f"spiffe://allot/{name}"]
    assert name in certificate["dnsNames"]
    assert {"server auth", "client auth"} <= set(certificate["usages"])


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_tokens_are_verified_with_a_mounted_jwks_and_no_secret(name):
    container, env = _container(name), _env(_container(name))
    assert env.get("ALLOT_AUTH_JWKS_FILE"), f"{name} has no JWKS"
    volume, _ = _mounted(DEPLOYMENTS[name], container, env["ALLOT_AUTH_JWKS_FILE"])
    assert "configMap" in volume or "secret" in volume
    assert not {"ALLOT_AUTH_SECRET", "ALLOT_AUTH_SECRET_FILE"} & set(env)


@pytest.mark.parametrize("name", sorted(SERVICES_K8S))
def test_services_do_not_expose_the_health_port(name):
    assert [p["targetPort"] for p in SERVICES_K8S[name]["spec"]["ports"]] == ["grpc"]


@pytest.mark.parametrize("name", sorted(SERVICES_K8S))
def test_service_target_ports_are_ports_of_the_selected_containers(name):
    spec = SERVICES_K8S[name]["spec"]
    selected = [
        d
        for d in DEPLOYMENTS.values()
        if spec["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert selected, f"Service {name} selects no Deployment"
    for deployment in selected:
        container_ports = [p for c in _containers(deployment) for p in c.get("ports", [])]
        for port in spec["ports"]:
            target = port.get("targetPort", port["port"])
            key = "name" if isinstance(target, str) else "containerPort"
            assert target in {p.get(key) for p in container_ports}, (
                f"Service {name} targets {target!r}, which "
                f"{deployment['metadata']['name']} does not expose"
            )


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_addresses_of_other_services_point_at_their_services(name):
    env = _env(_container(name))
    for other in DIALS[name]:
        variable = f"ALLOT_{other.upper()}_ADDR"
        assert variable in env, f"{name} would dial {other} at the loopback default"
        host, port = env[variable].rsplit(":", 1)
        assert host in SERVICES_K8S, f"{name}: {variable} names no Service"
        assert int(port) in {p["port"] for p in SERVICES_K8S[host]["spec"]["ports"]}


def test_base_kustomization_lists_every_manifest_file_in_base():
    (kustomization,) = _documents(BASE / "kustomization.yaml")
    listed = kustomization["resources"]
    files = {p.name for p in [*BASE.glob("*.yaml"), *BASE.glob("*.yml")]} - {"kustomization.yaml"}
    assert sorted(listed) == sorted(files)
    assert len(listed) == len(set(listed))


def test_production_overlay_builds_on_base_and_sizes_every_deployment():
    (kustomization,) = _documents(PRODUCTION / "kustomization.yaml")
    assert (PRODUCTION / kustomization["resources"][0]).resolve() == BASE.resolve()
    targets = {
        p["target"]["name"] for p in kustomization["patches"] if p["target"]["kind"] == "Deployment"
    }
    assert targets == set(SERVICES)
