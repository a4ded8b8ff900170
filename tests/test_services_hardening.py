"""Hostile input at the edge: huge identifiers, control characters, undecodable protobuf, callers that go away.

Every case checks the exact status and message, that the answer fits gRPC's metadata limits (a status over them
reaches the client as RESOURCE_EXHAUSTED, whatever code the service meant), and that the service still answers.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import time

import grpc
import pytest

from telepathy.bridge.codec import wire_nbytes
from telepathy.contract import MAX_ID_CHARS, MAX_SHAPE_DIMS, SHIPPED_BRIDGES
from telepathy.protos.v1 import receiver_pb2, sender_pb2
from telepathy.serving.errors import MAX_DETAILS_BYTES, ServiceError
from tests.services_support import (
    ROOT,
    TIMEOUT,
    classify_request,
    field_trailer,
    metric,
    receiver_stub,
    relay,
    rpc_error,
    sender_stub,
    soft_tokens_changed,
    soft_tokens_for,
    start_pair,
    start_receiver,
    start_sender,
    wait_for,
)

C = grpc.StatusCode
HUGE = 1_000_000  # characters: far over the limit, well under the 4 MiB message cap
TOO_LONG = f"is {HUGE} characters; the limit is {MAX_ID_CHARS}"
CONTROL = "must not contain control characters (U+0000 to U+001F, U+007F to U+009F); "
UNDECODABLE = "(undecodable protobuf, or a string field that is not valid UTF-8)"
GARBAGE = b"\xff\xff\xff"  # an invalid tag: not a message of any type
BAD_UTF8_FIELD_2 = b"\x12\x02\xff\xfe"  # field 2 (task in every request that has one), a string that is not UTF-8
LONE_SURROGATE_FIELD_3 = b"\x1a\x03\xed\xa0\x80"  # field 3 (text in Relay, Encode, Generate, ClassifyText): U+D800 alone


def _status_tables() -> dict[str, set[str]]:
    """docs/SERVICES.md, "Status codes": RPC (`Sender.Relay`, …; "any" for the table of every RPC) → its codes."""
    section = (ROOT / "docs" / "SERVICES.md").read_text(encoding="utf-8").split("### Status codes", 1)[1]
    tables: dict[str, set[str]] = {}
    for block in section.split("\n## ", 1)[0].split("\n#### ")[1:]:
        heading, _, body = block.partition("\n")
        codes = set(re.findall(r"^\| `([A-Z_]+)` \|", body, flags=re.M))
        for rpc in re.findall(r"`((?:Sender|Receiver|Health)\.[\w.]+)`", heading) or ["any"]:
            tables[rpc] = codes
    return tables


DOCUMENTED = _status_tables()


@pytest.fixture(scope="module")
def pair(tiny_bridges_dir):
    receiver = start_receiver(tiny_bridges_dir, warmup=False)
    sender = start_sender(tiny_bridges_dir, receiver.address, max_relay_tokens=4, warmup=False)
    yield sender, receiver
    sender.stop()
    receiver.stop()


@pytest.fixture(scope="module")
def good(pair):
    return soft_tokens_for(pair[0].address, "a fine film", "sst2")


def _still_works(pair, good) -> None:
    sender, receiver = pair
    assert receiver_stub(receiver.address).Classify(classify_request(good), timeout=TIMEOUT).result.task == "sst2"
    assert sender_stub(sender.address).Relay(relay(), timeout=TIMEOUT).result.task == "sst2"


def _assert_rejected(err: grpc.RpcError, code: grpc.StatusCode, message: str, field: str | None = None,
                     rpc: str = "any") -> None:
    assert (err.code(), err.details()) == (code, message)
    assert code.name in DOCUMENTED[rpc] | DOCUMENTED["any"], f"docs/SERVICES.md: {rpc} does not list {code.name}"
    if field is not None:
        assert field_trailer(err) == field


# ---- A, B: identifiers are bounded and plain; texts carry no NUL -------------------------------------------------
X = "x" * HUGE
SENDER_CASES = {
    "Relay task": ("Relay", relay(task=X), "task", TOO_LONG),
    "Relay text-path task": ("Relay", relay(task=X, path=sender_pb2.PATH_TEXT), "task", TOO_LONG),
    "Relay request_id": ("Relay", relay(request_id=X), "request_id", TOO_LONG),
    "Relay request_id one over": ("Relay", relay(request_id="r" * (MAX_ID_CHARS + 1)), "request_id",
                                  f"is {MAX_ID_CHARS + 1} characters; the limit is {MAX_ID_CHARS}"),
    "Relay task with NUL": ("Relay", relay(task="ss\x00t2"), "task", CONTROL + "found U+0000 at index 2"),
    "Relay request_id with BEL": ("Relay", relay(request_id="id\x07"), "request_id", CONTROL + "found U+0007 at index 2"),
    "Relay request_id with newline": ("Relay", relay(request_id="id\n"), "request_id", CONTROL + "found U+000A at index 2"),
    "Relay task with tab": ("Relay", relay(task="\tsst2"), "task", CONTROL + "found U+0009 at index 0"),
    "Relay task with DEL": ("Relay", relay(task="sst2\x7f"), "task", CONTROL + "found U+007F at index 4"),
    "Relay text-path task with C1": ("Relay", relay(task="sst\x852", path=sender_pb2.PATH_TEXT), "task",
                                     CONTROL + "found U+0085 at index 3"),
    "Relay text with NUL": ("Relay", relay(text="a\x00b"), "text", "must not contain NUL characters (U+0000); found one at index 1"),
    "Encode task": ("Encode", sender_pb2.EncodeRequest(task=X, text="hi"), "task", TOO_LONG),
    "Encode request_id": ("Encode", sender_pb2.EncodeRequest(request_id=X, task="sst2", text="hi"), "request_id", TOO_LONG),
    "Generate task": ("Generate", sender_pb2.GenerateRequest(task=X, text="hi"), "task", TOO_LONG),
    "Generate request_id": ("Generate", sender_pb2.GenerateRequest(request_id=X, task="sst2", text="hi"), "request_id",
                            TOO_LONG),
    "Generate text with NUL": ("Generate", sender_pb2.GenerateRequest(task="sst2", text="\x00"), "text",
                               "must not contain NUL characters (U+0000); found one at index 0"),
}


@pytest.mark.parametrize("case", list(SENDER_CASES))
def test_sender_bounds_identifiers_and_text(pair, good, case):
    method, request, field, message = SENDER_CASES[case]
    err = rpc_error(getattr(sender_stub(pair[0].address), method), request, timeout=TIMEOUT)
    _assert_rejected(err, C.INVALID_ARGUMENT, f"{field}: {message}", field, f"Sender.{method}")
    _still_works(pair, good)


def test_identifiers_at_the_limit_and_texts_with_other_controls_are_accepted(pair, good):
    request_id = "é" + "i" * (MAX_ID_CHARS - 1)
    text = "tab\there, new\nline, an escape \x1b[1m and a bell \x07, DEL \x7f and NEL \x85"  # as the gateway
    assert sender_stub(pair[0].address).Relay(relay(text=text), timeout=TIMEOUT).result.task == "sst2"
    answer = sender_stub(pair[0].address).Relay(relay(request_id=request_id), timeout=TIMEOUT)
    assert answer.result.request_id == request_id
    st = soft_tokens_changed(good, request_id=request_id)
    assert receiver_stub(pair[1].address).Classify(classify_request(st), timeout=TIMEOUT).result.request_id == request_id


RECEIVER_CASES = {
    "task": (dict(task=X), TOO_LONG),
    "request_id": (dict(request_id=X), TOO_LONG),
    "bridge_id": (dict(bridge_id=X), TOO_LONG),
    "bridge_fingerprint": (dict(bridge_fingerprint=X), TOO_LONG),
    "bridge_id with ESC": (dict(bridge_id="sst2-\x1b"), CONTROL + "found U+001B at index 5"),
    "bridge_fingerprint with CR": (dict(bridge_fingerprint="\r"), CONTROL + "found U+000D at index 0"),
}


@pytest.mark.parametrize("case", list(RECEIVER_CASES))
def test_classify_bounds_identifiers(pair, good, case):
    changes, message = RECEIVER_CASES[case]
    field = f"soft_tokens.{next(iter(changes))}"
    err = rpc_error(receiver_stub(pair[1].address).Classify, classify_request(soft_tokens_changed(good, **changes)), timeout=TIMEOUT)
    _assert_rejected(err, C.INVALID_ARGUMENT, f"{field}: {message}", field, "Receiver.Classify")
    _still_works(pair, good)


def test_classify_bounds_the_tensor_rank(pair, good):
    st = soft_tokens_changed(good)
    st.tokens.shape[:] = [1] * HUGE
    err = rpc_error(receiver_stub(pair[1].address).Classify, classify_request(st), timeout=TIMEOUT)
    field = "soft_tokens.tokens.shape"
    _assert_rejected(err, C.INVALID_ARGUMENT, f"{field}: has {HUGE} dimensions; the limit is {MAX_SHAPE_DIMS}", field,
                     "Receiver.Classify")
    _still_works(pair, good)


def test_a_long_wrong_fingerprint_is_clipped_in_the_message(pair, good):
    fingerprint = "f" * MAX_ID_CHARS
    err = rpc_error(receiver_stub(pair[1].address).Classify,
                    classify_request(soft_tokens_changed(good, bridge_fingerprint=fingerprint)), timeout=TIMEOUT)
    field = "soft_tokens.bridge_fingerprint"
    _assert_rejected(err, C.FAILED_PRECONDITION,
                     f"{field}: the soft tokens were made by bridge fingerprint {'f' * 64}…, but this receiver's bridge "
                     f"{good.bridge_id} for task 'sst2' has fingerprint {good.bridge_fingerprint}; sender and receiver "
                     "must load the same bridge checkpoint", field, "Receiver.Classify")
    _still_works(pair, good)


@pytest.mark.parametrize("request_, field, message", [
    (receiver_pb2.ClassifyTextRequest(task=X, text="hi"), "task", TOO_LONG),
    (receiver_pb2.ClassifyTextRequest(request_id=X, task="sst2", text="hi"), "request_id", TOO_LONG),
    (receiver_pb2.ClassifyTextRequest(task="sst2", text="hi\x00"), "text",
     "must not contain NUL characters (U+0000); found one at index 2"),
    (receiver_pb2.ClassifyTextRequest(task="sst2\n", text="hi"), "task", CONTROL + "found U+000A at index 4"),
], ids=["task", "request_id", "NUL in text", "newline in task"])
def test_classify_text_bounds_identifiers_and_text(pair, good, request_, field, message):
    err = rpc_error(receiver_stub(pair[1].address).ClassifyText, request_, timeout=TIMEOUT)
    _assert_rejected(err, C.INVALID_ARGUMENT, f"{field}: {message}", field, "Receiver.ClassifyText")
    _still_works(pair, good)


def test_every_status_message_fits_the_metadata_limit():
    err = ServiceError(C.NOT_FOUND, "no such thing: " + "é" * HUGE, "f" * HUGE)
    assert len(err.message.encode()) <= MAX_DETAILS_BYTES and err.message.endswith("…")
    assert err.message.startswith("no such thing: éé") and len(err.field) == MAX_ID_CHARS + 1


class _Items:
    """A request stream the test feeds while it reads the answers (the stream stays open in between)."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()

    def send(self, *items) -> None:
        for item in items:
            self._queue.put(item)

    def close(self) -> None:
        self._queue.put(None)

    def __iter__(self):
        while (item := self._queue.get()) is not None:
            yield item


