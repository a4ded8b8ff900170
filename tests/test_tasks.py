"""Task files: the built-ins are files, a task file loads with its data, and every bad file is one exact message
that names the file, the field and the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from telepathy.bridge.tasks import (
    BUILTIN_DIR,
    BUILTIN_TASKS,
    BUILTINS,
    TASKS,
    TaskCatalog,
    TaskConflictError,
    TaskFileError,
    UnknownTaskError,
    get_task,
    load_task_file,
    resolve_task,
)
from telepathy.bridge.training.data import load_split, train_validation_split

SPEC = {
    "name": "urgency",
    "labels": ["low", "high"],
    "verbalizers": [" low", " high"],
    "primer": "Urgency:",
    "instruction": "Classify how urgent the message is as low or high.",
    "input_name": "Message",
    "answer_prefix": "Urgency:",
    "relay_instruction": "In one short sentence, say what this message asks for and whether it is urgent.",
}
ROWS = [("the server is down", "high"), ("thanks for the notes", "low"), ("fire in the building", "high"),
        ("see you next week", "low")]


def write_task(folder: Path, data=None, file_name: str = "task.yaml", **fields) -> Path:
    """A task file (YAML, or JSON for a .json name) with SPEC's fields, `fields` over them, and a train.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in ROWS))
    doc = {**SPEC, "data": data or {"train": "train.jsonl"}, **fields}
    path = folder / file_name
    path.write_text(json.dumps(doc) if file_name.endswith(".json") else yaml.safe_dump(doc, sort_keys=False))
    return path


def error_of(path: Path, split: str | None = None) -> str:
    with pytest.raises(TaskFileError) as err:
        task = load_task_file(path)
        if split:
            load_split(task, split)
    return str(err.value)


# --------------------------------------------------------------------------------------------- built-ins


def test_builtins_are_the_shipped_task_files():
    assert list(BUILTINS) == ["ag_news", "sst2", "trec"] == sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))
    assert TASKS is BUILTIN_TASKS and get_task("trec") is BUILTINS["trec"].spec
    trec = get_task("trec")
    assert trec.labels == ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM") and trec.primer == "Answer type:"
    assert trec.verbalizers[3] == " human" and trec.input_name == "Question"
    assert BUILTINS["sst2"].splits() == ("train", "validation", "test") and BUILTINS["trec"].splits() == ("train", "test")
    with pytest.raises(TypeError):
        TASKS["mine"] = trec  # the built-in catalog is read-only: no global mutable state


def test_builtin_data_lives_under_the_data_root(monkeypatch, tmp_path):
    """A built-in's data paths resolve under $TELEPATHY_DATA_DIR/<name> when the data is read, not at import."""
    assert BUILTINS["sst2"].data_file("test") == Path(__file__).resolve().parent.parent / "data" / "sst2" / "test.jsonl"
    monkeypatch.setenv("TELEPATHY_DATA_DIR", str(tmp_path))
    assert BUILTINS["sst2"].data_file("test") == tmp_path / "sst2" / "test.jsonl"
    (tmp_path / "trec").mkdir()
    (tmp_path / "trec" / "test.jsonl").write_text('{"text": "Who was Galileo ?", "label": "HUM"}\n'
                                                  '{"text": "How far is it ?", "label": 5}\n')
    assert [(r.text, r.label) for r in load_split("trec", "test")] == [("Who was Galileo ?", 3), ("How far is it ?", 5)]


def test_resolve_task_takes_a_name_or_a_path(tmp_path, monkeypatch):
    assert resolve_task("sst2") is BUILTINS["sst2"]
    assert resolve_task(str(BUILTINS["sst2"].source)) is BUILTINS["sst2"]  # a built-in's file is the built-in
    path = write_task(tmp_path / "u")
    task = resolve_task(str(path))
    assert task.spec.labels == ("low", "high") and task.data_file("train") == tmp_path / "u" / "train.jsonl"
    assert task.reference == str(path.resolve()) and not task.builtin and BUILTINS["sst2"].reference == "sst2"
    monkeypatch.chdir(tmp_path)
    assert resolve_task("u/task.yaml").spec == task.spec  # relative to the working folder
    with pytest.raises(UnknownTaskError) as err:
        resolve_task("urgency")
    assert str(err.value) == ("unknown task 'urgency'; known tasks: ag_news, sst2, trec "
                              "(or the path of a task file: .yaml, .yml or .json)")
    with pytest.raises(UnknownTaskError):
        get_task("urgency")  # get_task: the built-ins only, as the services expect


