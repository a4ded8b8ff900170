"""Deployment files, checked without a container engine (none runs on these machines).

What is proved here (docs/DEPLOYMENT.md, "What was verified"):
- docker/Dockerfile: the three targets exist, run as a non-root user, use the project's `telepathy` command as
  entrypoint and health check; every COPY source exists and survives .dockerignore; the model wheels and the
  torch pin agree with the Makefile; each build stage installs the project with its role's extra (model:
  `pip install ".[serve]"` after torch from its own index, checked to be kept; gateway: `pip install ".[gateway]"`),
  and the roles computed here from pyproject (core + that extra) leave out only what the role never imports (the
  gateway and healthcheck commands run with everything of [serve]/[train] unimportable, the services without
  [train]'s matplotlib; tqdm arrives with transformers); the wheel built from the context installs every file
  under the `telepathy` namespace.
- docker-compose.yml, deploy/k8s/*.yaml: they parse; every `telepathy ...` command in them and in the Dockerfile
  parses with the real CLI parser; every TELEPATHY_* variable is one that the role's settings really read, and
  the values are accepted by those settings classes; ports, probe ports, addresses, selectors and names agree
  with each other and with the services' defaults; compose GPU and CPU services differ only where they must.
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
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
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


def test_dockerfile_targets(dockerfile):
    global_args, stages = dockerfile
    assert global_args["BASE_IMAGE"].startswith("python:3.1") and global_args["BASE_IMAGE"].endswith("-slim")
    cuda_hint = DOCKERFILE.read_text()
    assert "nvidia/cuda:" in cuda_hint and "TORCH_INDEX_URL=https://pypi.org/simple" in cuda_hint, "document the CUDA build"
    for target in TARGETS:
        stage = stages[target]
        assert stage.user and stage.user.split(":")[0] not in ("root", "0"), f"{target} must not run as root"
        assert stage.entrypoint[-1] == "telepathy" and stage.entrypoint[0] == "tini", stage.entrypoint
        assert "telepathy healthcheck" in _healthcheck_command(stage)
    # The model files ride in the model images only; the gateway image has no torch layer at all.
    chain = lambda s: [s.name] + (chain(s.parent) if s.parent else [])  # noqa: E731
    for role in MODEL_ROLES:
        assert "model-runtime" in chain(stages[role])
    assert "model-runtime" not in chain(stages["gateway"])
    copies_from = lambda s: {re.search(r"--from=(\S+)", v).group(1) for k, v in s.instructions if k == "COPY" and "--from=" in v}  # noqa: E731
    assert copies_from(stages["model-runtime"]) == {"build-model"}
    assert copies_from(stages["gateway"]) == {"build-gateway"}
    assert "TORCH_INDEX_URL" in stages["build-model"].args and "TORCH_INDEX_URL" not in stages["build-gateway"].args


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        pattern = pattern.strip("/")
        regex = ""
        i = 0
        while i < len(pattern):  # Go filepath.Match plus docker's `**`
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        patterns.append((negate, re.compile(regex + "$")))
    return patterns


def dockerignored(rel_path: str) -> bool:
    """Whether docker leaves `rel_path` out of the build context (last matching pattern wins; a match on a
    parent folder counts, as in docker's own matcher)."""
    parts = rel_path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, regex in _dockerignore_patterns():
        if any(regex.match(p) for p in prefixes):
            excluded = not negate
    return excluded


def test_copy_sources_exist_and_reach_the_build_context(dockerfile):
    _, stages = dockerfile
    sources = []
    for stage in stages.values():
        for keyword, rest in stage.instructions:
            if keyword in ("COPY", "ADD") and "--from=" not in rest:
                args = [a for a in shlex.split(rest) if not a.startswith("--")]
                sources += args[:-1]
    assert sources, "no COPY found"
    for src in sources:
        path = ROOT / src
        assert path.exists(), f"COPY source {src} does not exist in the repository"
        assert not dockerignored(src), f"COPY source {src} is excluded by .dockerignore"
        files = [path] if path.is_file() else [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            if "/tests/" not in f"/{rel}":
                assert not dockerignored(rel), f"{rel} (under COPY {src}) would be missing from the image"
    # pip install . needs every package that pyproject lists, from the folder its package-dir maps it to.
    copied = {s.strip("/") for s in sources}
    for pkg, folder in _package_folders().items():
        assert (ROOT / folder).is_dir(), f"package {pkg}: its folder {folder}/ does not exist"
        assert folder.split("/")[0] in copied, f"package {pkg} ({folder}/) is installed by pyproject but never copied into the images"
    # And pyproject's license-files (setuptools refuses to build without them).
    for pattern in _pyproject()["project"].get("license-files", []):
        assert pattern in copied and not dockerignored(pattern), f"license file {pattern} is not copied"
    # And what must stay out of the context.
    for rel in (".venv/bin/python", "results/x.json", "tests/test_deploy.py", ".pytest_cache/v",
                "telepathy/__pycache__/cli.cpython-311.pyc", "bridge/__pycache__/lm.cpython-311.pyc",
                "data/sst2/test.jsonl", ".git/HEAD", "runs/a", "docker/volumes/models/x.gguf", ".env",
                "telepathy.egg-info/PKG-INFO", "telepathy_llm.egg-info/PKG-INFO", "tools/x.py",
                "rpc/serve.py", "gateway/cli.py"):
        assert dockerignored(rel), f"{rel} would be sent to docker build"


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _package_dirs() -> dict[str, str]:
    """pyproject's [tool.setuptools.package-dir]: package name → the folder that holds it."""
    return _pyproject()["tool"]["setuptools"]["package-dir"]


def _package_folders() -> dict[str, str]:
    """Every package pyproject installs → its source folder (setuptools' rule: the nearest mapped parent package,
    then the remaining name parts as sub-folders)."""
    mapping = _package_dirs()
    out = {}
    for pkg in _pyproject()["tool"]["setuptools"]["packages"]:
        parts = pkg.split(".")
        for i in range(len(parts), 0, -1):
            parent = ".".join(parts[:i])
            if parent in mapping:
                out[pkg] = "/".join([mapping[parent], *parts[i:]])
                break
        else:
            out[pkg] = "/".join(parts)
    return out


def _wheel_name(rel: str) -> str | None:
    """The name a source file of the repository gets inside the wheel (package-dir mapping), or None when no
    installed package holds it."""
    mapping = sorted(_package_dirs().items(), key=lambda kv: len(kv[1]), reverse=True)  # deepest folder first
    for pkg, folder in mapping:
        if rel.startswith(folder.rstrip("/") + "/"):
            return pkg.replace(".", "/") + "/" + rel[len(folder.rstrip("/")) + 1:]
    return None


def _build_context(dest: Path) -> set[str]:
    """Copy what `docker build .` would send (the repository minus .dockerignore) to `dest`; its file list."""
    negations = [line.strip()[1:].strip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
                 if line.strip().startswith("!")]
    sent = set()
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel_dir = Path(dirpath).relative_to(ROOT).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        # Prune folders that are excluded and that no `!pattern` reaches into (.git, .venv, data, ...).
        dirnames[:] = [d for d in dirnames if not dockerignored(rel_dir + d)
                       or any(n == rel_dir + d or n.startswith(rel_dir + d + "/") for n in negations)]
        for f in filenames:
            rel = rel_dir + f
            if not dockerignored(rel):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, dest / rel)
                sent.add(rel)
    return sent


def test_pip_install_works_from_the_build_context(dockerfile, tmp_path):
    """The model images run `pip install --no-deps .` on exactly what their COPY lines bring from the context:
    build that wheel here and check it holds every module, the protos, the presets and the shipped bridges."""
    import zipfile

    _, stages = dockerfile
    context = tmp_path / "context"
    sent = _build_context(context)
    src = tmp_path / "src"  # the builder's WORKDIR
    for stage in (stages["builder"], stages["build-model"]):
        for keyword, rest in stage.instructions:
            if keyword == "COPY" and "--from=" not in rest:
                *sources, target = shlex.split(rest)
                into_dir = len(sources) > 1 or target.endswith("/")  # docker's rule for the destination
                for s in sources:
                    assert (context / s).exists(), f"COPY {s}: not in the build context"
                    if (context / s).is_dir():  # a folder's contents go into the destination
                        shutil.copytree(context / s, src / target, dirs_exist_ok=True)
                    else:
                        dst = src / target / Path(s).name if into_dir else src / target
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(context / s, dst)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "wheel"), str(src)], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    wheel = next((tmp_path / "wheel").glob("telepathy_llm-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    # Every module, proto, stub, preset and shipped bridge that the context sends, under its installed name.
    expected = {_wheel_name(rel) for rel in sent
                if rel.endswith((".py", ".proto", ".pyi", "py.typed"))
                or rel.startswith(("bridge/presets/", "bridge/bridges/"))} - {None}
    assert {"telepathy/cli.py", "telepathy/ops/serve.py", "telepathy/gateway/cli.py",
            "telepathy/bridge/presets/tiny_vocab.json", "telepathy/protos/v1/common.proto",
            "telepathy/sender_service/servicer.py", "telepathy/pair_service/app.py", "telepathy/py.typed"} <= expected
    assert any(n.startswith("telepathy/bridge/bridges/") and n.endswith(".safetensors") for n in expected)
    missing = sorted(expected - names)
    assert not missing, f"`pip install .` in the image would not install: {missing[:20]}"
    # One top-level package (and its dist-info), nothing else.
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"telepathy"}
    dist_info = {n.split("/")[0] for n in names if ".dist-info/" in n}
    assert len(dist_info) == 1 and next(iter(dist_info)).startswith("telepathy_llm-"), dist_info
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "telepathy = telepathy.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def _makefile_var(name: str) -> str:
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    return re.search(rf"^{name}\s*[:?]?=\s*(.+)$", text, re.M).group(1).strip()


def test_image_pins_agree_with_makefile(dockerfile):
    from telepathy.bridge import embedded

    _, stages = dockerfile
    args = stages["build-model"].args
    assert args["MODEL_WHEELS"].split() == _makefile_var("MODEL_WHEELS").split() == embedded.all_requirements()
    assert args["TORCH_SPEC"] == _makefile_var("TORCH_SPEC")
    # The converted-model cache is the mounted volume.
    assert stages["model-runtime"].env["TELEPATHY_CACHE_DIR"] == "/cache"
    assert 'VOLUME ["/cache"]' in DOCKERFILE.read_text()


def test_role_requirements_come_from_pyproject():
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    name = _dist_name
    core = {name(d) for d in project["dependencies"]}
    extra = lambda e: {name(d) for d in extras[e] if name(d) != name(project["name"])}  # noqa: E731
    assert ROLES == {"model": ("serve",), "gateway": ("gateway",)}
    assert set(ROLES.values()) <= {(e,) for e in extras}, "every role's extra exists in pyproject.toml"
    kept = {role: role_requirements(role) for role in ROLES}
    names = {role: {name(d) for d in reqs} for role, reqs in kept.items()}
    # model = core + [serve] (torch included: installed first from its own index, then kept by pip);
    # gateway = core + [gateway].
    assert names["model"] == core | extra("serve")
    assert names["gateway"] == core | extra("gateway")
    for role, reqs in kept.items():
        assert len(reqs) == len(set(reqs)), f"{role}: a requirement listed twice"
        assert name(project["name"]) not in names[role], f"{role}: a self-reference was not expanded"
        # The lines themselves are pyproject's (version bounds and markers included), not rewritten.
        assert set(reqs) <= set(project["dependencies"]) | {d for v in extras.values() for d in v}
    assert "torch" in extra("serve") and "torch" in names["model"]
    assert not names["gateway"] & ({"torch", "transformers"} | extra("serve") | extra("train"))
    assert "fastapi" in names["gateway"] and "fastapi" not in names["model"]
    # Self-references resolve: [train] is [serve] + its own.
    train = extra_requirements(("train",))
    assert {name(d) for d in train} == extra("serve") | extra("train")
    # The modules the tests block: everything of [serve]/[train] for the gateway, the training-only ones for the
    # services (torch is in the model images; tqdm too, as a dependency of transformers).
    assert EXCLUDED_MODULES == {
        "gateway": {"torch", "transformers", "gguf", "safetensors", "filelock", "matplotlib", "tqdm"},
        "model": {"matplotlib"},
    }
    assert "torch" not in EXCLUDED_MODULES["model"], "torch is in the model images"
    for role, modules in EXCLUDED_MODULES.items():
        assert not {import_name(d) for d in names[role]} & modules, f"{role} blocks what it installs"


def _shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a RUN line's shell script, as words (quotes respected; split at `;`, `&&`, `||`,
    `|` and after `then` / `else` / `do`)."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in (";", "&&", "||", "|", "&"):
            commands.append(current)
            current = []
        elif token in ("then", "else", "do") and not current:
            continue
        else:
            current.append(token)
    commands.append(current)
    return [c for c in commands if c]


