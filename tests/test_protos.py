"""The committed stubs are exactly what `make protos` generates from protos/telepathy/v1/*.proto."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "generate_protos.py"
_spec = importlib.util.spec_from_file_location("generate_protos", _SCRIPT)
generate_protos = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate_protos)
stale_files = generate_protos.stale_files


def test_generated_stubs_are_current():
    assert stale_files() == [], "run `make protos` and commit the result"


def test_contract_shape():
    from telepathy.protos.v1 import common_pb2, receiver_pb2, sender_pb2

    receiver = receiver_pb2.DESCRIPTOR.services_by_name["Receiver"]
    assert [m.name for m in receiver.methods] == ["Classify", "ClassifyStream", "ClassifyText", "ListBridges", "Info"]
    stream = receiver.methods_by_name["ClassifyStream"]
    assert stream.client_streaming and stream.server_streaming
    sender = sender_pb2.DESCRIPTOR.services_by_name["Sender"]
    assert {m.name for m in sender.methods} >= {"Relay", "Encode", "Generate", "Info"}
    assert receiver_pb2.DESCRIPTOR.package == "telepathy.v1"
    assert common_pb2.DType.Name(4) == "DTYPE_INT8"
