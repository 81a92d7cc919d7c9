"""The Kubernetes manifests under deploy/k8s (deploy/README.md), checked on what `kubectl
kustomize` renders for every overlay: valid for the Kubernetes API (`kubernetes-validate
--strict`, its schemas bundled, no network), configured only through settings that exist, and
holding the policies a platform team asks for: a namespace, standard labels, requests and
limits, restricted pods, no service-account token, PDBs, HPAs, NetworkPolicies that admit only
the right peers, the catalog as a hashed ConfigMap, startup, readiness and liveness (health
name `liveness`) gRPC probes on the plaintext health port, migrations in an init container, headless
Services dialled as `dns:///`, mTLS, a JWKS, a pinned image, and in overlays/two-regions one
quota deployment per region group reached through ALLOT_QUOTA_ENDPOINTS."""

from __future__ import annotations

import shutil
import subprocess
from importlib import import_module
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from shared.catalog import load_catalog, parse_catalog
from shared.cli import SERVICES
from shared.server import LIVENESS, SHUTDOWN_MARGIN
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
KUBERNETES_VERSIONS = ("1.36.0", "1.37.0")  # the schemas kubernetes-validate bundles
CATALOG = load_catalog(ROOT / "deploy" / "catalog.yaml")

# Every variable Settings.from_env reads.
SETTINGS_ENV = frozenset(Settings.env_names().values())

# The services whose gRPC address each service needs (quota follows billing's standings;
# billing calls quota and asks notification's CheckAudience; notification reads both streams).
DIALS = {
    "quota": {"billing"},
    "billing": {"quota", "notification"},
    "notification": {"quota", "billing"},
}
# Who may open a connection to whom (the NetworkPolicies); gateways reach every service.
CALLERS = {name: {caller for caller, dials in DIALS.items() if name in dials} for name in DIALS}
PORTS = {"quota": 50051, "billing": 50052, "notification": 50053}
RESTRICTED = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
STANDARD_LABELS = {"app.kubernetes.io/name", "app.kubernetes.io/instance"}
FIXED_LABELS = {"app.kubernetes.io/part-of": "allot", "app.kubernetes.io/managed-by": "kustomize"}


def _render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render the manifests"
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


RENDERED = {overlay: _render(overlay) for overlay in OVERLAYS}


class Suite:
    """The rendered objects of one overlay, by kind and name."""

    def __init__(self, docs: list[dict]) -> None:
        self.docs = docs
        self.by_kind: dict[str, dict[str, dict]] = {}
        for doc in docs:
            named = self.by_kind.setdefault(doc["kind"], {})
            name = doc["metadata"]["name"]
            assert name not in named, f"two {doc['kind']}s named {name}"
            named[name] = doc

    def kind(self, kind: str) -> dict[str, dict]:
        return self.by_kind.get(kind, {})

    def deployments_of(self, service: str) -> list[dict]:
        return [d for d in self.kind("Deployment").values() if _service(d) == service]


SUITES = {overlay: Suite(docs) for overlay, docs in RENDERED.items()}
DEPLOYMENTS = [
    (overlay, name) for overlay, suite in SUITES.items() for name in suite.kind("Deployment")
]


def _service(workload: dict) -> str:
    return workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]