def _answers(responses, n: int) -> dict:
    return {r.request_id: r for r in (next(responses) for _ in range(n))}


def test_huge_stream_items_fail_alone_and_the_stream_stays_open(pair, good):
    items = _Items()
    responses = receiver_stub(pair[1].address).ClassifyStream(iter(items), timeout=TIMEOUT)
    ok = [receiver_pb2.ClassifyStreamRequest(soft_tokens=soft_tokens_changed(good, request_id=f"ok{i}")) for i in range(3)]
    items.send(
        ok[0],
        receiver_pb2.ClassifyStreamRequest(soft_tokens=soft_tokens_changed(good, request_id="big-task", task=X)),
        receiver_pb2.ClassifyStreamRequest(soft_tokens=soft_tokens_changed(good, request_id="big-fp", bridge_fingerprint=X)),
        receiver_pb2.ClassifyStreamRequest(soft_tokens=soft_tokens_changed(good, request_id=X)),
        receiver_pb2.ClassifyStreamRequest(text=receiver_pb2.ClassifyTextRequest(request_id="big-text-task", task=X, text="a")),
        ok[1],
    )
    answers = _answers(responses, 6)
    assert set(answers) == {"ok0", "ok1", "big-task", "big-fp", "", "big-text-task"}
    for bad, field in [("big-task", "soft_tokens.task"), ("big-fp", "soft_tokens.bridge_fingerprint"),
                       ("", "soft_tokens.request_id"), ("big-text-task", "text.task")]:
        error = answers[bad].error
        assert (error.code, error.message, error.field) == (C.INVALID_ARGUMENT.value[0], f"{field}: {TOO_LONG}", field)
        assert answers[bad].ByteSize() < 2 * MAX_DETAILS_BYTES
    assert C.INVALID_ARGUMENT.name in DOCUMENTED["Receiver.ClassifyStream.item"]
    assert answers["ok0"].result.task == answers["ok1"].result.task == "sst2"
    items.send(ok[2])  # after the bad items: the same stream still serves
    assert next(responses).result.request_id == "ok2"
    items.close()
    assert list(responses) == []
    _still_works(pair, good)