def _pip_installs(stage: Stage) -> list[list[str]]:
    """The arguments of every `pip install` in the stage's RUN lines (shell words after `pip install`)."""
    return [words[2:] for keyword, rest in stage.instructions if keyword == "RUN"
            for words in _shell_commands(rest) if len(words) >= 2 and words[0].endswith("pip") and words[1] == "install"]


def test_each_build_stage_installs_its_extra(dockerfile):
    """docker/Dockerfile installs the project with the role's extra, no requirement list of its own."""
    _, stages = dockerfile
    for role, stage_name in BUILD_STAGES.items():
        installs = _pip_installs(stages[stage_name])
        spec = f".[{','.join(ROLES[role])}]"
        project = [args for args in installs if any(a == "." or a.startswith(".[") for a in args)]
        assert project == [[spec]], f"{stage_name} must run `pip install \"{spec}\"` once, with nothing else: {project}"
        assert not any("-r" in args or "--requirement" in args for args in installs), f"{stage_name} installs a list"
        # The sources are copied before that install (it builds the project from them).
        copied = [i for i, (k, v) in enumerate(stages[stage_name].instructions) if k == "COPY" and "--from=" not in v]
        runs = [i for i, (k, v) in enumerate(stages[stage_name].instructions) if k == "RUN" and any(spec in c for c in _shell_commands(v))]
        assert copied and runs and max(copied) < runs[0], f"{stage_name}: COPY the sources before `pip install \"{spec}\"`"
    # The model stage: torch first, from TORCH_INDEX_URL, and the build fails if `.[serve]` replaced it.
    model = stages["build-model"]
    installs = _pip_installs(model)
    assert installs[0] == ["--index-url", "${TORCH_INDEX_URL}", "${TORCH_SPEC}"], installs
    serve_run = next(v for k, v in model.instructions if k == "RUN" and ".[serve]" in v)
    assert serve_run.count("torch.__version__") == 1 and "/tmp/torch-version" in serve_run and "exit 1" in serve_run
    torch_run = next(v for k, v in model.instructions if k == "RUN" and "${TORCH_SPEC}" in v)
    assert "torch.__version__" in torch_run and "> /tmp/torch-version" in torch_run
    # The smoke checks stay.
    assert "telepathy --help" in serve_run
    assert any("telepathy gateway --help" in v for k, v in stages["build-gateway"].instructions if k == "RUN")
    # The gateway stage never sees torch.
    assert not any("torch" in v for k, v in stages["build-gateway"].instructions)
    # And the former helper script is gone everywhere.
    assert not (ROOT / "docker" / "requirements.py").exists()
    for path in (DOCKERFILE, ROOT / ".dockerignore", DEPLOYMENT_DOC):
        assert "requirements.py" not in path.read_text(), f"{path.relative_to(ROOT)} still names docker/requirements.py"


