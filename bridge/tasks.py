"""Classification tasks as data: a task is a file (YAML or JSON) beside its data (docs/TASKS.md).

A TaskSpec is what every path reads (bridge, text relay, zero-shot, few-shot), so that the comparison between them
is fair: the label names in index order, the verbalizers the receiver scores, the primer it reads before the soft
tokens and the prompts of the baselines. A Task is a spec plus its data files (TaskData) and the file it came from.

    task = resolve_task("sst2")                 # a built-in name, or the path of a task file: what --task accepts
    task = load_task_file("tasks/urgency.yaml")
    task.spec.labels, task.data_file("train")

The built-in tasks are such files, shipped in the package (bridge/builtin_tasks/<name>.yaml); their relative data
paths resolve under data_root()/<name>, a user file's beside the file. A TaskCatalog is an immutable name → spec
map: the built-ins plus the specs that loaded bridges carry; the engines read their specs from one.

Every problem with a task file is a TaskFileError whose message names the file, the field and the problem. Torch-
free (the CLI parser imports this module); the data itself is read by bridge.training.data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin_tasks"
TASK_FILE_SUFFIXES = (".yaml", ".yml", ".json")
DATA_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv"}  # data file suffix → its `datasets` loader
SPLITS = ("train", "validation", "test")
MAX_NAME_CHARS = 64  # a task name names folders (bridge/bridges/<pair>/<task>) and bridge ids (<task>-<fingerprint>)
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def data_root() -> Path:
    """`TELEPATHY_DATA_DIR`, else the `data/` folder of the source checkout (or image): the built-ins' data."""
    env = os.environ.get("TELEPATHY_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "data"


# --------------------------------------------------------------------------------------------- errors


class TaskFileError(ValueError):
    """A task file, or the data it names, that cannot be used. One line per problem: file, field, problem."""

    def __init__(self, path: str | Path, field: str, problem: str, more: Iterable[tuple[str, str]] = ()):
        self.path = Path(path)
        self.problems = [(field, problem), *more]
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(f"task file {self.path}: {f'{field}: ' if field else ''}{problem}"
                         for field, problem in self.problems)


class UnknownTaskError(KeyError):
    def __init__(self, task: str, known: Iterable[str] | None = None, hint: str = ""):
        super().__init__(task)
        self.task = task
        self.known = sorted(BUILTIN_TASKS if known is None else known)
        self.hint = hint

    def __str__(self) -> str:
        return f"unknown task {self.task!r}; known tasks: {', '.join(self.known)}{f' ({self.hint})' if self.hint else ''}"


class TaskConflictError(ValueError):
    """Two specs under one task name (a bridge's and a built-in's, or two bridges'): which one is meant is unclear."""


def validation_problems(exc: ValidationError) -> list[tuple[str, str]]:
    """pydantic's errors → (field, problem) pairs in the words of a task file: `labels[2]`, `data.train`."""
    out = []
    for error in exc.errors(include_url=False):
        field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"]).lstrip(".")
        kind, value = error["type"], error.get("input")
        in_data = error["loc"][:1] == ("data",) and len(error["loc"]) > 1
        if kind == "missing":
            problem = "missing (" + (f"the data block needs {DATA_FIELDS[0]}; the others are optional" if in_data
                                     else "a task file needs " + ", ".join(TASK_FILE_FIELDS)) + ")"
        elif kind == "extra_forbidden":
            problem = "not a field of " + ("the data block" if in_data else "a task file") + " (its fields: " \
                      + ", ".join(DATA_FIELDS if in_data else TASK_FILE_FIELDS) + ")"
        elif kind == "string_type":
            problem = f"must be a string, got {value!r}"
        elif kind in ("tuple_type", "list_type"):
            problem = f"must be a list, got {value!r}"
        elif kind in ("model_type", "model_attributes_type", "dict_type"):
            problem = f"must be a mapping, got {value!r}"
        else:
            problem = str(error["msg"]).removeprefix("Value error, ")
        out.append((field, problem))
    return out


def _quoted(names: Iterable[str]) -> str:
    items = [repr(n) for n in names]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# --------------------------------------------------------------------------------------------- the spec


class TaskSpec(BaseModel):
    """Everything the models read about a task; a bridge folder carries one (bridge.checkpoint)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    labels: tuple[str, ...]  # label names in index order
    verbalizers: tuple[str, ...]  # words the receiver scores, one per label; their first tokens must differ
    primer: str  # what the receiver reads before the soft tokens, e.g. "Topic:"
    instruction: str  # zero-shot / text-path instruction listing the options
    input_name: str  # "Article", "Question", "Review"
    answer_prefix: str  # text right before the label word in prompts, e.g. "Topic:"
    relay_instruction: str  # task-aware instruction for the sender's relay text

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not name or len(name) > MAX_NAME_CHARS or not set(name) <= _NAME_CHARS or not name[0].isalnum():
            raise ValueError(f"{name!r} is not a task name: 1–{MAX_NAME_CHARS} letters, digits, '_', '.' or '-', "
                             "beginning with a letter or a digit (it names folders and bridge ids)")
        return name

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: tuple[str, ...]) -> tuple[str, ...]:
        if not labels:
            raise ValueError("the list of labels is empty; a task needs at least two")
        if len(labels) < 2:
            raise ValueError(f"only one label ({labels[0]!r}); a task needs at least two")
        if any(not label.strip() for label in labels):
            raise ValueError(f"label {next(i for i, x in enumerate(labels) if not x.strip())} is empty")
        repeated = sorted({label for label in labels if labels.count(label) > 1}, key=labels.index)
        if repeated:
            raise ValueError(f"duplicate label{'s' if len(repeated) > 1 else ''} {_quoted(repeated)}; "
                             "each label must appear once")
        return labels

    @field_validator("verbalizers")
    @classmethod
    def _verbalizers(cls, verbalizers: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        labels = info.data.get("labels")  # absent when the labels themselves were invalid
        if labels is not None and len(verbalizers) != len(labels):
            raise ValueError(f"{len(verbalizers)} verbalizers for {len(labels)} labels; give one per label, in the "
                             "order of `labels`")
        for i, verbalizer in enumerate(verbalizers):
            if not verbalizer.strip():
                raise ValueError(f"verbalizer {i} is empty")
        return verbalizers

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.model_dump().items()}

    def differences(self, other: TaskSpec) -> list[str]:
        """The fields in which `other` differs from this spec."""
        return [f for f in type(self).model_fields if getattr(self, f) != getattr(other, f)]

    def verbalizer_problem(self, tokenizer, model: str) -> str | None:
        """Why the receiver could not tell the labels apart with `tokenizer` (a Hugging Face tokenizer), or None.

        The receiver scores the first token of each verbalizer only, so those first tokens must differ."""
        by_token: dict[int, list[str]] = {}
        for label, verbalizer in zip(self.labels, self.verbalizers):
            ids = tokenizer(verbalizer, add_special_tokens=False)["input_ids"]
            if not ids:
                return f"the verbalizer {verbalizer!r} of label {label!r} is no token at all for {model}'s tokenizer"
            by_token.setdefault(ids[0], []).append(label)
        clashes = [(tokenizer.convert_ids_to_tokens(token), labels) for token, labels in by_token.items()
                   if len(labels) > 1]
        if not clashes:
            return None
        said = "; ".join(f"labels {_quoted(labels)} begin with the same token {piece!r}" for piece, labels in clashes)
        return (f"{said} for {model}'s tokenizer; the receiver scores only the first token of each verbalizer, so it "
                "could not tell them apart: choose verbalizers whose first tokens differ")

    # ---- prompts ----------------------------------------------------------------------------------------------
    def text_prompt(self, text: str) -> str:
        """Prompt a model reads to classify `text` directly (zero-shot, and the text path's receiver)."""
        return f"{self.instruction}\n{self.input_name}: {text}\n{self.answer_prefix}"

    def few_shot_prompt(self, shots: list[tuple[str, int]], text: str) -> str:
        demos = "".join(
            f"{self.input_name}: {shot_text}\n{self.answer_prefix}{self.verbalizers[label]}\n\n" for shot_text, label in shots
        )
        return f"{self.instruction}\n\n{demos}{self.input_name}: {text}\n{self.answer_prefix}"

    def relay_message(self, text: str) -> str:
        """User message for the sender when it writes the relay text (chat template applied by the model)."""
        return f"{self.relay_instruction}\n{self.input_name}: {text}"

    def relay_prompt_for_receiver(self, relay_text: str) -> str:
        """The receiver on the text path sees only the sender's relay text, never the original input."""
        return f"{self.instruction}\nSummary: {relay_text.strip()}\n{self.answer_prefix}"


# --------------------------------------------------------------------------------------------- task files


class TaskData(BaseModel):
    """The `data` block of a task file: a file per split (JSONL or CSV) and the columns to read."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    train: str  # bridges learn from it; their model-selection rows are carved from it too
    validation: str | None = None  # an extra evaluation split (`telepathy eval --splits validation`)
    test: str | None = None
    text_field: str = "text"
    label_field: str = "label"  # a label name of `labels`, or its index

    @field_validator("train", "validation", "test")
    @classmethod
    def _format(cls, path: str | None) -> str | None:
        if path is not None and Path(path).suffix.lower() not in DATA_FORMATS:
            raise ValueError(f"{path!r} is not a data file this reads: JSON Lines (.jsonl, .json) or CSV (.csv)")
        return path

    @field_validator("text_field", "label_field")
    @classmethod
    def _column(cls, name: str) -> str:
        if not name.strip():
            raise ValueError("the column name is empty")
        return name


class _TaskFile(TaskSpec):
    """A task file's fields: the spec and its data."""

    data: TaskData


TASK_FILE_FIELDS = tuple(_TaskFile.model_fields)
DATA_FIELDS = tuple(TaskData.model_fields)


@dataclass(frozen=True)
class Task:
    """A task spec, its data files and the task file they came from."""

    spec: TaskSpec
    data: TaskData
    source: Path  # the task file
    data_dir: Path | None = None  # where relative data paths resolve; None: data_root()/<name>, read at use

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def builtin(self) -> bool:
        return self.data_dir is None

    @property
    def reference(self) -> str:
        """What --task takes to get this task back from any folder: a built-in's name, else the task file's absolute
        path."""
        return self.name if self.builtin else str(self.source.resolve())

    def splits(self) -> tuple[str, ...]:
        return tuple(s for s in SPLITS if getattr(self.data, s) is not None)

    def data_file(self, split: str) -> Path:
        """The file of `split`; TaskFileError when the task has no such split."""
        if split not in SPLITS:
            raise TaskFileError(self.source, "data", f"no split {split!r}: a task's splits are {', '.join(SPLITS)}")
        relative = getattr(self.data, split)
        if relative is None:
            raise TaskFileError(self.source, f"data.{split}", f"not set, so task {self.name!r} has no {split} split "
                                                              f"(its splits: {', '.join(self.splits())})")
        base = data_root() / self.name if self.data_dir is None else self.data_dir
        return base / relative

    def check_verbalizers(self, tokenizer, model: str) -> None:
        """TaskFileError naming the colliding labels when `tokenizer` gives two verbalizers the same first token."""
        problem = self.spec.verbalizer_problem(tokenizer, model)
        if problem:
            raise TaskFileError(self.source, "verbalizers", problem)


def _read_task_file(path: Path, data_dir: Path | None) -> Task:
    if path.suffix.lower() not in TASK_FILE_SUFFIXES:
        raise TaskFileError(path, "", f"a task file is YAML (.yaml, .yml) or JSON (.json), not {path.suffix or 'a file without a suffix'!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TaskFileError(path, "", "cannot read it: no such file") from None
    except UnicodeDecodeError:
        raise TaskFileError(path, "", "cannot read it: not UTF-8 text") from None
    except OSError as exc:
        raise TaskFileError(path, "", f"cannot read it: {exc.strerror or exc}") from None
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            raw = yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise TaskFileError(path, "", f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise TaskFileError(path, "", f"not valid YAML: {getattr(exc, 'problem', None) or exc}{where}") from None
    if not isinstance(raw, dict):
        raise TaskFileError(path, "", f"must be a mapping of the fields {', '.join(TASK_FILE_FIELDS)}; "
                                      f"got {type(raw).__name__ if raw is not None else 'an empty file'}")
    try:
        parsed = _TaskFile.model_validate(raw)
    except ValidationError as exc:
        (field, problem), *more = validation_problems(exc)
        raise TaskFileError(path, field, problem, more) from None
    spec = TaskSpec.model_validate(parsed.model_dump(exclude={"data"}))
    return Task(spec=spec, data=parsed.data, source=path, data_dir=data_dir)


def _load_builtins() -> Mapping[str, Task]:
    tasks = {}
    for path in sorted(BUILTIN_DIR.glob("*.yaml")):
        task = _read_task_file(path, data_dir=None)
        if task.name != path.stem:
            raise TaskFileError(path, "name", f"{task.name!r} differs from the file's name; a built-in task file is "
                                              "named after its task")
        tasks[task.name] = task
    return MappingProxyType(tasks)


# Read once, never changed: the built-in tasks, by name (file-name order).
BUILTINS: Mapping[str, Task] = _load_builtins()
BUILTIN_TASKS: Mapping[str, TaskSpec] = MappingProxyType({name: t.spec for name, t in BUILTINS.items()})
TASKS = BUILTIN_TASKS  # the built-ins only; a service's tasks are its BridgeSet's catalog (bridge.runtime.engine)


def load_task_file(path: str | Path) -> Task:
    """A task file (YAML or JSON); its relative data paths resolve beside it. TaskFileError for any problem.

    A file whose task has a built-in's name must have the built-in's spec: two tasks under one name would make
    bridges and requests ambiguous."""
    path = Path(path)
    builtin = next((t for t in BUILTINS.values() if path.resolve() == t.source), None)
    if builtin is not None:
        return builtin
    task = _read_task_file(path, data_dir=path.resolve().parent)
    same_name = BUILTINS.get(task.name)
    if same_name is not None and same_name.spec != task.spec:
        raise TaskFileError(path, "name", f"{task.name!r} is the name of a built-in task ({same_name.source}), which "
                                          f"differs in {', '.join(same_name.spec.differences(task.spec))}; give "
                                          "this task another name")
    return task


def resolve_task(name_or_path: str | Path) -> Task:
    """What --task accepts: a built-in task's name, or the path of a task file."""
    key = str(name_or_path)
    if key in BUILTINS:
        return BUILTINS[key]
    path = Path(key)
    if path.suffix.lower() in TASK_FILE_SUFFIXES or os.sep in key or "/" in key or path.exists():
        return load_task_file(path)
    raise UnknownTaskError(key, hint="or the path of a task file: .yaml, .yml or .json")


def get_task(name: str) -> TaskSpec:
    """A built-in task's spec; UnknownTaskError for any other name."""
    try:
        return BUILTIN_TASKS[name]
    except KeyError:
        raise UnknownTaskError(name) from None


# --------------------------------------------------------------------------------------------- catalogs


class TaskCatalog(Mapping[str, TaskSpec]):
    """The task specs one process knows, by name, immutable: the built-ins, then the ones given (each with where it
    comes from, e.g. the tasks of the bridges it loaded). A name with two different specs is a TaskConflictError
    naming both origins; an unknown name is an UnknownTaskError listing the known ones."""

    def __init__(self, specs: Iterable[tuple[TaskSpec, str]] = ()):
        self._specs: dict[str, TaskSpec] = dict(BUILTIN_TASKS)
        self._origins: dict[str, str] = {name: f"the built-in task file {t.source}" for name, t in BUILTINS.items()}
        for spec, origin in specs:
            known = self._specs.get(spec.name)
            if known is not None and known != spec:
                raise TaskConflictError(
                    f"task {spec.name!r} of {origin} differs from the task of that name of {self._origins[spec.name]} "
                    f"in {', '.join(known.differences(spec))}; rename one of them")
            self._specs.setdefault(spec.name, spec)
            self._origins.setdefault(spec.name, origin)

    def __getitem__(self, name: str) -> TaskSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise UnknownTaskError(name, self._specs) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def origin(self, name: str) -> str:
        """Where the spec of `name` comes from (a built-in task file, a bridge folder, …)."""
        self[name]  # UnknownTaskError for an unknown name
        return self._origins[name]

    def first(self) -> str:
        """The first task's name (the built-ins come first): a default where any task will do, e.g. warm-up."""
        return next(iter(self._specs))