# ---- C: bytes that are not the request message ------------------------------------------------------------------
def _raw_unary(address: str, method: str, data: bytes) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel:
        return rpc_error(channel.unary_unary(method), data, timeout=TIMEOUT)  # no serializers: raw bytes


def _no_errors_logged(caplog) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith(("telepathy", "grpc"))]
    assert bad == [], [r.getMessage() for r in bad]


UNDECODABLE_CASES = [
    (0, "/telepathy.v1.Sender/Relay", "telepathy.v1.RelayRequest"),
    (0, "/telepathy.v1.Sender/Encode", "telepathy.v1.EncodeRequest"),
    (0, "/telepathy.v1.Sender/Generate", "telepathy.v1.GenerateRequest"),
    (0, "/telepathy.v1.Sender/Info", "telepathy.v1.SenderInfoRequest"),
    (1, "/telepathy.v1.Receiver/Classify", "telepathy.v1.ClassifyRequest"),
    (1, "/telepathy.v1.Receiver/ClassifyText", "telepathy.v1.ClassifyTextRequest"),
    (1, "/telepathy.v1.Receiver/ListBridges", "telepathy.v1.ListBridgesRequest"),
    (1, "/telepathy.v1.Receiver/Info", "telepathy.v1.ReceiverInfoRequest"),
    (1, "/grpc.health.v1.Health/Check", "grpc.health.v1.HealthCheckRequest"),
]


