"""Task data: the split files a task file names (JSON Lines or CSV), read through `datasets` from local files only.

The built-in tasks' data (AG News, TREC-6, SST-2; provenance in data/README.md) lies under data_root()/<task>.
"""

from __future__ import annotations

import contextlib
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from telepathy.bridge.tasks import DATA_FORMATS, Task, TaskFileError, data_root, resolve_task

__all__ = ["Example", "data_root", "load_split", "train_validation_split", "BalancedSampler"]


@dataclass(frozen=True)
class Example:
    text: str
    label: int


@contextlib.contextmanager
def _quiet_datasets():
    """`datasets` draws a progress bar per file read; these files are small and read often (eval, tests)."""
    import datasets

    was_enabled = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _read_rows(path: Path) -> tuple[list[str], dict[str, list]]:
    """(column names, columns) of one JSONL / CSV file, read by `datasets` from the local file."""
    import datasets

    loader = DATA_FORMATS[path.suffix.lower()]
    # CSV cells stay as written: without na_filter, pandas would turn texts such as "NA" or "null" into NaN.
    options = {"keep_default_na": False, "na_filter": False} if loader == "csv" else {}
    # A throw-away cache: the rows are kept in memory, and nothing is left in the user's Hugging Face cache.
    with tempfile.TemporaryDirectory(prefix="telepathy-data-") as cache, _quiet_datasets():
        table = datasets.load_dataset(loader, data_files=str(path), split="train", cache_dir=cache,
                                      keep_in_memory=True, **options)
        return list(table.column_names), table.to_dict()


def _has_rows(path: Path) -> bool:
    """Whether the file holds a row: a non-blank line (JSON Lines), or one after the header (CSV)."""
    needed = 2 if DATA_FORMATS[path.suffix.lower()] == "csv" else 1
    with path.open("rb") as f:
        for line in f:
            needed -= bool(line.strip())
            if needed == 0:
                return True
    return False


def _label_index(value, labels: tuple[str, ...]) -> int | str:
    """A data row's label (a name of `labels`, or its index) → the index; a string saying what is wrong otherwise."""
    if isinstance(value, bool) or value is None:
        return "has no label" if value is None else f"label {value!r} is neither a label name nor an index"
    if isinstance(value, int):
        if 0 <= value < len(labels):
            return value
        return f"label index {value} is out of range for {len(labels)} labels (0–{len(labels) - 1})"
    if isinstance(value, str) and value in labels:
        return labels.index(value)
    return f"label {value!r} is not one of the labels ({', '.join(labels)})"


def load_split(task: Task | str, split: str, limit: int | None = None) -> list[Example]:
    """The rows of one split of `task` (a Task, a built-in name or a task file path) in file order; `limit` keeps
    the first rows. TaskFileError naming the task file, the split's field and the problem for bad data."""
    task = task if isinstance(task, Task) else resolve_task(task)
    path = task.data_file(split)
    field = f"data.{split}"
    if not path.is_file():
        raise TaskFileError(task.source, field, f"{path} does not exist")
    if not _has_rows(path):  # `datasets` would only say 'Instruction "train" corresponds to no data!'
        raise TaskFileError(task.source, field, f"{path} has no rows")
    try:
        columns, table = _read_rows(path)
    except Exception as exc:  # noqa: BLE001 - datasets / pyarrow / pandas raise many types for a malformed file
        kind = "CSV" if DATA_FORMATS[path.suffix.lower()] == "csv" else "JSON Lines"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TaskFileError(task.source, field, f"cannot read {path} as {kind}: {reason}") from None
    text_field, label_field = task.data.text_field, task.data.label_field
    for role, name in (("text_field", text_field), ("label_field", label_field)):
        if name not in table:
            raise TaskFileError(task.source, field, f"{path} has no column {name!r} (data.{role}); its columns: "
                                                    f"{', '.join(columns) or 'none'}")
    texts, values = table[text_field], table[label_field]
    if not texts:
        raise TaskFileError(task.source, field, f"{path} has no rows")
    rows: list[Example] = []
    for i, (text, value) in enumerate(zip(texts, values)):
        if limit is not None and len(rows) >= limit:
            break
        label = _label_index(value, task.spec.labels)
        if isinstance(label, str):
            raise TaskFileError(task.source, field, f"{path} row {i + 1}: {label}")
        if not isinstance(text, str):
            raise TaskFileError(task.source, field, f"{path} row {i + 1}: the text ({text_field!r}) must be a string, "
                                                    f"got {text!r}")
        rows.append(Example(text, label))
    return rows


def train_validation_split(task: Task | str, validation_size: int = 500,
                           seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Carve a validation split out of train (never tune on test). Same seed → same split."""
    task = task if isinstance(task, Task) else resolve_task(task)
    rows = load_split(task, "train")
    if validation_size >= len(rows):
        raise TaskFileError(task.source, "data.train", f"{len(rows)} rows; a validation split of {validation_size} "
                                                       "rows carved from them leaves none to train on: ask for at "
                                                       f"most {len(rows) - 1} (--validation-size)")
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