def _pod(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def _container(workload: dict) -> dict:
    (container,) = _pod(workload)["containers"]
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


def _deployment(overlay: str, name: str) -> dict:
    return SUITES[overlay].kind("Deployment")[name]


def _selects(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


def test_there_are_the_overlays_the_docs_describe():
    assert {"production", "two-regions", "example"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_is_valid_for_the_kubernetes_api(overlay, version):
    """What `kubernetes-validate --strict` checks: unknown fields are errors. Only
    cert-manager's Certificate has no bundled schema."""
    for doc in RENDERED[overlay]:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert doc["apiVersion"] == "cert-manager.io/v1", doc["kind"]
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']}: {exc.message}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_namespace_holds_everything_with_the_standard_labels(overlay):
    suite = SUITES[overlay]
    (namespace,) = suite.kind("Namespace")
    assert namespace != "default"
    labels = suite.kind("Namespace")[namespace]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    for doc in suite.docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, doc["metadata"]["name"]
        assert FIXED_LABELS.items() <= doc["metadata"].get("labels", {}).items()
    for deployment in suite.kind("Deployment").values():
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert STANDARD_LABELS <= set(pod_labels)
        assert FIXED_LABELS.items() <= pod_labels.items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_runs_in_its_deployments(overlay):
    suite = SUITES[overlay]
    for service, module in SERVICES.items():
        deployments = suite.deployments_of(service)
        assert deployments, f"{overlay} runs no {service}"
        for deployment in deployments:
            assert _container(deployment)["command"] == ["python", "-m", module]
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            assert _selects(deployment["spec"]["selector"]["matchLabels"], labels)
    assert len(suite.deployments_of("billing")) == len(suite.deployments_of("notification")) == 1


@pytest.mark.parametrize(("overlay", "name"), DEPLOYMENTS)
def test_the_image_is_pinned_by_the_overlay(overlay, name):
    pod = _pod(_deployment(overlay, name))
    images = {c["image"] for c in [*pod.get("initContainers", []), *pod["containers"]]}
    assert len(images) == 1, "the migrations and the service run one image"
    (image,) = images
    assert "/" in image, f"{image}: the overlay's `images:` names no registry"
    repository, _, tag = image.partition("@")[0].rpartition(":")
    assert "@sha256:" in image or (repository and tag and tag != "latest"), image


@pytest.mark.parametrize(("overlay", "name"), DEPLOYMENTS)
def test_pods_are_restricted_with_requests_limits_and_no_token(overlay, name):
    pod = _pod(_deployment(overlay, name))
    assert pod["automountServiceAccountToken"] is False
    account = SUITES[overlay].kind("ServiceAccount")[pod["serviceAccountName"]]
    assert account["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] >= 10000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    writable = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    for container in [*pod["initContainers"], *pod["containers"]]:
        assert RESTRICTED.items() <= container["securityContext"].items(), container["name"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), container["name"]
        # With a read-only root, the data dir is a writable emptyDir.
        data_dir = _env(container)["ALLOT_DATA_DIR"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts.get(data_dir) in writable and mounts.get("/tmp") in writable


@pytest.mark.parametrize(("overlay", "name"), DEPLOYMENTS)
def test_environment_names_are_settings_the_service_reads(overlay, name):
    pod = _pod(_deployment(overlay, name))
    for container in [*pod["initContainers"], *pod["containers"]]:
        unknown = set(_env(container)) - SETTINGS_ENV
        assert not unknown, f"{name}/{container['name']} sets unknown variables {unknown}"


@pytest.mark.parametrize(("overlay", "name"), DEPLOYMENTS)
def test_an_init_container_migrates_with_the_services_secret(overlay, name):
    """Migrations run before the service starts, with the pod's own image, on every rollout
    (idempotent; PostgreSQL serializes concurrent ones): no Job to race or re-create."""
    deployment = _deployment(overlay, name)
    service = _service(deployment)
    (migrate,) = _pod(deployment)["initContainers"]
    assert migrate["command"] == ["allot", "migrate", service]
    assert _secrets(migrate) == _secrets(_container(deployment))
    assert _secrets(migrate), f"{name}'s migration has no secret with the database URL"
    assert not SUITES[overlay].kind("Job")


@pytest.mark.parametrize(("overlay", "name"), DEPLOYMENTS)
def test_the_service_listens_on_all_interfaces_at_its_container_ports(overlay, name):
    deployment = _deployment(overlay, name)
    service, container = _service(deployment), _container(deployment)
    env = _env(container)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for variable, port_name in (
        (f"ALLOT_{service.upper()}_ADDR", "grpc"),
        ("ALLOT_HEALTH_ADDR", "health"),
        (f"ALLOT_{service.upper()}_METRICS_ADDR", "metrics"),
    ):
        listen = env.get(variable)
        assert listen is not None, f"{name}: {variable} would be the loopback default"
        assert listen.rsplit(":", 1)[0] == "0.0.0.0"
        assert ports.get(port_name) == _port(listen)
    assert ports["metrics"] == 9090


@pytest.mark.parametrize(("overlay", "name"), DEPLOYMENTS)
def test_probes_startup_and_readiness_follow_health_liveness_only_the_loop(overlay, name):
    """Health turns NOT_SERVING while the database is away (docs/faults.md): that must take
    the pod out of the Service, not get it restarted, so liveness asks the health name
    `liveness` (the process listens and its event loop answers; shared/server.py LIVENESS).
    Startup covers the first connection and the migrations."""
    deployment = _deployment(overlay, name)
    container = _container(deployment)
    health = _port(_env(container)["ALLOT_HEALTH_ADDR"])
    for probe in ("startupProbe", "readinessProbe"):
        grpc_probe = container[probe]["grpc"]
        assert grpc_probe == {"port": health, "service": _grpc_service_name(_service(deployment))}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    liveness = container["livenessProbe"]
    assert liveness["grpc"] == {"port": health, "service": LIVENESS}, (
        f"{name}'s livenessProbe must not follow the database"
    )


@pytest.mark.parametrize(("overlay", "name"), DEPLOYMENTS)
def test_shutdown_fits_in_the_termination_grace_period(overlay, name):
    """SIGTERM ends the process within ALLOT_SHUTDOWN_GRACE_SECONDS plus a few seconds
    (shared/server.py); kubelet must not SIGKILL it before."""
    deployment = _deployment(overlay, name)
    grace = int(_env(_container(deployment)).get("ALLOT_SHUTDOWN_GRACE_SECONDS", "10"))
    pod = _pod(deployment)
    assert pod.get("terminationGracePeriodSeconds", 30) >= grace + SHUTDOWN_MARGIN + 2


def _mounted(workload: dict, container: dict, path: str) -> tuple[dict, str]:
    """The pod volume mounted whole (no subPath) over the folder of `path`, and the file name."""
    folder, _, filename = path.rpartition("/")
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == folder]
    assert len(mounts) == 1, f"nothing (or several) mounted at {folder}"
    assert "subPath" not in mounts[0], "subPath mounts never see a rotated file"
    volumes = {v["name"]: v for v in _pod(workload).get("volumes", [])}
    return volumes[mounts[0]["name"]], filename


@pytest.mark.parametrize(("overlay", "name"), DEPLOYMENTS)
def test_the_catalog_is_the_generated_configmap(overlay, name):
    deployment = _deployment(overlay, name)
    volume, filename = _mounted(
        deployment, _container(deployment), _env(_container(deployment))["ALLOT_CATALOG"]
    )
    configmap = SUITES[overlay].kind("ConfigMap")[volume["configMap"]["name"]]
    # The generated name carries a content hash: a changed catalog rolls the pods.
    assert configmap["metadata"]["name"].startswith("allot-catalog-")
    assert parse_catalog(configmap["data"][filename]) == CATALOG


def test_the_kustomize_catalog_is_the_sample_catalog():
    """kustomize reads no file outside its directory, so components/suite holds a copy."""
    copy = K8S / "components" / "suite" / "catalog.yaml"
    assert copy.read_text() == (ROOT / "deploy" / "catalog.yaml").read_text()


@pytest.mark.parametrize(("overlay", "name"), DEPLOYMENTS)
def test_the_service_serves_mtls_with_its_own_certificate_from_a_secret(overlay, name):
    deployment = _deployment(overlay, name)
    container, env = _container(deployment), _env(_container(deployment))
    assert env.get("ALLOT_TLS_CLIENT_AUTH") == "require"
    files = {}
    for variable, key in (
        ("ALLOT_TLS_CERT_FILE", "tls.crt"),
        ("ALLOT_TLS_KEY_FILE", "tls.key"),
        ("ALLOT_TLS_CA_FILE", "ca.crt"),
    ):
        volume, filename = _mounted(deployment, container, env[variable])
        assert filename == key, f"{variable} is not the Secret's {key}"
        files[variable] = volume["secret"]["secretName"]
    (secret_name,) = set(files.values())
    (certificate,) = [
        c["spec"]
        for c in SUITES[overlay].kind("Certificate").values()
        if c["spec"]["secretName"] == secret_name
    ]
    assert certificate["uris"] == [f"spiffe://allot/{_service(deployment)}"]
    # Callers dial the deployment's Service by name: the certificate must carry it.
    (service,) = [
        s
        for s in SUITES[overlay].kind("Service").values()
        if _selects(s["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
    ]
    assert service["metadata"]["name"] in certificate["dnsNames"]
    assert {"server auth", "client auth"} <= set(certificate["usages"])


@pytest.mark.parametrize(("overlay", "name"), DEPLOYMENTS)
def test_tokens_are_verified_with_a_mounted_jwks_and_no_secret(overlay, name):
    deployment = _deployment(overlay, name)
    container, env = _container(deployment), _env(_container(deployment))
    volume, _ = _mounted(deployment, container, env["ALLOT_AUTH_JWKS_FILE"])
    assert "configMap" in volume or "secret" in volume
    assert not {"ALLOT_AUTH_SECRET", "ALLOT_AUTH_SECRET_FILE"} & set(env)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_are_headless_expose_only_grpc_and_select_one_deployment(overlay):
    suite = SUITES[overlay]
    for name, service in suite.kind("Service").items():
        spec = service["spec"]
        assert spec.get("clusterIP") == "None", f"{name} would pin each connection to a replica"
        assert [p["targetPort"] for p in spec["ports"]] == ["grpc"]
        (deployment,) = [
            d
            for d in suite.kind("Deployment").values()
            if _selects(spec["selector"], d["spec"]["template"]["metadata"]["labels"])
        ]
        assert spec["ports"][0]["port"] == PORTS[_service(deployment)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_has_a_pdb_and_an_hpa(overlay):
    suite = SUITES[overlay]
    for name, deployment in suite.kind("Deployment").items():
        assert "replicas" not in deployment["spec"], f"{name}: the HPA owns the replica count"
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        pdbs = [
            p
            for p in suite.kind("PodDisruptionBudget").values()
            if _selects(p["spec"]["selector"]["matchLabels"], labels)
        ]
        assert len(pdbs) == 1, f"{name} has {len(pdbs)} PDBs"
        (hpa,) = [
            h
            for h in suite.kind("HorizontalPodAutoscaler").values()
            if h["spec"]["scaleTargetRef"]
            == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        ]
        assert hpa["spec"]["minReplicas"] >= 2, "one replica leaves nothing through a drain"
        assert pdbs[0]["spec"].get("maxUnavailable", 0) < hpa["spec"]["minReplicas"]


def _addresses(overlay: str, deployment: dict) -> dict[str, list[str]]:
    """Service -> the addresses this pod dials it at, as the service computes them."""
    settings = Settings.from_env(_env(_container(deployment)))
    regions = list(CATALOG.regions)
    return {
        "quota": settings.quota_addresses(regions),
        "billing": [settings.billing_addr],
        "notification": [settings.notification_addr],
    }


@pytest.mark.parametrize(("overlay", "name"), DEPLOYMENTS)
def test_other_services_are_dialled_as_dns_targets_of_their_headless_services(overlay, name):
    deployment = _deployment(overlay, name)
    suite = SUITES[overlay]
    addresses = _addresses(overlay, deployment)
    for other in DIALS[_service(deployment)]:
        for address in addresses[other]:
            assert address.startswith("dns:///"), f"{name} dials {other} at {address}"
            host, port = address.removeprefix("dns:///").rsplit(":", 1)
            service = suite.kind("Service").get(host)
            assert service is not None, f"{name}: {address} names no Service"
            (target,) = [
                d
                for d in suite.kind("Deployment").values()
                if _selects(
                    service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"]
                )
            ]
            assert _service(target) == other
            assert int(port) in {p["port"] for p in service["spec"]["ports"]}


def test_two_regions_runs_a_quota_per_region_group_reached_through_endpoints():
    suite = SUITES["two-regions"]
    quotas = suite.deployments_of("quota")
    assert len(quotas) == 2
    served: dict[str, str] = {}
    secrets = set()
    for deployment in quotas:
        settings = Settings.from_env(_env(_container(deployment)))
        assert settings.quota_regions, f"{deployment['metadata']['name']} serves every region"
        for region in settings.quota_regions:
            assert region not in served, f"{region} is served twice"
            served[region] = deployment["metadata"]["name"]
        secrets.update(_secrets(_container(deployment)))
    assert set(served) == set(CATALOG.regions)
    assert len(secrets) == 2, "each region group has its own database Secret"
    for caller in ("billing", "notification"):
        (deployment,) = suite.deployments_of(caller)
        env = _env(_container(deployment))
        assert "ALLOT_QUOTA_ADDR" not in env
        endpoints = Settings.from_env(env).quota_endpoint_map(list(CATALOG.regions))
        for region, address in endpoints.items():
            # The Service of the deployment that serves the region (same name).
            assert address == f"dns:///{served[region]}:50051", (caller, region)


def _policy_for(suite: Suite, service: str) -> dict:
    (policy,) = [
        p
        for p in suite.kind("NetworkPolicy").values()
        if p["spec"]["podSelector"].get("matchLabels") == {"app.kubernetes.io/name": service}
    ]
    return policy


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_deny_by_default_and_admit_only_the_right_peers(overlay):
    suite = SUITES[overlay]
    default = [
        p
        for p in suite.kind("NetworkPolicy").values()
        if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")
    ]
    assert any(set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"} for p in default)
    for service in DIALS:
        spec = _policy_for(suite, service)["spec"]
        assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
        admitted: dict[object, set[str]] = {}
        for rule in spec["ingress"]:
            for peer in rule["from"]:
                pod = peer.get("podSelector", {}).get("matchLabels", {})
                namespace = peer.get("namespaceSelector", {}).get("matchLabels", {})
                who = pod.get("app.kubernetes.io/name") or next(iter(namespace.values()))
                admitted.setdefault(who, set()).update(str(p["port"]) for p in rule["ports"])
        assert admitted == {
            **{caller: {"grpc"} for caller in CALLERS[service]},
            "true": {"grpc"},  # namespaces labelled allot/gateway=true
            "monitoring": {"metrics"},
        }, service
        # Egress: the services it dials, on their ports, and PostgreSQL.
        dialled = {
            rule["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"]: rule["ports"]
            for rule in spec["egress"]
            if rule.get("to") and "podSelector" in rule["to"][0]
        }
        assert {k: [p["port"] for p in v] for k, v in dialled.items()} == {
            other: [PORTS[other]] for other in DIALS[service]
        }
        assert any(
            [p["port"] for p in rule["ports"]] == [5432] and "to" not in rule
            for rule in spec["egress"]
        )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dns_is_reachable_and_only_notification_reaches_mail_and_webhooks(overlay):
    suite = SUITES[overlay]
    dns = [
        rule
        for p in suite.kind("NetworkPolicy").values()
        if p["spec"]["podSelector"] == {}
        for rule in p["spec"].get("egress", [])
    ]
    assert {(p["port"], p["protocol"]) for rule in dns for p in rule["ports"]} == {
        (53, "UDP"),
        (53, "TCP"),
    }
    for service in DIALS:
        ports = {
            p["port"]
            for rule in _policy_for(suite, service)["spec"]["egress"]
            for p in rule["ports"]
        }
        outside = ports - set(PORTS.values()) - {5432}
        assert outside == ({25, 465, 587, 443, 80} if service == "notification" else set())


def test_the_example_overlay_generates_every_secret_the_deployments_read():
    suite = SUITES["example"]
    secrets = suite.kind("Secret")
    for deployment in suite.kind("Deployment").values():
        for name in _secrets(_container(deployment)):
            keys = set(secrets[name]["data"])
            service = _service(deployment)
            assert f"ALLOT_{service.upper()}_DATABASE_URL" in keys
            assert keys <= SETTINGS_ENV
    (notification,) = suite.deployments_of("notification")
    (name,) = _secrets(_container(notification))
    assert {"ALLOT_SMTP_URL", "ALLOT_SMTP_FROM", "ALLOT_SMS_GATEWAY_URL"} <= set(
        secrets[name]["data"]
    )
