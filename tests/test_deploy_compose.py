"""docker-compose.yml, checked without a container engine (docs/DEPLOYMENT.md, "What was verified"):

- its structure: profiles, build targets, dependencies, GPUs, volumes, published ports; compose GPU and CPU
  services differ only where they must; its healthchecks run the same probe as the images'.
- The compose `cpu` profile for real: each service's command + environment (image ENV, then compose
  environment with its ${...} interpolation, volumes mapped to local folders), with the tiny random model pair
  and tiny bridges, ports remapped to free loopback ports, is started as a local process in depends_on order,
  becomes healthy through its own compose healthcheck command, serves a classification through the gateway
  over HTTP, and stops cleanly on SIGTERM. The gateway process runs with the modules its image leaves out
  blocked, the services with theirs blocked. No mocks. The same for the `pair` profile (pair + gateway-pair), with
  the pair's TELEPATHY_DEVICE switched from cuda to cpu.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from deploy_support import (
    HOST_ENV,
    MODEL_ROLES,
    ROOT,
    TELEPATHY,
    TWO_SERVICE_TARGETS,
    _clean_env,
    _compose_vars,
    _healthcheck_command,
    _profile_of,
    _role_env,
    _role_of,
    _telepathy_argv,
    blocker_dir,  # noqa: F401  (fixture)
    compose,  # noqa: F401  (fixture)
    dockerfile,  # noqa: F401  (fixture)
    interpolate,
    service_env,
)


def test_compose_structure(compose, dockerfile):
    _, stages = dockerfile
    services = compose["services"]
    assert set(services) == {"receiver", "sender", "gateway", "receiver-cpu", "sender-cpu", "gateway-cpu", "pair",
                             "gateway-pair"}
    for name, svc in services.items():
        role, profile = _role_of(name), _profile_of(name)
        assert svc.get("profiles") == ([profile] if profile else None), f"{name}: GPU services are the default, the others profiles"
        assert svc["build"]["target"] == role and svc["build"]["dockerfile"] == "docker/Dockerfile"
        assert svc["build"]["context"] == "."
        assert "healthcheck" in svc, name
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert cond == {"condition": "service_healthy"}, f"{name} -> {dep}"
            assert dep in services and _profile_of(dep) == profile, f"{name} -> {dep}: other profile"
        # Only the gateway is published.
        assert ("ports" in svc) == (role == "gateway"), f"{name}: only the gateway publishes a port"
        gpu = (svc.get("deploy") or {}).get("resources", {}).get("reservations", {}).get("devices")
        if role in MODEL_ROLES and not name.endswith("-cpu"):
            assert gpu and gpu[0]["driver"] == "nvidia" and gpu[0]["capabilities"] == ["gpu"], name
            assert svc["build"]["args"]["BASE_IMAGE"].startswith("${GPU_BASE_IMAGE:-nvidia/cuda:")
            assert svc["environment"]["TELEPATHY_DEVICE"] == "cuda"
        else:
            assert not gpu, f"{name} must not reserve a GPU"
        if role in MODEL_ROLES:
            mounts = {v.split(":")[1]: v.split(":")[0] for v in interpolate(svc["volumes"], {})}
            assert mounts["/cache"] == "model-cache" and "model-cache" in compose["volumes"]
            assert mounts["/cache"] in compose["volumes"], "the converted-model cache is a named volume"
            assert "/models" in mounts and "/bridges" in mounts
    # The pair: the two models of the default services, one GPU (configurable), and the gateway pointed at it.
    pair_env, sender_env = service_env(compose, "pair", HOST_ENV), service_env(compose, "sender", HOST_ENV)
    receiver_env = service_env(compose, "receiver", HOST_ENV)
    assert pair_env["TELEPATHY_MODEL"] == sender_env["TELEPATHY_MODEL"]
    assert pair_env["TELEPATHY_RECEIVER_MODEL"] == receiver_env["TELEPATHY_MODEL"]
    assert _compose_vars(services["pair"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]) == {"PAIR_GPU"}
    gw, gw_pair = service_env(compose, "gateway", HOST_ENV), service_env(compose, "gateway-pair", HOST_ENV)
    assert gw_pair.pop("TELEPATHY_SENDER_ADDR") == gw_pair.pop("TELEPATHY_RECEIVER_ADDR") == "pair:50051"
    assert {k: v for k, v in gw.items() if not k.endswith("_ADDR")} == gw_pair
    # GPU ids: each service its own GPU by default, both configurable.
    ids = {n: services[n]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for n in ("receiver", "sender")}
    assert interpolate(ids["receiver"], {}) != interpolate(ids["sender"], {})
    assert _compose_vars(ids["receiver"]) == {"RECEIVER_GPU"} and _compose_vars(ids["sender"]) == {"SENDER_GPU"}
    # The auth token is required (compose refuses to start without it), for every service.
    for name in services:
        with pytest.raises(KeyError, match="TELEPATHY_AUTH_TOKEN"):
            service_env(compose, name, {})
    # The CPU services run the same commands and settings as the GPU ones, apart from the device.
    for role in TWO_SERVICE_TARGETS:
        gpu, cpu = services[role], services[f"{role}-cpu"]
        assert gpu["command"] == cpu["command"] and gpu["healthcheck"] == cpu["healthcheck"]
        e_gpu, e_cpu = service_env(compose, role, HOST_ENV), service_env(compose, f"{role}-cpu", HOST_ENV)
        e_gpu.pop("TELEPATHY_DEVICE", None), e_cpu.pop("TELEPATHY_DEVICE", None)
        assert e_gpu == e_cpu, role
        if role != "gateway":
            assert cpu["networks"]["default"]["aliases"] == [role], "the CPU services answer to the GPU names"
        assert cpu.get("depends_on", {}).keys() == {f"{d}-cpu" for d in gpu.get("depends_on", {})}
    # The gateway's container port is the image's TELEPATHY_GATEWAY_PORT.
    for name in ("gateway", "gateway-cpu", "gateway-pair"):
        published = interpolate(services[name]["ports"][0], {})
        host_ip, host_port, container_port = published.split(":")
        assert host_ip == "127.0.0.1" and host_port == "8000"
        assert container_port == stages["gateway"].env["TELEPATHY_GATEWAY_PORT"]


def test_image_and_compose_healthchecks_agree(compose, dockerfile):
    """Compose's healthcheck replaces the image's; both must run the same probe (the e2e test runs compose's)."""
    _, stages = dockerfile
    for name, svc in compose["services"].items():
        stage = stages[_role_of(name)]
        env = {**stage.all_env, **service_env(compose, name, HOST_ENV)}
        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD-SHELL", name
        assert _telepathy_argv(interpolate(test[1], {}), env) == _telepathy_argv(_healthcheck_command(stage), env), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _duration_s(value: str | int | float) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    total = 0.0
    for num, unit in re.findall(r"([\d.]+)(ms|h|m|s)", value):
        total += float(num) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


@dataclasses.dataclass
class LocalService:
    name: str
    role: str
    argv: list[str]
    env: dict[str, str]
    health: list[str]
    health_timeout_s: float
    port: int
    log: Path
    proc: subprocess.Popen | None = None

    def log_tail(self, n: int = 4000) -> str:
        return f"--- {self.name} log (tail) ---\n" + (self.log.read_text(errors="replace")[-n:] if self.log.exists() else "")

    def healthy(self) -> bool:
        """One run of the compose healthcheck, with its timeout (a probe that runs over counts as failed)."""
        try:
            return subprocess.run(self.health, env=self.env, capture_output=True, timeout=self.health_timeout_s).returncode == 0
        except subprocess.TimeoutExpired:
            return False


def _topological(compose: dict, names: list[str]) -> list[str]:
    order: list[str] = []

    def visit(n: str, path: tuple[str, ...] = ()):
        assert n not in path, f"depends_on cycle: {path + (n,)}"
        for dep in compose["services"][n].get("depends_on") or {}:
            visit(dep, path + (n,))
        if n not in order:
            order.append(n)

    for n in names:
        visit(n)
    return order


def _local_services(compose, stages, profile_services, host_env, mounts_on_host, tmp: Path,
                    blocker_dir: Path) -> dict[str, LocalService]:
    """Each compose service as a local process: its image ENV + compose environment, with the container's
    paths, hosts and ports mapped to this machine (mounts → folders, 0.0.0.0 → 127.0.0.1, service:port →
    127.0.0.1:free port)."""
    services = compose["services"]
    ports = {n: _free_port() for n in profile_services}
    # Names the services answer to on the compose network: their own and their aliases.
    dns: dict[str, str] = {}
    for n in profile_services:
        dns[n] = n
        for alias in ((services[n].get("networks") or {}).get("default") or {}).get("aliases", []):
            dns[alias] = n
    out = {}
    for n in profile_services:
        role = _role_of(n)
        svc = services[n]
        env = _clean_env()
        image_env = stages[role].all_env
        env.update({k: v for k, v in image_env.items() if k not in ("PATH", "VIRTUAL_ENV")})
        env.update(service_env(compose, n, host_env))
        # Volumes: container path → local folder.
        for volume in svc.get("volumes", []):
            source, target = interpolate(volume, host_env).split(":")[:2]
            local = mounts_on_host.get(source) or (ROOT / source if source.startswith(".") else Path(source))
            for k, v in env.items():
                if k.startswith("TELEPATHY_") and (v == target or v.startswith(target + "/")):
                    env[k] = str(local) + v[len(target):]
        # Listening: loopback, on this service's free port.
        port_var = "TELEPATHY_GATEWAY_PORT" if role == "gateway" else "TELEPATHY_PORT"
        host_var = "TELEPATHY_GATEWAY_HOST" if role == "gateway" else "TELEPATHY_HOST"
        assert env.get(host_var) == "0.0.0.0", f"{n}: containers must listen on every interface"
        env[host_var] = "127.0.0.1"
        env[port_var] = str(ports[n])
        # Dialing: service:port → 127.0.0.1:its free port (the port must be the one the target listens on).
        for k, v in list(env.items()):
            m = re.fullmatch(r"([a-z][a-z0-9-]*):(\d+)", v) if k.endswith("_ADDR") else None
            if m:
                target = dns.get(m.group(1))
                assert target, f"{n}: {k}={v} names no service of this profile"
                target_env = {**stages[_role_of(target)].all_env, **service_env(compose, target, host_env)}
                target_port = int(target_env["TELEPATHY_GATEWAY_PORT" if _role_of(target) == "gateway" else "TELEPATHY_PORT"])
                assert int(m.group(2)) == target_port, f"{n}: {k}={v} but {target} listens on {target_port}"
                env[k] = f"127.0.0.1:{ports[target]}"
        env = _role_env(blocker_dir, role, env)
        entry = [a for a in stages[role].entrypoint if a not in ("tini", "--")]
        assert entry == ["telepathy"], entry
        test = svc["healthcheck"]["test"]
        health = ["/bin/sh", "-c", interpolate(test[1], {})] if test[0] == "CMD-SHELL" else test[1:]
        out[n] = LocalService(n, role, [str(TELEPATHY), *svc["command"]], env, health,
                              _duration_s(svc["healthcheck"]["timeout"]), ports[n], tmp / f"{n}.log")
    return out


def _stop(svc: LocalService, grace_s: float) -> int | None:
    if svc.proc is None or svc.proc.poll() is not None:
        return svc.proc.returncode if svc.proc else None
    svc.proc.send_signal(signal.SIGTERM)
    try:
        return svc.proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        svc.proc.kill()
        svc.proc.wait(timeout=10)
        return None


@pytest.mark.timeout(300)
def test_compose_cpu_profile_serves_a_classification(compose, dockerfile, tiny_bridges_dir, tmp_path, blocker_dir):
    """`docker compose --profile cpu up gateway-cpu`, without docker: same commands, same environments."""
    from telepathy.bridge.models import TINY_RECEIVER, TINY_SENDER

    _, stages = dockerfile
    cache = tmp_path / "model-cache"
    cache.mkdir()
    host_env = {
        **HOST_ENV,
        # What a user of the compose file would set to run another pair and their own bridges.
        "RECEIVER_MODEL": TINY_RECEIVER,
        "SENDER_MODEL": TINY_SENDER,
        "BRIDGES_DIR": str(tiny_bridges_dir),
        "TELEPATHY_BRIDGES": "/bridges",
        "TELEPATHY_MAX_BATCH_SIZE": "4",  # a smaller warm-up batch on this small CPU
    }
    profile = _topological(compose, ["gateway-cpu"])
    assert profile == ["receiver-cpu", "sender-cpu", "gateway-cpu"]
    services = _local_services(compose, stages, profile, host_env, {"model-cache": cache}, tmp_path, blocker_dir)
    assert services["receiver-cpu"].env["TELEPATHY_BRIDGES"] == str(tiny_bridges_dir)
    assert services["receiver-cpu"].env["TELEPATHY_CACHE_DIR"] == str(cache)
    assert services["sender-cpu"].env["TELEPATHY_MODEL"] == TINY_SENDER

    _start_classify_stop(compose, services, profile, "gateway-cpu",
                         lambda: _check_probes_auth_and_dns_target(services["sender-cpu"].port, services["receiver-cpu"].port))


@pytest.mark.timeout(300)
def test_compose_pair_profile_serves_a_classification(compose, dockerfile, tiny_bridges_dir, tmp_path, blocker_dir):
    """`docker compose --profile pair up gateway-pair`, without docker and on the CPU: the pair's command and
    environment (TELEPATHY_DEVICE cuda → cpu, the one value this machine cannot honour), then the gateway."""
    from telepathy.bridge.models import TINY_RECEIVER, TINY_SENDER

    _, stages = dockerfile
    cache = tmp_path / "model-cache"
    cache.mkdir()
    host_env = {**HOST_ENV, "RECEIVER_MODEL": TINY_RECEIVER, "SENDER_MODEL": TINY_SENDER,
                "BRIDGES_DIR": str(tiny_bridges_dir), "TELEPATHY_BRIDGES": "/bridges", "TELEPATHY_MAX_BATCH_SIZE": "4"}
    profile = _topological(compose, ["gateway-pair"])
    assert profile == ["pair", "gateway-pair"]
    services = _local_services(compose, stages, profile, host_env, {"model-cache": cache}, tmp_path, blocker_dir)
    pair = services["pair"]
    assert (pair.env["TELEPATHY_MODEL"], pair.env["TELEPATHY_RECEIVER_MODEL"]) == (TINY_SENDER, TINY_RECEIVER)
    assert pair.env.pop("TELEPATHY_DEVICE") == "cuda"
    pair.env["TELEPATHY_DEVICE"] = "cpu"
    gw = services["gateway-pair"].env
    assert gw["TELEPATHY_SENDER_ADDR"] == gw["TELEPATHY_RECEIVER_ADDR"] == f"127.0.0.1:{pair.port}"
    _start_classify_stop(compose, services, profile, "gateway-pair",
                         lambda: _check_probes_auth_and_dns_target(pair.port, pair.port))


def _start_classify_stop(compose, services: dict[str, LocalService], profile: list[str], gateway: str, more) -> None:
    """Start `profile` in depends_on order (each after its dependencies pass their healthcheck), classify through
    the gateway with an API key (and not without), run `more()`, then SIGTERM all: each must exit cleanly."""
    import httpx

    from telepathy.bridge.tasks import TASKS

    deadline = time.monotonic() + 240
    healthy: set[str] = set()
    try:
        for name in profile:
            svc = services[name]
            for dep in compose["services"][name].get("depends_on") or {}:
                assert dep in healthy, f"{name} starts only after {dep} is healthy"
            with svc.log.open("wb") as log:
                svc.proc = subprocess.Popen(svc.argv, env=svc.env, stdout=log, stderr=subprocess.STDOUT,
                                            cwd=svc.log.parent, start_new_session=True)
            interval = min(1.0, _duration_s(compose["services"][name]["healthcheck"]["interval"]))
            while not svc.healthy():
                if svc.proc.poll() is not None:
                    pytest.fail(f"{name} exited with {svc.proc.returncode} before becoming healthy\n{svc.log_tail()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"{name} not healthy in time\n{svc.log_tail()}")
                time.sleep(interval)
            healthy.add(name)

        gw = services[gateway]
        key = HOST_ENV["TELEPATHY_API_KEYS"].split(",")[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{gw.port}", timeout=60) as http:
            # The Kubernetes probe paths answer without an API key.
            assert http.get("/healthz").status_code == 200
            assert http.get("/readyz").status_code == 200
            body = {"text": "a gripping, beautifully acted film", "task": "sst2"}
            assert http.post("/v1/classify", json=body).status_code == 401, "TELEPATHY_API_KEYS reached the gateway"
            r = http.post("/v1/classify", json=body, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, f"{r.status_code} {r.text}\n" + "\n".join(s.log_tail() for s in services.values())
            out = r.json()
            assert out["label"] in TASKS["sst2"].labels and out["path"] == "bridge" and out["wire_bytes"] > 0
        more()
    finally:
        codes = {}
        for name in reversed(profile):
            grace = _duration_s(compose["services"][name].get("stop_grace_period", "10s"))
            codes[name] = _stop(services[name], grace)
    logs = "\n".join(s.log_tail() for s in services.values())
    for name, code in codes.items():
        # uvicorn finishes its graceful shutdown, then re-raises SIGTERM (exit status 143 in a container).
        clean = code == 0 or (_role_of(name) == "gateway" and code == -signal.SIGTERM
                              and "Application shutdown complete" in services[name].log.read_text(errors="replace"))
        assert clean, f"exit codes after SIGTERM: {codes}\n{logs}"


def _check_probes_auth_and_dns_target(sender_port: int, receiver_port: int) -> None:
    """kubelet's gRPC probes carry no token and still see SERVING; calls without the token from compose are
    refused; a `dns:///` target (the Kubernetes form of the addresses) dials the same service."""
    import grpc

    from telepathy.ops.healthcheck import check_grpc
    from telepathy.protos.v1 import receiver_pb2, receiver_pb2_grpc, sender_pb2, sender_pb2_grpc
    from telepathy.serving.channels import ClientSettings, make_sync_channel

    no_token = ClientSettings()
    for port in (sender_port, receiver_port):
        ok, detail = check_grpc(f"127.0.0.1:{port}", settings=no_token)
        assert ok, detail
    with contextlib.closing(make_sync_channel(f"127.0.0.1:{sender_port}", no_token)) as ch:
        with pytest.raises(grpc.RpcError) as err:
            sender_pb2_grpc.SenderStub(ch).Info(sender_pb2.SenderInfoRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    settings = ClientSettings(auth_token=HOST_ENV["TELEPATHY_AUTH_TOKEN"])
    with contextlib.closing(make_sync_channel(f"dns:///127.0.0.1:{receiver_port}", settings)) as ch:
        info = receiver_pb2_grpc.ReceiverStub(ch).Info(receiver_pb2.ReceiverInfoRequest(), timeout=10)
        assert "sst2" in info.tasks
