"""Shared helpers for the deployment tests (tests/test_deploy_*.py), which check the deployment files without a
container engine (so they run where none is installed); docs/DEPLOYMENT.md, "What was verified", lists what they prove.

Here: the paths and targets, each image role's requirements computed from pyproject.toml (core + the role's
extra) and the modules it leaves out, a Dockerfile stage parser, the "module left out of this image" blocker,
the compose / Kubernetes loaders with compose's ${...} interpolation, and the settings each role really reads.
The pytest fixtures (dockerfile, blocker_dir, compose, k8s, kustomization) are imported by name by the test
modules that use them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
DEPLOYMENT_DOC = ROOT / "docs" / "DEPLOYMENT.md"
VENV_BIN = Path(sys.executable).parent
TELEPATHY = VENV_BIN / "telepathy"

TARGETS = ("receiver", "sender", "gateway", "pair")
MODEL_ROLES = ("receiver", "sender", "pair")
TWO_SERVICE_TARGETS = ("receiver", "sender", "gateway")  # the ones that also run on the CPU profile and in k8s
# Variables that are not Telepathy settings but may appear in image / pod environments.
STANDARD_ENV = {"PATH", "VIRTUAL_ENV", "HOME", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PIP_NO_CACHE_DIR",
                "PIP_DISABLE_PIP_VERSION_CHECK"}


# ============================================================================ image roles, from pyproject.toml
# Each Docker build stage installs the project with one extra (`pip install ".[serve]"`, `pip install ".[gateway]"`),
# so what an image holds is pyproject's core `dependencies` + that extra (self-references such as
# "telepathy-llm[serve]" expanded), and everything those require.

# Extras each role's image installs on top of the core `dependencies`, and the build stage that does it.
ROLES: dict[str, tuple[str, ...]] = {"model": ("serve",), "gateway": ("gateway",)}
BUILD_STAGES = {"model": "build-model", "gateway": "build-gateway"}

# The extras whose modules the excluded-module lists are about: what loads, trains or plots a model.
MODEL_EXTRAS = ("serve", "train")

# MODEL_EXTRAS distributions that a role's image gets although its extra does not name them, because something
# it installs requires them: tqdm (in [train]) is a dependency of transformers and huggingface-hub.
# test_blocked_modules_are_really_missing_from_the_images checks this against the installed packages' metadata.
DEPENDENCY_OF: dict[str, frozenset[str]] = {"model": frozenset({"tqdm"}), "gateway": frozenset()}

# Import name of a distribution where it is not the distribution name with "-" -> "_".
IMPORT_NAMES: dict[str, str] = {"pyyaml": "yaml", "prometheus-client": "prometheus_client"}


def _dist_name(requirement: str) -> str:
    """Normalized distribution name of a PEP 508 requirement string (PEP 503 normalization)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"cannot read a distribution name from {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def _self_extras(requirement: str, project: str) -> tuple[str, ...] | None:
    """The extras of a requirement on the project itself ("telepathy-llm[serve,gateway]"), else None."""
    if _dist_name(requirement) != project:
        return None
    match = re.match(r"\s*[A-Za-z0-9][A-Za-z0-9._-]*\s*\[([^\]]*)\]", requirement)
    if not match or ";" in requirement:
        raise ValueError(f"unsupported self-reference {requirement!r}: name the extras, without a marker")
    return tuple(e.strip() for e in match.group(1).split(",") if e.strip())


def _project_table() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def extra_requirements(extras: tuple[str, ...]) -> list[str]:
    """The requirement strings of `extras`, self-references expanded, first occurrence kept, in order."""
    project = _project_table()
    optional = project.get("optional-dependencies", {})
    name = _dist_name(project["name"])
    out: list[str] = []

    def add(extra: str, path: tuple[str, ...]) -> None:
        if extra in path:
            raise ValueError(f"extras include each other: {' -> '.join(path + (extra,))}")
        if extra not in optional:
            raise ValueError(f"pyproject.toml has no extra {extra!r}; it has: {', '.join(sorted(optional))}")
        for req in optional[extra]:
            nested = _self_extras(req, name)
            if nested is not None:
                for e in nested:
                    add(e, path + (extra,))
            elif req not in out:
                out.append(req)

    for extra in extras:
        add(extra, ())
    return out


def role_requirements(role: str) -> list[str]:
    """What `pip install ".[<the role's extra>]"` asks for: the core `dependencies` + the role's extras."""
    core = list(_project_table()["dependencies"])
    return core + [r for r in extra_requirements(ROLES[role]) if r not in core]