def test_a_task_file_loads_with_its_data(tmp_path):
    """JSONL with label names, CSV with indices (and a text "NA" that stays a string), custom columns."""
    folder = tmp_path / "u"
    path = write_task(folder, data={"train": "train.jsonl", "test": "test.csv", "validation": "dev.jsonl",
                                    "text_field": "message", "label_field": "urgency"}, file_name="task.json")
    (folder / "train.jsonl").write_text("".join(json.dumps({"message": t, "urgency": y}) + "\n" for t, y in ROWS))
    (folder / "test.csv").write_text('message,urgency\nNA,1\n"calm, no rush",0\n')
    (folder / "dev.jsonl").write_text('{"message": "ok", "urgency": 0, "extra": true}\n')
    task = load_task_file(path)
    assert [(r.text, r.label) for r in load_split(task, "train")] == [(t, ["low", "high"].index(y)) for t, y in ROWS]
    assert [(r.text, r.label) for r in load_split(task, "test")] == [("NA", 1), ("calm, no rush", 0)]
    assert len(load_split(task, "test", limit=1)) == 1 and load_split(task, "validation")[0].label == 0
    train, validation = train_validation_split(task, validation_size=1)
    assert len(train) == 3 and len(validation) == 1


# --------------------------------------------------------------------------------------------- bad task files


def test_missing_field(tmp_path):
    path = write_task(tmp_path)
    doc = yaml.safe_load(path.read_text())
    del doc["primer"]
    path.write_text(yaml.safe_dump(doc))
    assert error_of(path) == (f"task file {path}: primer: missing (a task file needs name, labels, verbalizers, "
                              "primer, instruction, input_name, answer_prefix, relay_instruction, data)")


def test_empty_label_list(tmp_path):
    path = write_task(tmp_path, labels=[], verbalizers=[])
    assert error_of(path) == f"task file {path}: labels: the list of labels is empty; a task needs at least two"


def test_duplicate_labels(tmp_path):
    path = write_task(tmp_path, labels=["low", "high", "low"], verbalizers=[" low", " high", " lo"])
    assert error_of(path) == f"task file {path}: labels: duplicate label 'low'; each label must appear once"


def test_one_verbalizer_per_label(tmp_path):
    path = write_task(tmp_path, verbalizers=[" low"])
    assert error_of(path) == (f"task file {path}: verbalizers: 1 verbalizers for 2 labels; give one per label, in the "
                              "order of `labels`")


def test_colliding_verbalizer_tokens(tmp_path, tiny_receiver):
    """Checked once the receiver's tokenizer is known; the message names the labels that collide."""
    path = write_task(tmp_path, labels=["low", "high", "critical"], verbalizers=[" low", " high", " high now"])
    task = load_task_file(path)  # fine without a tokenizer
    with pytest.raises(TaskFileError) as err:
        task.check_verbalizers(tiny_receiver.tokenizer, tiny_receiver.spec)
    assert str(err.value) == (
        f"task file {path}: verbalizers: labels 'high' and 'critical' begin with the same token 'high' for "
        "random:tiny-gemma's tokenizer; the receiver scores only the first token of each verbalizer, so it could "
        "not tell them apart: choose verbalizers whose first tokens differ")
    load_task_file(write_task(tmp_path / "ok")).check_verbalizers(tiny_receiver.tokenizer, tiny_receiver.spec)


def test_a_label_in_the_data_that_is_not_a_label(tmp_path):
    path = write_task(tmp_path)
    with (tmp_path / "train.jsonl").open("a") as f:
        f.write('{"text": "reply by friday", "label": "urgent"}\n')
    assert error_of(path, "train") == (f"task file {path}: data.train: {tmp_path / 'train.jsonl'} row 5: label "
                                       "'urgent' is not one of the labels (low, high)")


def test_a_label_index_out_of_range(tmp_path):
    path = write_task(tmp_path, data={"train": "train.jsonl", "test": "test.csv"})
    (tmp_path / "test.csv").write_text("text,label\nfine,0\nbad,2\n")
    assert error_of(path, "test") == (f"task file {path}: data.test: {tmp_path / 'test.csv'} row 2: label index 2 is "
                                      "out of range for 2 labels (0–1)")


def test_an_empty_split(tmp_path):
    path = write_task(tmp_path, data={"train": "train.jsonl", "test": "test.csv"})
    (tmp_path / "test.csv").write_text("text,label\n")
    assert error_of(path, "test") == f"task file {path}: data.test: {tmp_path / 'test.csv'} has no rows"


def test_a_data_file_that_does_not_exist(tmp_path):
    path = write_task(tmp_path, data={"train": "train.jsonl", "test": "missing.jsonl"})
    assert error_of(path, "test") == f"task file {path}: data.test: {tmp_path / 'missing.jsonl'} does not exist"


def test_a_split_the_task_does_not_have(tmp_path):
    path = write_task(tmp_path)
    assert error_of(path, "test") == (f"task file {path}: data.test: not set, so task 'urgency' has no test split "
                                      "(its splits: train)")


def test_a_missing_column_and_a_malformed_data_file(tmp_path):
    path = write_task(tmp_path, data={"train": "train.jsonl", "label_field": "urgency"})
    assert error_of(path, "train") == (f"task file {path}: data.train: {tmp_path / 'train.jsonl'} has no column "
                                       "'urgency' (data.label_field); its columns: text, label")
    path = write_task(tmp_path)
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": "low"}\n{"text": "b", "label":\n')
    assert error_of(path, "train").startswith(f"task file {path}: data.train: cannot read {tmp_path / 'train.jsonl'} "
                                              "as JSON Lines: ")


