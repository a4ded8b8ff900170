"""Data sets shipped in `data/` (AG News, TREC-6, SST-2 as JSONL; provenance in data/README.md)."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from telepathy.bridge.tasks import get_task


@dataclass(frozen=True)
class Example:
    text: str
    label: int


def data_root() -> Path:
    """`TELEPATHY_DATA_DIR`, else the `data/` folder of the source checkout (or image)."""
    env = os.environ.get("TELEPATHY_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data"


def load_split(task: str, split: str, limit: int | None = None) -> list[Example]:
    """Rows of data/<task>/<split>.jsonl in file order; `limit` keeps the first rows."""
    spec = get_task(task)
    path = data_root() / task / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no split {split!r} for task {task!r}: {path} does not exist")
    rows: list[Example] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(rows) >= limit:
                break
            row = json.loads(line)
            label = int(row["label"])
            if not 0 <= label < spec.num_labels:
                raise ValueError(f"{path}: label {label} out of range for {task}")
            rows.append(Example(row["text"], label))
    return rows


def train_validation_split(task: str, validation_size: int = 500, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Carve a validation split out of train (never tune on test). Same seed → same split."""
    rows = load_split(task, "train")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    validation_idx = set(order[:validation_size])
    train = [r for i, r in enumerate(rows) if i not in validation_idx]
    validation = [rows[i] for i in order[:validation_size]]
    return train, validation


class BalancedSampler:
    """Yields class-balanced batches of indices: each batch cycles through the labels evenly.

    Minority classes (TREC ABBR has 86 of 5,452 rows) are drawn with replacement; the order is fixed by the seed.
    """

    def __init__(self, labels: list[int], batch_size: int, seed: int):
        self.by_label: dict[int, list[int]] = {}
        for i, label in enumerate(labels):
            self.by_label.setdefault(label, []).append(i)
        self.classes = sorted(self.by_label)
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._queues: dict[int, list[int]] = {c: [] for c in self.classes}
        self._class_cursor = 0

    def _next_of(self, label: int) -> int:
        queue = self._queues[label]
        if not queue:
            pool = self.by_label[label]
            queue.extend(pool[j] for j in torch.randperm(len(pool), generator=self.generator).tolist())
        return queue.pop()

    def next_batch(self) -> list[int]:
        batch = []
        for _ in range(self.batch_size):
            label = self.classes[self._class_cursor % len(self.classes)]
            self._class_cursor += 1
            batch.append(self._next_of(label))
        perm = torch.randperm(len(batch), generator=self.generator).tolist()
        return [batch[j] for j in perm]