def _rpc(method: str) -> str:
    """"/telepathy.v1.Sender/Relay" → "Sender.Relay", as docs/SERVICES.md names it."""
    return method.rsplit(".", 1)[-1].replace("/", ".")


@pytest.mark.parametrize("side, method, type_name", UNDECODABLE_CASES, ids=[m for _, m, _ in UNDECODABLE_CASES])
@pytest.mark.parametrize("data", [GARBAGE, BAD_UTF8_FIELD_2, LONE_SURROGATE_FIELD_3],
                         ids=["garbage", "bad UTF-8", "lone surrogate"])
def test_undecodable_requests_are_invalid_argument(pair, good, caplog, side, method, type_name, data):
    if data != GARBAGE and not method.endswith(("Relay", "Encode", "Generate", "ClassifyText")):
        data = GARBAGE  # the others have no string fields 2 and 3
    with caplog.at_level(logging.WARNING):
        err = _raw_unary(pair[side].address, method, data)
    _assert_rejected(err, C.INVALID_ARGUMENT, f"request is not a valid {type_name} message {UNDECODABLE}", rpc=_rpc(method))
    warnings = [r for r in caplog.records if r.name == "telepathy.serving.server"]
    assert [r.levelno for r in warnings] == [logging.WARNING] and warnings[0].getMessage().startswith(
        f"{method}: undecodable {type_name} ({len(data)} bytes): ")
    assert "Traceback" not in caplog.text
    _no_errors_logged(caplog)
    _still_works(pair, good)


