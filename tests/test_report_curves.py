"""`telepathy report --curves RUN_DIR...`: training curves from the diagnostics.jsonl that the real `telepathy train`
writes, as one PNG with the plotted data beside it; bad run folders fail with a message naming the file."""

from __future__ import annotations

import json

import pytest

from telepathy.bridge.models import TINY_RECEIVER, TINY_SENDER
from telepathy.cli import main as cli

TINY_CLI = ["--sender", TINY_SENDER, "--receiver", TINY_RECEIVER, "--soft-tokens", "4", "--d-model", "32",
            "--heads", "4", "--d-wire", "16", "--batch-size", "12", "--validation-size", "24", "--train-limit", "60",
            "--no-cache", "--no-progress", "--device", "cpu"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real training runs of a few steps (seeds 0 and 1), validation every 2 steps."""
    root = tmp_path_factory.mktemp("runs")
    folders = []
    for seed in (0, 1):
        out = root / f"seed{seed}"
        assert cli(["train", "--task", "sst2", "--steps", "4", "--eval-every", "2", "--seed", str(seed),
                    "--out", str(out), *TINY_CLI]) == 0
        folders.append(out)
    return folders


def _rows(run):
    return [json.loads(line) for line in (run / "diagnostics.jsonl").read_text().splitlines() if line.strip()]


def test_curves_png_and_its_data_match_the_diagnostics(runs, tmp_path, capsys):
    out = tmp_path / "plots" / "curves.png"
    capsys.readouterr()
    assert cli(["report", "--curves", *map(str, runs), "--out", str(out)]) == 0
    data_path = out.with_suffix(".json")
    assert capsys.readouterr().out.splitlines() == [str(out), str(data_path)]

    png = out.read_bytes()
    assert png[:8] == PNG_SIGNATURE and len(png) > 10_000
    assert png[12:16] == b"IHDR"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > 1000 and height > 400  # two panels: loss and validation accuracy

    data = json.loads(data_path.read_text())
    assert [r["run"] for r in data["runs"]] == ["seed0", "seed1"]
    for run, doc in zip(runs, data["runs"]):
        rows = _rows(run)
        assert doc["diagnostics"] == str(run / "diagnostics.jsonl")
        assert doc["loss"] == [[r["step"], r["loss"]] for r in rows if "loss" in r]
        assert [s for s, _ in doc["loss"]] == [1, 2, 3, 4]
        assert doc["val_accuracy"] == [[r["step"], r["val_accuracy"]] for r in rows if "val_accuracy" in r]
        assert [s for s, _ in doc["val_accuracy"]] == [2, 4]


def test_curves_default_out_is_curves_png_in_the_current_folder(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli(["report", "--curves", str(runs[0])]) == 0
    assert capsys.readouterr().out.splitlines() == ["curves.png", "curves.json"]
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_SIGNATURE
    assert [r["run"] for r in json.loads((tmp_path / "curves.json").read_text())["runs"]] == ["seed0"]


def test_curves_bad_run_folders_fail_naming_the_file(runs, tmp_path, capsys):
    def error(*folders) -> str:
        assert cli(["report", "--curves", *map(str, folders), "--out", str(tmp_path / "c.png")]) == 2
        return capsys.readouterr().err.strip()

    missing = tmp_path / "missing"
    missing.mkdir()
    assert error(runs[0], missing) == (f"telepathy report: error: {missing / 'diagnostics.jsonl'}: no such file "
                                       f"(is {missing} a `telepathy train` run folder?)")

    def run_with(name: str, text: str):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "diagnostics.jsonl").write_text(text)
        return folder, folder / "diagnostics.jsonl"

    folder, path = run_with("empty", "\n")
    assert error(folder) == f"telepathy report: error: {path}: empty (no training steps recorded)"
    folder, path = run_with("garbled", '{"step": 1, "loss": 0.5}\n{"step": 2, "loss"\n')
    assert error(folder) == f"telepathy report: error: {path}: line 2 is not JSON"
    folder, path = run_with("nostep", '{"loss": 0.5}\n')
    assert error(folder) == f"telepathy report: error: {path}: line 1 is not an object with an integer step"
    folder, path = run_with("badloss", '{"step": 1, "loss": "high"}\n')
    assert error(folder) == f"telepathy report: error: {path}: line 1: loss is not a number"
    folder, path = run_with("valonly", '{"step": 2, "val_accuracy": 0.5}\n')
    assert error(folder) == f"telepathy report: error: {path}: no row with a loss"
    assert not (tmp_path / "c.png").exists()


def test_curves_name_runs_of_the_same_folder_name_by_their_parents(runs, tmp_path):
    """runs/trec/seed0 and runs/sst2/seed0 must not both be "seed0" in the legend and the data."""
    first, second = tmp_path / "trec" / "seed0", tmp_path / "sst2" / "seed0"
    for source, copy in ((runs[0], first), (runs[1], second)):
        copy.mkdir(parents=True)
        (copy / "diagnostics.jsonl").write_bytes((source / "diagnostics.jsonl").read_bytes())
    out = tmp_path / "curves.png"
    assert cli(["report", "--curves", str(first), str(second), "--out", str(out)]) == 0
    assert [r["run"] for r in json.loads(out.with_suffix(".json").read_text())["runs"]] == ["trec/seed0", "sst2/seed0"]

