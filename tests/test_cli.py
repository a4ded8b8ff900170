"""The `telepathy` entry point itself: version, help, the models listing, a parser that imports nothing heavy,
and clear errors where a command's extra is not installed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from telepathy.cli import COMMANDS, build_parser, main
from telepathy.commands import EVAL_METHODS
from telepathy.contract import VERSION as __version__


def test_version():
    out = subprocess.run([sys.executable, "-m", "telepathy.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"telepathy {__version__}"


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: telepathy" in capsys.readouterr().out


def test_models_json(capsys):
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["smollm2-135m-instruct"]["role"] == "sender" and rows["smollm2-135m-instruct"]["hidden_size"] == 576
    assert rows["gemma-3-270m"]["num_layers"] == 18 and rows["gemma-3-270m"]["vocab_size"] == 262144
    assert rows["random:llama-3.1-8b"]["hidden_size"] == 4096 and rows["random:mistral-7b-v0.3"]["vocab_size"] == 32768


def test_models_table(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("preset") and "gemma-3-270m" in out and "random:tiny-llama" in out


COMMAND_NAMES = ["models", "serve", "gateway", "up", "bench", "healthcheck", "train", "eval", "classify", "report"]
# Importing the parser and every command's --help must not load the model stack (nor the plotting one).
HEAVY = ("torch", "transformers", "safetensors", "matplotlib")


def test_version_of_the_console_script():
    script = Path(sys.executable).with_name("telepathy")
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout == f"telepathy {__version__}\n"


def test_every_command_is_in_the_table_and_the_help(capsys):
    assert list(COMMANDS) == COMMAND_NAMES
    text = build_parser().format_help()
    assert all(name in text for name in COMMAND_NAMES)
    for name in COMMAND_NAMES:
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        assert info.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: telepathy {name}")


def test_the_readme_command_table_lists_every_command():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## Commands"):].split("\n## ", 1)[0]
    listed = {m.split()[0] for m in re.findall(r"^\| `telepathy (\w[^`]*)`", table, re.M)}
    assert listed == set(COMMAND_NAMES)


def test_classify_json_and_the_sdk_say_scores_like_http(tiny_bridges_dir, capsys):
    """One name for label → probability everywhere: the HTTP API's `scores`."""
    from dataclasses import fields

    from telepathy.client import Classification, RelayResult
    from telepathy.gateway.protocol import ClassifyResponse

    assert "scores" in ClassifyResponse.model_fields
    for cls in (Classification, RelayResult):
        names = {f.name for f in fields(cls)}
        assert "scores" in names and "probabilities" not in names
    assert main(["classify", "--task", "sst2", "--bridge", str(tiny_bridges_dir / "sst2"), "--device", "cpu",
                 "--json", "a great film"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "probabilities" not in doc and list(doc["scores"]) == ["negative", "positive"]
    assert doc["label"] == max(doc["scores"], key=doc["scores"].get)
    assert sum(doc["scores"].values()) == pytest.approx(1.0, abs=1e-5)


def test_parser_and_every_help_import_nothing_heavy():
    code = f"""
import contextlib, io, sys
from telepathy.cli import build_parser, main
build_parser()
for name in {COMMAND_NAMES!r}:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main([name, "--help"])
        except SystemExit as exc:
            assert exc.code == 0, (name, exc.code)
    assert out.getvalue().startswith("usage: telepathy " + name), name
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main(["--help"])
    except SystemExit:
        pass
loaded = sorted(m for m in {HEAVY!r} if m in sys.modules)
assert not loaded, loaded
assert "torch" not in sys.modules and "transformers" not in sys.modules
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "transformers", "matplotlib", "tqdm", "safetensors", "filelock"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
"""


@pytest.mark.parametrize(("argv", "extra"), [
    (["train", "--task", "sst2", "--out", "OUT"], "train"),
    (["eval", "--task", "sst2", "--out", "OUT/r.json"], "train"),
    (["report", "--results", "OUT"], "train"),
    (["classify", "--task", "sst2", "a fine film"], "serve"),
    (["models"], "serve"),
])
def test_a_command_without_its_extra_fails_clearly(tmp_path, argv, extra):
    """Without torch (the gateway image): --help works, running says what to install, exit 2."""
    argv = [a.replace("OUT", str(tmp_path)) for a in argv]
    code = BLOCKER + f"""
import contextlib, io
from telepathy.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main([{argv[0]!r}, "--help"])
    except SystemExit as exc:
        assert exc.code == 0
sys.exit(main({argv!r}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    package = r.stderr.split("'")[1]
    assert package in ("torch", "transformers", "filelock", "safetensors", "tqdm", "matplotlib"), r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"telepathy {argv[0]}: error: this command needs the Python package {package!r}, which is not installed "
        f"here; install it with: pip install 'telepathy-llm[{extra}]'")


def test_eval_help_lists_the_evaluated_methods():
    from telepathy.bridge.training.evaluate import METHODS

    assert EVAL_METHODS == METHODS