def test_bad_utf8_inside_a_nested_message_is_invalid_argument(pair, good, caplog):
    data = b"\x0a\x04" + BAD_UTF8_FIELD_2  # ClassifyRequest.soft_tokens { task: <not UTF-8> }
    err = _raw_unary(pair[1].address, "/telepathy.v1.Receiver/Classify", data)
    _assert_rejected(err, C.INVALID_ARGUMENT, f"request is not a valid telepathy.v1.ClassifyRequest message {UNDECODABLE}",
                     rpc="Receiver.Classify")
    _no_errors_logged(caplog)
    _still_works(pair, good)


def test_an_undecodable_stream_item_fails_alone(pair, good, caplog):
    with grpc.insecure_channel(pair[1].address) as channel:
        call = channel.stream_stream("/telepathy.v1.Receiver/ClassifyStream",
                                     response_deserializer=receiver_pb2.ClassifyStreamResponse.FromString)
        items = _Items()
        responses = call(iter(items), timeout=TIMEOUT)
        item = receiver_pb2.ClassifyStreamRequest(soft_tokens=soft_tokens_changed(good, request_id="a"))
        items.send(item.SerializeToString(), GARBAGE, b"\x0a\x04" + BAD_UTF8_FIELD_2)
        answers = [next(responses) for _ in range(3)]  # in completion order
        assert [r.result.task for r in answers if r.request_id == "a"] == ["sst2"]
        errors = [(r.request_id, r.error.code, r.error.message) for r in answers if r.HasField("error")]
        assert errors == 2 * [("", C.INVALID_ARGUMENT.value[0],
                               f"request is not a valid telepathy.v1.ClassifyStreamRequest message {UNDECODABLE}")]
        item.soft_tokens.request_id = "b"
        items.send(item.SerializeToString())
        assert next(responses).result.request_id == "b"
        items.close()
        assert list(responses) == []
    _no_errors_logged(caplog)
    _still_works(pair, good)


def test_an_undecodable_message_ends_any_other_request_stream(pair, good, caplog):
    with grpc.insecure_channel(pair[1].address) as channel:
        call = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
        with pytest.raises(grpc.RpcError) as info:
            list(call(iter([GARBAGE]), timeout=TIMEOUT))
    _assert_rejected(info.value, C.INVALID_ARGUMENT,
                     f"request is not a valid grpc.reflection.v1alpha.ServerReflectionRequest message {UNDECODABLE}")
    _no_errors_logged(caplog)
    _still_works(pair, good)


# ---- D: a caller that goes away is not an error ------------------------------------------------------------------
@pytest.fixture(scope="module")
def slow_pair(tiny_bridges_dir):
    """Requests wait 100 ms for batch-mates on each side, so callers' deadlines pass while they are queued, in the
    model call or on the stream to the receiver."""
    receiver = start_receiver(tiny_bridges_dir, max_queue_delay_ms=100, max_batch_size=256, warmup=False)
    sender = start_sender(tiny_bridges_dir, receiver.address, max_queue_delay_ms=100, max_batch_size=256,
                          max_relay_tokens=4, warmup=False)
    yield sender, receiver
    sender.stop()
    receiver.stop()


