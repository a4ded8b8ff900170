"""The commands and settings in docker/Dockerfile, docker-compose.yml and deploy/k8s/*.yaml, checked against the
real CLI and settings classes (docs/DEPLOYMENT.md, "What was verified"): every `telepathy ...` command in them
parses with the real CLI parser; every TELEPATHY_* variable is one that the role's settings really read, and the
values are accepted by those settings classes.
"""

from __future__ import annotations

import re

import pytest
import yaml
from deploy_support import (
    HOST_ENV,
    K8S,
    STANDARD_ENV,
    TARGETS,
    _compose_vars,
    _healthcheck_command,
    _known_env,
    _role_of,
    _settings_for,
    _telepathy_argv,
    compose,  # noqa: F401  (fixture)
    dockerfile,  # noqa: F401  (fixture)
    interpolate,
    k8s,  # noqa: F401  (fixture)
    service_env,
)


def _commands(compose, k8s, stages) -> list[tuple[str, str, list[str]]]:
    """(where, role, argv after `telepathy`) of every telepathy command in the Dockerfile, compose and k8s."""
    out = []
    for target in TARGETS:
        stage = stages[target]
        out.append((f"Dockerfile {target} CMD", target, stage.cmd))
        out.append((f"Dockerfile {target} HEALTHCHECK", target, _telepathy_argv(_healthcheck_command(stage), stage.all_env)))
    for name, svc in compose["services"].items():
        env = {**stages[_role_of(name)].all_env, **service_env(compose, name, HOST_ENV)}
        out.append((f"compose {name} command", _role_of(name), svc["command"]))
        test = svc["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL"), test
        argv = _telepathy_argv(interpolate(test[1], {}), env) if test[0] == "CMD-SHELL" else test[2:]
        out.append((f"compose {name} healthcheck", _role_of(name), argv))
    for (kind, name), obj in k8s.items():
        if kind == "Deployment":
            for c in obj["spec"]["template"]["spec"]["containers"]:
                assert c["image"].split("/")[-1] == name and "command" not in c, "the image's entrypoint is `telepathy`"
                out.append((f"k8s {name} args", name, c["args"]))
    return out



def test_every_command_parses_with_the_real_cli(compose, k8s, dockerfile):
    from telepathy.cli import build_parser

    _, stages = dockerfile
    parser = build_parser()
    seen = set()
    for where, role, argv in _commands(compose, k8s, stages):
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: `telepathy {' '.join(argv)}` does not parse")
        assert getattr(args, "func", None), where
        if argv[0] == "serve":
            assert argv[1] == role, where
        seen.add(argv[0])
    assert seen == {"serve", "gateway", "healthcheck"}
    # The builder stages call the CLI too.
    for stage in stages.values():
        for keyword, rest in stage.instructions:
            for m in re.finditer(r"\btelepathy( [a-z][\w-]*)? --help", rest if keyword == "RUN" else ""):
                cmd = (m.group(1) or "").strip()
                assert not cmd or cmd in parser._subparsers._group_actions[0].choices, rest



def test_env_vars_exist_in_the_settings(compose, k8s, dockerfile):
    _, stages = dockerfile
    problems = []

    def check(where: str, role: str, names):
        known = _known_env(role)
        for n in names:
            if n not in known and n not in STANDARD_ENV:
                problems.append(f"{where}: {n} is not read by the {role}")

    for target in TARGETS:
        check(f"Dockerfile {target} ENV", target, stages[target].all_env)
    for name, svc in compose["services"].items():
        check(f"compose {name}", _role_of(name), svc["environment"])
    for (kind, name), obj in k8s.items():
        if kind == "Deployment":
            c = obj["spec"]["template"]["spec"]["containers"][0]
            check(f"k8s {name} env", name, [e["name"] for e in c.get("env", [])])
            for ref in c.get("envFrom", []):
                cm = k8s[("ConfigMap", ref["configMapRef"]["name"])]
                check(f"k8s ConfigMap {cm['metadata']['name']}", name, cm["data"])
    assert not problems, "\n".join(problems)
    # Host-side compose variables are not container settings: keep the TELEPATHY_ prefix for those only.
    for var in _compose_vars(compose):
        if var.startswith("TELEPATHY_"):
            assert any(var in (svc.get("environment") or {}) for svc in compose["services"].values()), var


def test_settings_accept_the_configured_values(compose, k8s, dockerfile):
    """The values themselves pass the services' own validation (e.g. the dns:/// addresses, the devices)."""
    _, stages = dockerfile
    for name in compose["services"]:
        role = _role_of(name)
        env = {**stages[role].all_env, **service_env(compose, name, HOST_ENV)}
        settings = _settings_for(role, env)
        assert settings.auth_token == HOST_ENV["TELEPATHY_AUTH_TOKEN"]
    secret = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    for (kind, name), obj in k8s.items():
        if kind != "Deployment":
            continue
        c = obj["spec"]["template"]["spec"]["containers"][0]
        env = dict(stages[name].all_env)
        for ref in c.get("envFrom", []):
            env.update(k8s[("ConfigMap", ref["configMapRef"]["name"])]["data"])
        for e in c.get("env", []):
            env[e["name"]] = e["value"] if "value" in e else secret["stringData"][e["valueFrom"]["secretKeyRef"]["key"]]
        settings = _settings_for(name, env)
        assert settings.auth_token == secret["stringData"]["auth-token"]
