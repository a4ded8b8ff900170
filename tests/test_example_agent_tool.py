"""examples/langchain_tools.py: its LangChain tools against real services on loopback (tiny random pair), invoked the
way the framework invokes them (tool.invoke with a dict). Offline: no LLM, LangChain only for its tool interface."""

from __future__ import annotations

import importlib.util
import math
import sys

import grpc
import pytest
from langchain_core.tools import BaseTool  # the dev extra installs langchain-core
from services_support import ROOT, TIMEOUT, start_receiver, start_sender

from telepathy.bridge.tasks import TASKS
from telepathy.client import ClientSettings, SenderClient


def _example():
    spec = importlib.util.spec_from_file_location("langchain_tools_example", ROOT / "examples" / "langchain_tools.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the args schemas' annotations in the module's namespace
    spec.loader.exec_module(module)
    return module


EX = _example()


@pytest.fixture(scope="module")
def tools(tiny_bridges_dir):
    receiver = start_receiver(tiny_bridges_dir)
    sender = start_sender(tiny_bridges_dir, receiver.address)
    try:
        with SenderClient(sender.address, ClientSettings(timeout_s=TIMEOUT)) as client:
            yield {t.name: t for t in EX.build_tools(client)}
    finally:
        sender.stop()
        receiver.stop()


def test_tools_name_description_and_args_schema(tools):
    assert set(tools) == {"telepathy_classify", "telepathy_list_tasks"}
    classify, list_tasks = tools["telepathy_classify"], tools["telepathy_list_tasks"]
    assert all(isinstance(t, BaseTool) for t in tools.values())
    assert classify.description.startswith("Classify a text for a task with the Telepathy receiver LLM")
    assert list_tasks.description.startswith("List the tasks Telepathy classifies")
    schema = classify.tool_call_schema.model_json_schema()
    assert set(schema["properties"]) == {"text", "task", "path"}
    assert set(schema["required"]) == {"text", "task"}
    assert schema["properties"]["path"]["enum"] == ["bridge", "text"]
    assert schema["properties"]["path"]["default"] == "bridge"
    assert all(schema["properties"][k]["description"] for k in ("text", "task", "path"))
    assert list_tasks.tool_call_schema.model_json_schema().get("properties", {}) == {}


def test_list_tasks_tool_names_every_task_with_labels(tools):
    listed = tools["telepathy_list_tasks"].invoke({})
    by_name = {t["name"]: t for t in listed}
    assert set(TASKS) <= set(by_name)
    for name in TASKS:  # the tiny bridges carry every built-in task
        assert by_name[name]["bridge"] is True
        assert by_name[name]["labels"] == list(TASKS[name].labels)


@pytest.mark.parametrize("path", ["bridge", "text"])
def test_classify_tool_returns_label_and_scores(tools, path):
    task = next(iter(TASKS))
    out = tools["telepathy_classify"].invoke({"text": "the striker scored twice", "task": task, "path": path})
    labels = list(TASKS[task].labels)
    assert out["task"] == task and out["path"] == path
    assert out["label"] in labels
    assert list(out["scores"]) == labels
    assert math.isclose(sum(out["scores"].values()), 1.0, abs_tol=1e-4)
    assert out["label"] == max(out["scores"], key=out["scores"].get)


def test_classify_tool_path_defaults_to_bridge(tools):
    out = tools["telepathy_classify"].invoke({"text": "a fine film", "task": next(iter(TASKS))})
    assert out["path"] == "bridge"


def test_unknown_task_is_the_documented_message(tools):
    out = tools["telepathy_classify"].invoke({"text": "a fine film", "task": "no_such_task"})
    assert out == "unknown task 'no_such_task': call telepathy_list_tasks for the tasks this service classifies"
    assert out == EX.UNKNOWN_TASK.format(task="no_such_task")


def test_other_errors_raise(tools):
    with pytest.raises(grpc.RpcError) as info:  # an empty text is INVALID_ARGUMENT, not a tool message
        tools["telepathy_classify"].invoke({"text": "", "task": next(iter(TASKS))})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