def test_callers_that_go_away_log_no_errors(pair, good, slow_pair, caplog):
    sender, receiver = sender_stub(slow_pair[0].address), receiver_stub(slow_pair[1].address)
    caplog.set_level(logging.INFO)
    # The service's own deadline timers and gRPC's fire together, so many of these race the status against the
    # call's end (before the fix some logged ERROR "ExecuteBatchError raised in core by servicer method").
    calls = []
    for i in range(100):
        timeout = 0.08 + 0.1 * (i % 10) / 10
        calls += [sender.Relay.future(relay(), timeout=timeout), receiver.Classify.future(classify_request(good), timeout=timeout),
                  sender.Relay.future(relay(path=sender_pb2.PATH_TEXT), timeout=3 * timeout)]
        time.sleep(0.005)
    cancelled = [sender.Relay.future(relay(), timeout=TIMEOUT) for _ in range(10)]
    time.sleep(0.05)
    for call in cancelled:
        call.cancel()
    for call in calls:
        call.exception(timeout=TIMEOUT)  # waits for its end
    assert {call.code() for call in calls} <= {C.DEADLINE_EXCEEDED, C.OK} and C.DEADLINE_EXCEEDED in {c.code() for c in calls}
    assert all(call.cancelled() for call in cancelled)

    # A stream whose deadline passes while it is open and idle.
    stream_items = _Items()
    responses = receiver_stub(pair[1].address).ClassifyStream(iter(stream_items), timeout=0.3)
    stream_items.send(receiver_pb2.ClassifyStreamRequest(soft_tokens=soft_tokens_changed(good, request_id="s")))
    assert next(responses).request_id == "s"
    with pytest.raises(grpc.RpcError) as info:
        next(responses)
    assert info.value.code() == C.DEADLINE_EXCEEDED
    stream_items.close()

    time.sleep(0.5)  # the queued requests reach their batch (and find nobody waiting)
    _no_errors_logged(caplog)
    assert sender.Relay(relay(), timeout=TIMEOUT).result.task == "sst2"
    _still_works(pair, good)


def test_refused_and_cut_calls_are_counted_as_the_client_saw_them(pair, good, slow_pair):
    def count(service, method: str, code: grpc.StatusCode) -> float:
        return metric(service.service.metrics.render().decode(), "telepathy_requests_total", method=method, code=code.name)

    receiver = pair[1]
    before = count(receiver, "Classify", C.INVALID_ARGUMENT)
    _raw_unary(receiver.address, "/telepathy.v1.Receiver/Classify", GARBAGE)
    assert count(receiver, "Classify", C.INVALID_ARGUMENT) == before + 1
    slow_sender = slow_pair[0]
    before = count(slow_sender, "Relay", C.DEADLINE_EXCEEDED)
    assert rpc_error(sender_stub(slow_sender.address).Relay, relay(), timeout=0.05).code() == C.DEADLINE_EXCEEDED
    wait_for(lambda: count(slow_sender, "Relay", C.DEADLINE_EXCEEDED) == before + 1, what="the cut call to be counted")
    _still_works(pair, good)