def _installed_closure(requirements: list[str]) -> set[str]:
    """Normalized names of `requirements` and everything they require, by the installed packages' metadata
    (what pip would bring into an image; extras of the dependencies are not followed)."""
    import importlib.metadata

    from packaging.requirements import Requirement

    name = _dist_name
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = name(req.name)
        if key in seen:
            continue
        seen.add(key)
        try:
            todo += [Requirement(r) for r in importlib.metadata.requires(req.name) or []]
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{req.name} (needed by an image) is not installed here, cannot follow its dependencies")
    return seen


def test_blocked_modules_are_really_missing_from_the_images():
    """What a role blocks in these tests must be absent from its image for real: no package that the image
    installs (core + its extra, torch included in the model images) requires one of them, and every MODEL_EXTRAS
    distribution that does arrive that way is listed in DEPENDENCY_OF (so it is not blocked)."""
    name = _dist_name
    model_extras = {name(d) for d in extra_requirements(MODEL_EXTRAS)}
    for role in ROLES:
        reqs = role_requirements(role)
        closure = _installed_closure(reqs)
        direct = {name(r) for r in reqs}
        assert (closure & model_extras) - direct == DEPENDENCY_OF[role], role
        blocked = EXCLUDED_MODULES[role]
        assert not {import_name(d) for d in closure} & blocked, f"{role}: blocks what its image has"


