"""The `telepathy` entry point itself: version, help, the models listing."""

from __future__ import annotations

import json
import subprocess
import sys

from telepathy.contract import VERSION as __version__
from telepathy.cli import main


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