# ---- the pair service: the same servicers and server, so the same edge ------------------------------------------
def test_the_pair_service_has_the_same_edge(tiny_bridges_dir, caplog):
    service = start_pair(tiny_bridges_dir, max_relay_tokens=4, warmup=False)
    try:
        address = service.address
        sender, receiver = sender_stub(address), receiver_stub(address)
        good = soft_tokens_for(address, "a fine film", "sst2")
        assert "sst2" in service.service.fused_tasks
        cases = [  # sst2 runs fused: its Relay checks are the sender's before the fused batcher
            (sender.Relay, relay(request_id=X), "Sender.Relay", "request_id", TOO_LONG),
            (sender.Relay, relay(text="a\x00b"), "Sender.Relay", "text",
             "must not contain NUL characters (U+0000); found one at index 1"),
            (sender.Relay, relay(task="sst2\x7f"), "Sender.Relay", "task", CONTROL + "found U+007F at index 4"),
            (sender.Encode, sender_pb2.EncodeRequest(task=X, text="hi"), "Sender.Encode", "task", TOO_LONG),
            (receiver.Classify, classify_request(soft_tokens_changed(good, bridge_id=X)), "Receiver.Classify", "soft_tokens.bridge_id",
             TOO_LONG),
            (receiver.ClassifyText, receiver_pb2.ClassifyTextRequest(request_id="\x1b", task="sst2", text="hi"),
             "Receiver.ClassifyText", "request_id", CONTROL + "found U+001B at index 0"),
        ]
        for call, request, rpc, field, message in cases:
            _assert_rejected(rpc_error(call, request, timeout=TIMEOUT), C.INVALID_ARGUMENT, f"{field}: {message}", field, rpc)
        with caplog.at_level(logging.WARNING):
            for method, type_name, data in [("/telepathy.v1.Sender/Relay", "RelayRequest", LONE_SURROGATE_FIELD_3),
                                            ("/telepathy.v1.Receiver/Classify", "ClassifyRequest", GARBAGE)]:
                _assert_rejected(_raw_unary(address, method, data), C.INVALID_ARGUMENT,
                                 f"request is not a valid telepathy.v1.{type_name} message {UNDECODABLE}", rpc=_rpc(method))
        assert "Traceback" not in caplog.text
        _no_errors_logged(caplog)

        items = _Items()
        responses = receiver.ClassifyStream(iter(items), timeout=TIMEOUT)
        items.send(receiver_pb2.ClassifyStreamRequest(soft_tokens=soft_tokens_changed(good, request_id=X)),
                   receiver_pb2.ClassifyStreamRequest(soft_tokens=soft_tokens_changed(good, request_id="ok")))
        answers = _answers(responses, 2)
        assert (answers[""].error.code, answers[""].error.message) == (C.INVALID_ARGUMENT.value[0],
                                                                      f"soft_tokens.request_id: {TOO_LONG}")
        assert answers["ok"].result.task == "sst2"
        items.close()
        assert list(responses) == []

        assert sender.Relay(relay(), timeout=TIMEOUT).result.task == "sst2"  # fused
        assert receiver.Classify(classify_request(good), timeout=TIMEOUT).result.task == "sst2"
    finally:
        service.stop()


# ---- docs/SERVICES.md --------------------------------------------------------------------------------------------
def test_the_status_tables_cover_every_rpc_and_every_code_the_services_raise():
    rpcs = {f"{service.name}.{method.name}" for pb in (sender_pb2, receiver_pb2)
            for service in pb.DESCRIPTOR.services_by_name.values() for method in service.methods}
    rpcs |= {"Receiver.ClassifyStream.item", "Health.Check", "Health.Watch", "any"}
    assert rpcs <= set(DOCUMENTED), f"docs/SERVICES.md has no status table for {sorted(rpcs - set(DOCUMENTED))}"
    named = set().union(*DOCUMENTED.values())
    assert named <= set(C.__members__), sorted(named - set(C.__members__))
    raised = set()
    for folder in ("telepathy/serving", "sender_service", "receiver_service", "pair_service"):
        for path in (ROOT / folder).glob("*.py"):
            raised |= set(re.findall(r"StatusCode\.([A-Z_]+)", path.read_text(encoding="utf-8")))
    assert {"NOT_FOUND", "FAILED_PRECONDITION", "UNAUTHENTICATED"} <= raised
    assert raised <= named, f"docs/SERVICES.md does not list {sorted(raised - named)}"


def test_the_documented_wire_size_is_the_shipped_bridges():
    text = (ROOT / "docs" / "SERVICES.md").read_text(encoding="utf-8")
    configs = [json.loads(p.read_text(encoding="utf-8"))["bridge"] for p in SHIPPED_BRIDGES.glob("*/*/config.json")]
    shapes = {(c["num_latents"], c["d_wire"]) for c in configs}
    assert len(shapes) == 1, shapes  # one figure fits every shipped bridge
    (k, d), = shapes
    assert f"K = {k}, d_wire = {d}) send {k} × {d} + {k} × 4 = {wire_nbytes('int8', k, d)} bytes at the default int8" in text
    assert "32 KiB for the default" not in text