def import_name(distribution: str) -> str:
    name = _dist_name(distribution)
    return IMPORT_NAMES.get(name, name.replace("-", "_"))


def _excluded_modules() -> dict[str, frozenset[str]]:
    """Per role: import names of the MODEL_EXTRAS distributions its image does not have (neither installed by
    its extra nor brought in as a dependency, DEPENDENCY_OF): what the tests block to prove the role runs
    without them."""
    model = {_dist_name(r) for r in extra_requirements(MODEL_EXTRAS)}
    out = {}
    for role in ROLES:
        image = {_dist_name(r) for r in role_requirements(role)} | DEPENDENCY_OF[role]
        out[role] = frozenset(import_name(d) for d in model - image)
    return out


EXCLUDED_MODULES: dict[str, frozenset[str]] = _excluded_modules()


# =============================================================================================== Dockerfile


@dataclasses.dataclass
class Stage:
    name: str
    base: str
    parent: Stage | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    args: dict[str, str] = dataclasses.field(default_factory=dict)
    instructions: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def _inherited(self, attr: str):
        own = [v for k, v in self.instructions if k == attr]
        if own:
            return own[-1]
        return self.parent._inherited(attr) if self.parent else None

    @property
    def all_env(self) -> dict[str, str]:
        return {**(self.parent.all_env if self.parent else {}), **self.env}

    @property
    def entrypoint(self) -> list[str]:
        return _exec_form(self._inherited("ENTRYPOINT") or "[]")

    @property
    def cmd(self) -> list[str]:
        return _exec_form(self._inherited("CMD") or "[]")

    @property
    def healthcheck(self) -> str | None:
        return self._inherited("HEALTHCHECK")

    @property
    def user(self) -> str | None:
        return self._inherited("USER")

    @property
    def exposed(self) -> list[int]:
        own = [int(p.split("/")[0]) for k, v in self.instructions if k == "EXPOSE" for p in v.split()]
        return own + (self.parent.exposed if self.parent else [])


