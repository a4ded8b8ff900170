"""deploy/k8s/*.yaml, checked without a cluster (docs/DEPLOYMENT.md, "What was verified"): the manifests parse;
ports, probe ports, addresses, selectors and names agree with each other, with the images, with compose's
addresses and with the services' defaults; `kubectl kustomize` builds them (where kubectl is installed).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml
from deploy_support import (
    HOST_ENV,
    K8S,
    TARGETS,
    TWO_SERVICE_TARGETS,
    _profile_of,
    compose,  # noqa: F401  (fixture)
    dockerfile,  # noqa: F401  (fixture)
    k8s,  # noqa: F401  (fixture)
    kustomization,  # noqa: F401  (fixture)
    service_env,
)


def _addr_port(addr: str) -> tuple[str, int]:
    host, _, port = addr.removeprefix("dns:///").rpartition(":")
    return host, int(port)


def test_ports_names_and_probes_agree(compose, k8s, kustomization, dockerfile):
    from telepathy.gateway.settings import GatewaySettings
    from telepathy.pair_service.settings import PairSettings
    from telepathy.receiver_service.settings import ReceiverSettings
    from telepathy.sender_service.settings import SenderSettings

    _, stages = dockerfile
    ports = {"receiver": ReceiverSettings.port, "sender": SenderSettings.port, "gateway": GatewaySettings.port,
             "pair": PairSettings.port}
    ports = {k: getattr(v, "default", v) for k, v in ports.items()}
    assert ports == {"receiver": 50052, "sender": 50051, "gateway": 8000, "pair": 50051}
    # Images.
    for role in TARGETS:
        env = stages[role].all_env
        assert int(env["TELEPATHY_GATEWAY_PORT" if role == "gateway" else "TELEPATHY_PORT"]) == ports[role]
        assert stages[role].exposed == [ports[role]]
    # Compose: addresses name the right service and port (the pair serves both services).
    for name in compose["services"]:
        env = service_env(compose, name, HOST_ENV)
        for var, target in (("TELEPATHY_RECEIVER_ADDR", "receiver"), ("TELEPATHY_SENDER_ADDR", "sender")):
            if var in env:
                target = "pair" if _profile_of(name) == "pair" else target
                assert _addr_port(env[var]) == (target, ports[target]), f"compose {name} {var}"
    # Kubernetes.
    ns = kustomization["namespace"]
    assert ("Namespace", ns) in k8s
    for (kind, name), obj in k8s.items():
        if kind != "Namespace":
            assert obj["metadata"].get("namespace") == ns, f"{kind}/{name}"
    for role in TWO_SERVICE_TARGETS:  # no pair Deployment: Kubernetes runs the two services
        dep = k8s[("Deployment", role)]
        pod = dep["spec"]["template"]
        labels = pod["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"] == labels
        c = pod["spec"]["containers"][0]
        assert c["image"] in {i["name"] for i in kustomization["images"]}
        container_ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        main_port = container_ports["http" if role == "gateway" else "grpc"]
        assert main_port == ports[role]
        env = {}
        for ref in c["envFrom"]:
            env.update(k8s[("ConfigMap", ref["configMapRef"]["name"])]["data"])
        port_var = "TELEPATHY_GATEWAY_PORT" if role == "gateway" else "TELEPATHY_PORT"
        assert int(env.get(port_var, stages[role].all_env[port_var])) == ports[role]
        for probe in ("readinessProbe", "livenessProbe"):
            p = c[probe]
            if role == "gateway":
                assert p["httpGet"]["port"] == ports[role]
                assert p["httpGet"]["path"] == ("/readyz" if probe == "readinessProbe" else "/healthz")
            else:
                assert p["grpc"]["port"] == ports[role], f"{role} {probe}"  # grpc.health.v1
        if role != "gateway":
            assert c["startupProbe"]["grpc"]["port"] == ports[role]
            assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
            metrics_port = int(env["TELEPATHY_METRICS_PORT"])
            assert container_ports["metrics"] == metrics_port == int(pod["metadata"]["annotations"]["prometheus.io/port"])
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert mounts["/cache"] in {v["name"] for v in pod["spec"]["volumes"]}
            assert stages[role].all_env["TELEPATHY_CACHE_DIR"] == "/cache"
            svc = k8s[("Service", f"{role}-headless")]
            assert svc["spec"]["clusterIP"] == "None"
        else:
            svc = k8s[("Service", "gateway")]
        assert svc["spec"]["selector"].items() <= labels.items(), f"Service {svc['metadata']['name']} selects nothing"
        sport = svc["spec"]["ports"][0]
        assert sport["port"] == ports[role] and sport["targetPort"] in container_ports
        pdb = k8s[("PodDisruptionBudget", role)]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert pod["spec"]["securityContext"]["runAsUser"] == 10001
        if sc.get("readOnlyRootFilesystem"):
            assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}
    # Addresses: the senders reach the receivers' headless Service, the gateways the senders'.
    for role, var, target in (("sender", "TELEPATHY_RECEIVER_ADDR", "receiver"), ("gateway", "TELEPATHY_SENDER_ADDR", "sender")):
        addr = k8s[("ConfigMap", f"telepathy-{role}")]["data"][var]
        assert addr.startswith("dns:///"), f"{var} must use the dns resolver to see every {target} pod"
        assert _addr_port(addr) == (f"{target}-headless.{ns}.svc.cluster.local", ports[target])
    # HPA on the gateway, which sets no replicas of its own.
    hpa = k8s[("HorizontalPodAutoscaler", "gateway")]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    assert "replicas" not in k8s[("Deployment", "gateway")]["spec"]
    assert "cpu" in k8s[("Deployment", "gateway")]["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
    # Secret references match the example Secret (name and keys).
    secret = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    for role in TWO_SERVICE_TARGETS:
        for e in k8s[("Deployment", role)]["spec"]["template"]["spec"]["containers"][0].get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    assert "secret.example.yaml" not in kustomization["resources"]
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S.glob("*.yaml")
                                                         if p.name not in ("kustomization.yaml", "secret.example.yaml"))


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for `kubectl kustomize`) is not installed")
def test_kustomize_builds(k8s):
    r = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    built = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(r.stdout) if d}
    assert built == set(k8s)