def test_too_few_training_rows_for_the_validation_split(tmp_path):
    task = load_task_file(write_task(tmp_path))
    with pytest.raises(TaskFileError) as err:
        train_validation_split(task, validation_size=500)
    assert str(err.value) == (f"task file {task.source}: data.train: 4 rows; a validation split of 500 rows carved "
                              "from them leaves none to train on: ask for at most 3 (--validation-size)")


def test_an_unreadable_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert error_of(missing) == f"task file {missing}: cannot read it: no such file"
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00name")
    assert error_of(binary) == f"task file {binary}: cannot read it: not UTF-8 text"
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    assert error_of(folder) == f"task file {folder}: cannot read it: Is a directory"
    text = tmp_path / "task.txt"
    text.write_text("name: x\n")
    assert error_of(text) == f"task file {text}: a task file is YAML (.yaml, .yml) or JSON (.json), not '.txt'"


def test_malformed_yaml_and_json(tmp_path):
    path = tmp_path / "task.yaml"
    path.write_text("name: urgency\nlabels: [low, high\n")
    assert error_of(path) == (f"task file {path}: not valid YAML: expected ',' or ']', but got '<stream end>' at "
                              "line 3, column 1")
    path = tmp_path / "task.json"
    path.write_text('{"name": "urgency",\n "labels": [low]}')
    assert error_of(path) == f"task file {path}: not valid JSON: Expecting value at line 2, column 13"
    path.write_text('["name", "labels"]')
    assert error_of(path) == (f"task file {path}: must be a mapping of the fields name, labels, verbalizers, primer, "
                              "instruction, input_name, answer_prefix, relay_instruction, data; got list")


def test_wrong_types_unknown_fields_and_bad_names_each_get_a_line(tmp_path):
    path = write_task(tmp_path, file_name="t.yaml", labels=["low", 3], colour="red",
                      data={"train": "train.txt", "tset": "test.jsonl"})
    assert error_of(path).splitlines() == [
        f"task file {path}: labels[1]: must be a string, got 3",
        f"task file {path}: data.train: 'train.txt' is not a data file this reads: JSON Lines (.jsonl, .json) or "
        "CSV (.csv)",
        f"task file {path}: data.tset: not a field of the data block (its fields: train, validation, test, "
        "text_field, label_field)",
        f"task file {path}: colour: not a field of a task file (its fields: name, labels, verbalizers, primer, "
        "instruction, input_name, answer_prefix, relay_instruction, data)",
    ]
    path = write_task(tmp_path, file_name="u.yaml", name="my task")
    assert error_of(path) == (f"task file {path}: name: 'my task' is not a task name: 1–64 letters, digits, '_', '.' "
                              "or '-', beginning with a letter or a digit (it names folders and bridge ids)")


def test_a_built_in_name_with_another_spec(tmp_path):
    path = write_task(tmp_path, name="sst2")
    assert error_of(path) == (f"task file {path}: name: 'sst2' is the name of a built-in task "
                              f"({BUILTINS['sst2'].source}), which differs in labels, verbalizers, primer, "
                              "instruction, input_name, answer_prefix, relay_instruction; give this task another name")


# --------------------------------------------------------------------------------------------- catalogs


def test_catalog_holds_the_builtins_and_the_given_specs(tmp_path):
    mine = load_task_file(write_task(tmp_path)).spec
    catalog = TaskCatalog([(mine, "the bridge runs/urgency")])
    assert list(catalog) == ["ag_news", "sst2", "trec", "urgency"] and catalog["urgency"] is mine
    assert catalog.origin("urgency") == "the bridge runs/urgency" and catalog.first() == "ag_news"
    assert TaskCatalog([(mine, "a"), (mine, "b")])["urgency"] is mine  # the same spec twice is no conflict
    with pytest.raises(UnknownTaskError) as err:
        TaskCatalog()["urgency"]  # another catalog knows nothing of it: nothing global was changed
    assert str(err.value) == "unknown task 'urgency'; known tasks: ag_news, sst2, trec"


def test_catalog_conflicts_name_both_origins(tmp_path):
    other = BUILTIN_TASKS["sst2"].model_copy(update={"labels": ("bad", "good")})
    with pytest.raises(TaskConflictError) as err:
        TaskCatalog([(other, "the bridge runs/sst2")])
    assert str(err.value) == (f"task 'sst2' of the bridge runs/sst2 differs from the task of that name of the built-in "
                              f"task file {BUILTINS['sst2'].source} in labels; rename one of them")
    mine = load_task_file(write_task(tmp_path)).spec
    with pytest.raises(TaskConflictError, match="task 'urgency' of the bridge b differs from the task of that name of "
                                                "the bridge a in primer; rename one of them"):
        TaskCatalog([(mine, "the bridge a"), (mine.model_copy(update={"primer": "Priority:"}), "the bridge b")])