def _exec_form(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("["):
        return yaml.safe_load(value)  # a JSON array is YAML too
    return ["/bin/sh", "-c", value]


def _logical_lines(text: str) -> list[str]:
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by docker too
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        lines.append(current + raw)
        current = ""
    return lines


def _parse_env(value: str) -> dict[str, str]:
    out = {}
    for token in shlex.split(value):
        key, _, val = token.partition("=")
        out[key] = val
    return out


def parse_dockerfile(path: Path = DOCKERFILE) -> tuple[dict[str, str], dict[str, Stage]]:
    """(global ARGs, stages by name) of a Dockerfile, enough to read what each target runs and copies."""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for line in _logical_lines(path.read_text()):
        keyword, _, rest = line.strip().partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            parts = rest.split()
            base = parts[0]
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else f"stage{len(stages)}"
            stage = Stage(name=name, base=base, parent=stages.get(base))
            stages[name] = stage
            continue
        if stage is None:
            if keyword == "ARG":
                key, _, default = rest.partition("=")
                global_args[key] = default.strip('"')
            continue
        if keyword == "ENV":
            stage.env.update(_parse_env(rest))
        elif keyword == "ARG":
            key, _, default = rest.partition("=")
            stage.args[key] = default.strip('"')
        stage.instructions.append((keyword, rest))
    return global_args, stages


def _healthcheck_command(stage: Stage) -> str:
    value = stage.healthcheck
    assert value, f"target {stage.name} has no HEALTHCHECK"
    cmd = re.split(r"\bCMD\b", value, maxsplit=1)[1].strip()
    assert not cmd.startswith("["), "the HEALTHCHECK uses the shell form so that ${TELEPATHY_*PORT} follows the env"
    return cmd


@pytest.fixture(scope="module")
def dockerfile():
    return parse_dockerfile()



# =========================================================================== "images without these modules"

BLOCKER = textwrap.dedent('''
    # Written by tests/deploy_support.py: makes the modules an image leaves out unimportable, like in that image.
    import os, sys
    _BLOCKED = frozenset(m for m in os.environ.get("DEPLOY_TEST_BLOCKED_MODULES", "").split(",") if m)

    class _NotInThisImage:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in _BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (left out of this image)", name=name)
            return None

    if _BLOCKED:
        sys.meta_path.insert(0, _NotInThisImage())
''')


@pytest.fixture(scope="module")
def blocker_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("image_blocker")
    (d / "sitecustomize.py").write_text(BLOCKER)
    return d


def _role_env(blocker_dir: Path, role: str, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(base if base is not None else _clean_env())
    env["PYTHONPATH"] = str(blocker_dir)
    env["DEPLOY_TEST_BLOCKED_MODULES"] = ",".join(sorted(EXCLUDED_MODULES["model" if role in MODEL_ROLES else "gateway"]))
    return env


def _clean_env() -> dict[str, str]:
    """The test's environment without any TELEPATHY_* setting of the developer's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEPATHY_") and k not in ("PYTHONPATH",)}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


# ====================================================================================== compose & k8s files


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _k8s_docs() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name in ("kustomization.yaml", "secret.example.yaml"):
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict]:
    objects = {}
    for d in _k8s_docs():
        key = (d["kind"], d["metadata"]["name"])
        assert key not in objects, f"duplicate {key}"
        objects[key] = d
    return objects


@pytest.fixture(scope="module")
def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


_INTERP = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value, host_env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error} and $$ on every string."""
    if isinstance(value, dict):
        return {k: interpolate(v, host_env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, host_env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        val = host_env.get(name)
        unset = val is None or (op is not None and op.startswith(":") and val == "")
        if op in (":-", "-"):
            return arg if unset else val
        if op in (":?", "?"):
            if unset:
                raise KeyError(f"compose would stop: {name}: {arg}")
            return val
        return val or ""

    return _INTERP.sub(sub, value)


def _compose_vars(value) -> set[str]:
    if isinstance(value, dict):
        return set().union(*(_compose_vars(v) for v in value.values()), set())
    if isinstance(value, list):
        return set().union(*(_compose_vars(v) for v in value), set())
    if isinstance(value, str):
        return {m.group(1) or m.group(4) for m in _INTERP.finditer(value) if m.group(0) != "$$"}
    return set()


def service_env(compose: dict, name: str, host_env: dict[str, str]) -> dict[str, str]:
    """A compose service's environment as the container gets it: `KEY: value` interpolated; `KEY:` (no value)
    passed through from the host environment when set there, otherwise absent."""
    out = {}
    for key, value in (compose["services"][name].get("environment") or {}).items():
        if value is None:
            if key in host_env:
                out[key] = host_env[key]
        else:
            out[key] = str(interpolate(value, host_env))
    return out


def _role_of(service: str) -> str:
    """Compose service → image target / CLI role: gateway-pair is a gateway, receiver-cpu a receiver."""
    return "gateway" if service == "gateway-pair" else service.removesuffix("-cpu")


def _profile_of(service: str) -> str | None:
    return "cpu" if service.endswith("-cpu") else "pair" if service in ("pair", "gateway-pair") else None


def _known_env(role: str) -> set[str]:
    """Every environment variable that `role`'s process really reads (from the settings classes)."""
    from telepathy.bridge import embedded
    from telepathy.config import env_vars
    from telepathy.gateway.settings import GatewaySettings
    from telepathy.receiver_service.settings import ReceiverSettings
    from telepathy.serving.channels import ClientSettings

    client = set(env_vars(ClientSettings))  # outgoing calls and `telepathy healthcheck --grpc`
    if role == "gateway":
        return set(env_vars(GatewaySettings)) | client  # includes TELEPATHY_CONFIG / TELEPATHY_SECRETS_DIR
    if role == "receiver":
        return set(env_vars(ReceiverSettings)) | client | {embedded.CACHE_ENV, embedded.MODEL_FILES_ENV}
    from telepathy.pair_service.settings import PairSettings
    from telepathy.sender_service.settings import SenderSettings

    cls = PairSettings if role == "pair" else SenderSettings
    return set(env_vars(cls)) | client | {embedded.CACHE_ENV, embedded.MODEL_FILES_ENV}


def _settings_for(role: str, env: dict[str, str]):
    """Build the role's real settings object from `env` (raises when a value is refused)."""
    from telepathy.config import from_sources

    if role == "gateway":
        from telepathy.gateway.settings import GatewaySettings

        return GatewaySettings.from_env(env)
    if role == "receiver":
        from telepathy.receiver_service.settings import ReceiverSettings

        return from_sources(ReceiverSettings, env=env)
    from telepathy.pair_service.settings import PairSettings
    from telepathy.sender_service.settings import SenderSettings

    return from_sources(PairSettings if role == "pair" else SenderSettings, env=env)


HOST_ENV = {"TELEPATHY_AUTH_TOKEN": "compose-test-token", "TELEPATHY_API_KEYS": "key-one,key-two"}


def _telepathy_argv(shell_cmd: str, env: dict[str, str]) -> list[str]:
    expanded = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env[m.group(1) or m.group(2)], shell_cmd)
    argv = shlex.split(expanded)
    assert argv[0] == "telepathy", shell_cmd
    return argv[1:]
