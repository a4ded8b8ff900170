"""Bring a GPU run's archives into the repo: results merged into results/, bridges into the package.

    .venv/bin/python tools/import_gpu_results.py runs/gpu-out

- results.tar.gz: results/*.json are merged method by method into the repo's results/
  (telepathy.bridge.training.evaluate.merge_results, so methods from an earlier run stay unless the new run has them
  too); wire_ablation.json replaces the old one if present; each trained bridge's config.json + diagnostics.jsonl
  go to results/diagnostics/<task>_seed<s>.*;
- shipped_<task>.tar: extracted into bridge/bridges/ (<sender>__<receiver>/<task>/{model.safetensors,config.json});
- then results/summary.md and results/accuracy.png are rebuilt.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from telepathy.bridge.checkpoint import read_meta
from telepathy.bridge.training.evaluate import merge_results
from telepathy.bridge.training.report import write_report

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pack_dir", help="the folder a GPU run's packed results are in (gpu_experiments.py --pack)")
    p.add_argument("--results", default=str(ROOT / "results"))
    p.add_argument("--bridges", default=str(ROOT / "bridge" / "bridges"))
    args = p.parse_args(argv)
    src, results, bridges = Path(args.pack_dir), Path(args.results), Path(args.bridges)

    archive = src / "results.tar.gz"
    if archive.exists():
        with tempfile.TemporaryDirectory() as tmp, tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
            tmp = Path(tmp)
            for path in sorted((tmp / "results").glob("*.json")):
                if path.name == "wire_ablation.json":
                    shutil.copy(path, results / path.name)
                else:
                    merge_results(results / path.name, json.loads(path.read_text()))
                print("merged", path.name)
            (results / "diagnostics").mkdir(parents=True, exist_ok=True)
            for diag in sorted((tmp / "runs").glob("*/seed*/diagnostics.jsonl")):
                task, seed = diag.parent.parent.name, diag.parent.name
                shutil.copy(diag, results / "diagnostics" / f"{task}_{seed}.diagnostics.jsonl")
                if (diag.parent / "config.json").exists():
                    shutil.copy(diag.parent / "config.json", results / "diagnostics" / f"{task}_{seed}.config.json")
            for pipeline in sorted(tmp.glob("pipeline_*.json")):
                shutil.copy(pipeline, results / "diagnostics" / pipeline.name)
    for tar_path in sorted(src.glob("shipped_*.tar")):
        with tarfile.open(tar_path) as tar:
            tar.extractall(bridges, filter="data")
        for folder in sorted({bridges / Path(m).parent for m in tarfile.open(tar_path).getnames()}):
            meta = read_meta(folder)
            size = (folder / "model.safetensors").stat().st_size
            print(f"shipped {meta.bridge_id} → {folder} ({size / 1e6:.2f} MB, validation "
                  f"{meta.training.get('validation_accuracy')})")
    for path in write_report(results, results):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
