"""Telepathy as LangChain tools: an agent classifies a text for a task, and lists the tasks, through the services.

    pip install telepathy-llm langchain-core       # or, in this repository: pip install -e ".[dev]"
    telepathy up                                   # sender on 127.0.0.1:50051 (its token is read by the SDK)
    python examples/langchain_tools.py "the striker scored twice" --task ag_news
    python examples/langchain_tools.py --sender 10.0.0.5:50051 --path text "What is the capital of Australia ?"

In your own agent:

    from telepathy.client import SenderClient
    sender = SenderClient("127.0.0.1:50051")
    tools = build_tools(sender)                    # [telepathy_classify, telepathy_list_tasks]
    agent = create_agent(model, tools)             # any LangChain / LangGraph agent that takes BaseTools

Only `langchain-core` is needed: the tools are `StructuredTool`s with a pydantic args schema, so any chat model
that calls tools sees their names, descriptions and argument types. `telepathy_classify` relays the text through
the sender to the receiver (Sender.Relay; path "bridge": soft tokens, "text": relay text) and returns
{"task", "label", "scores", "path"}; `telepathy_list_tasks` returns [{"name", "labels", "bridge"}] from Sender.Info.
A task the service does not know is not an exception for the agent: the tool returns UNKNOWN_TASK formatted with
the task (handle_tool_error), so the model can call telepathy_list_tasks and try again. Other gRPC errors raise.
"""

from __future__ import annotations

import argparse
import json
from typing import Literal

import grpc
from langchain_core.tools import StructuredTool, ToolException
from pydantic import BaseModel, Field

from telepathy.client import SenderClient, error_field

CLASSIFY_NAME = "telepathy_classify"
LIST_TASKS_NAME = "telepathy_list_tasks"
UNKNOWN_TASK = "unknown task {task!r}: call telepathy_list_tasks for the tasks this service classifies"


class ClassifyArgs(BaseModel):
    text: str = Field(description="the text to classify")
    task: str = Field(description="the task's name, one of those telepathy_list_tasks returns (e.g. 'ag_news')")
    path: Literal["bridge", "text"] = Field(
        "bridge", description="'bridge': the sender's soft tokens; 'text': the sender writes text for the receiver")


class ListTasksArgs(BaseModel):
    pass


def build_tools(sender: SenderClient) -> list[StructuredTool]:
    """The two tools, calling `sender` (an open SenderClient; the caller closes it)."""

    def classify(text: str, task: str, path: str = "bridge") -> dict:
        try:
            result = sender.relay(text, task=task, path=path)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND and error_field(err) == "task":
                raise ToolException(UNKNOWN_TASK.format(task=task)) from err
            raise
        return {"task": result.task, "label": result.label, "scores": dict(result.scores), "path": path}

    def list_tasks() -> list[dict]:
        return [{"name": t.name, "labels": list(t.labels), "bridge": t.bridge} for t in sender.info().tasks]

    return [
        StructuredTool.from_function(
            func=classify, name=CLASSIFY_NAME, args_schema=ClassifyArgs, handle_tool_error=True,
            description="Classify a text for a task with the Telepathy receiver LLM, through the sender LLM. "
                        "Returns the label and every label's probability (scores)."),
        StructuredTool.from_function(
            func=list_tasks, name=LIST_TASKS_NAME, args_schema=ListTasksArgs,
            description="List the tasks Telepathy classifies: each task's name, its labels, and whether the "
                        "bridge path (soft tokens) is available for it (otherwise use path 'text')."),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("text")
    parser.add_argument("--task", default="ag_news")
    parser.add_argument("--path", choices=["bridge", "text"], default="bridge")
    parser.add_argument("--sender", default="127.0.0.1:50051")
    args = parser.parse_args()
    with SenderClient(args.sender) as sender:
        classify, list_tasks = build_tools(sender)
        print(json.dumps(list_tasks.invoke({}), indent=2))
        print(json.dumps(classify.invoke({"text": args.text, "task": args.task, "path": args.path}), indent=2))


if __name__ == "__main__":
    main()