# =========================================================================== "images without these modules"

BLOCKER = textwrap.dedent('''
    # Written by tests/test_deploy.py: makes the modules an image leaves out unimportable, like in that image.
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


@pytest.mark.parametrize("argv", [
    ["gateway", "--help"],
    ["healthcheck", "--help"],
])
def test_gateway_image_commands_run_without_model_dependencies(blocker_dir, argv):
    r = subprocess.run([str(TELEPATHY), *argv], env=_role_env(blocker_dir, "gateway"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"`telepathy {' '.join(argv)}` needs a module the gateway image leaves out " \
                              f"({sorted(EXCLUDED_MODULES['gateway'])}):\n{r.stderr[-3000:]}"
    # And they really could not import it (the blocker works).
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=_role_env(blocker_dir, "gateway"), capture_output=True, text=True)
    assert probe.returncode != 0 and "left out of this image" in probe.stderr


def test_model_image_commands_run_without_plotting(blocker_dir):
    r = subprocess.run([str(TELEPATHY), "serve", "--help"], env=_role_env(blocker_dir, "sender"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]


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
    from telepathy.gateway import settings as gw_settings
    from telepathy.receiver_service.settings import ReceiverSettings
    from telepathy.serving.channels import ClientSettings

    client = set(env_vars(ClientSettings))  # outgoing calls and `telepathy healthcheck --grpc`
    if role == "gateway":
        return set(gw_settings.ENV_VARS.values()) | client
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


def test_compose_variables_are_documented(compose):
    """Host-side variables (GPU ids, folders, image names) must be in docs/DEPLOYMENT.md, and so must every
    container setting compose passes through."""
    doc = DEPLOYMENT_DOC.read_text()
    names = _compose_vars(compose)
    for svc in compose["services"].values():
        names |= set((svc.get("environment") or {}).keys())
    missing = sorted(n for n in names if f"`{n}`" not in doc)
    assert not missing, f"docs/DEPLOYMENT.md does not document: {missing}"


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


def _telepathy_argv(shell_cmd: str, env: dict[str, str]) -> list[str]:
    expanded = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env[m.group(1) or m.group(2)], shell_cmd)
    argv = shlex.split(expanded)
    assert argv[0] == "telepathy", shell_cmd
    return argv[1:]


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


def test_image_and_compose_healthchecks_agree(compose, dockerfile):
    """Compose's healthcheck replaces the image's; both must run the same probe (the e2e test runs compose's)."""
    _, stages = dockerfile
    for name, svc in compose["services"].items():
        stage = stages[_role_of(name)]
        env = {**stage.all_env, **service_env(compose, name, HOST_ENV)}
        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD-SHELL", name
        assert _telepathy_argv(interpolate(test[1], {}), env) == _telepathy_argv(_healthcheck_command(stage), env), name


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


# ============================================================================= compose cpu profile, for real


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
