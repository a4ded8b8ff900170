"""Every bad input gets its exact status code and message, and the service keeps working afterwards."""

from __future__ import annotations

import struct

import grpc
import pytest

from telepathy.protos.v1 import common_pb2, receiver_pb2, sender_pb2
from telepathy.testing import make_untrained_bridges
from tests.services_support import (
    TIMEOUT,
    assert_status,
    classify_request,
    field_trailer,
    receiver_stub,
    relay,
    rpc_error,
    sender_stub,
    soft_tokens_changed,
    soft_tokens_for,
    start_receiver,
    start_sender,
)

C = grpc.StatusCode
MAX_TEXT = 200
MAX_MESSAGE = 64 * 1024


@pytest.fixture(scope="module")
def pair(tiny_bridges_dir):
    receiver = start_receiver(tiny_bridges_dir, max_text_chars=MAX_TEXT, max_message_bytes=MAX_MESSAGE)
    sender = start_sender(tiny_bridges_dir, receiver.address, max_text_chars=MAX_TEXT, max_relay_tokens=8)
    yield sender, receiver
    sender.stop()
    receiver.stop()


@pytest.fixture(scope="module")
def good(pair):
    """Valid int8 soft tokens for sst2 from the sender itself; each case below breaks one thing in a copy."""
    return soft_tokens_for(pair[0].address, "a fine film", "sst2")


def _fp32(values) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def _still_works(pair, good) -> None:
    sender, receiver = pair
    assert receiver_stub(receiver.address).Classify(classify_request(good), timeout=TIMEOUT).result.task == "sst2"
    assert sender_stub(sender.address).Relay(relay(), timeout=TIMEOUT).result.task == "sst2"


FP = "soft_tokens.bridge_fingerprint"
T = "soft_tokens.tokens"
SHAPE, DATA, SCALES, DTYPE = f"{T}.shape", f"{T}.raw_data", f"{T}.scales", f"{T}.dtype"
FP32, FP16 = common_pb2.DTYPE_FP32, common_pb2.DTYPE_FP16
NOT_FINITE = "values must be finite (found NaN or Inf)"
TWO_DIMS = "expected 2 positive dimensions [tokens, width], got"
# case → (changes to a good request, code, field, message after "field: ")
RECEIVER_CASES = {
    "missing task": (dict(task="", bridge_id=""), C.INVALID_ARGUMENT, "soft_tokens.task", "is required"),
    "unknown task": (dict(task="nope"), C.NOT_FOUND, "soft_tokens.task", "unknown task 'nope'; known tasks: ag_news, sst2, trec"),
    "unknown bridge id": (dict(bridge_id="sst2-00000000"), C.NOT_FOUND, "soft_tokens.bridge_id",
                          "no bridge with id 'sst2-00000000' is loaded"),
    "missing fingerprint": (dict(bridge_fingerprint=""), C.INVALID_ARGUMENT, FP, "is required"),
    "wrong fingerprint": (dict(bridge_fingerprint="0123456789abcdef"), C.FAILED_PRECONDITION, FP,
                          "the soft tokens were made by bridge fingerprint 0123456789abcdef, but this receiver's bridge"),
    "missing tensor": (dict(tokens=None), C.INVALID_ARGUMENT, T, "is required"),
    "unspecified dtype": (dict(tokens__dtype=common_pb2.DTYPE_UNSPECIFIED), C.INVALID_ARGUMENT, DTYPE,
                          "unsupported dtype DTYPE_UNSPECIFIED; expected one of DTYPE_FP32, DTYPE_FP16, DTYPE_BF16, DTYPE_INT8"),
    "unknown dtype enum": (dict(tokens__dtype=99), C.INVALID_ARGUMENT, DTYPE, "unsupported dtype enum value 99"),
    "wrong shape": (dict(tokens__shape=[5, 16]), C.INVALID_ARGUMENT, SHAPE, "expected [4, 16] for this bridge, got [5, 16]"),
    "three dims": (dict(tokens__shape=[1, 4, 16]), C.INVALID_ARGUMENT, SHAPE, f"{TWO_DIMS} [1, 4, 16]"),
    "negative dim": (dict(tokens__shape=[-4, 16]), C.INVALID_ARGUMENT, SHAPE, f"{TWO_DIMS} [-4, 16]"),
    "short raw_data": (dict(tokens__raw_data=b"\x01" * 63), C.INVALID_ARGUMENT, DATA, "expected 64 bytes for int8 [4, 16], got 63"),
    "missing int8 scales": (dict(tokens__scales=b""), C.INVALID_ARGUMENT, SCALES, "int8 needs 4 fp32 scales (16 bytes), got 0 bytes"),
    "NaN scale": (dict(tokens__scales=_fp32([1.0, float("nan"), 1.0, 1.0])), C.INVALID_ARGUMENT, SCALES,
                  "scales must be finite and non-negative"),
    "negative scale": (dict(tokens__scales=_fp32([1.0, -1.0, 1.0, 1.0])), C.INVALID_ARGUMENT, SCALES,
                       "scales must be finite and non-negative"),
    "fp32 with scales": (dict(tokens__dtype=FP32, tokens__raw_data=_fp32([0.5] * 64)), C.INVALID_ARGUMENT, SCALES,
                         "scales are only allowed with int8, got 16 bytes for fp32"),
    "NaN value": (dict(tokens__dtype=FP32, tokens__scales=b"", tokens__raw_data=_fp32([0.5] * 63 + [float("nan")])),
                  C.INVALID_ARGUMENT, DATA, NOT_FINITE),
    "Inf value fp16": (dict(tokens__dtype=FP16, tokens__scales=b"", tokens__raw_data=b"\x00\x7c" + b"\x00\x38" * 63),
                       C.INVALID_ARGUMENT, DATA, NOT_FINITE),
}


PREFIX_ONLY = {"wrong fingerprint", "unknown bridge id", "missing fingerprint", "unknown dtype enum"}  # messages go on


@pytest.mark.parametrize("case", list(RECEIVER_CASES))
def test_receiver_rejects_bad_soft_tokens(pair, good, case):
    changes, code, field, message = RECEIVER_CASES[case]
    err = rpc_error(receiver_stub(pair[1].address).Classify, classify_request(soft_tokens_changed(good, **changes)), timeout=TIMEOUT)
    expected = f"{field}: {message}"
    assert err.code() == code and err.details().startswith(expected), (err.code(), err.details())
    if case not in PREFIX_ONLY:
        assert err.details() == expected
    assert field_trailer(err) == field
    _still_works(pair, good)


def test_wrong_fingerprint_names_both_fingerprints(pair, good):
    err = rpc_error(receiver_stub(pair[1].address).Classify,
                    classify_request(soft_tokens_changed(good, bridge_fingerprint="0123456789abcdef")), timeout=TIMEOUT)
    assert "0123456789abcdef" in err.details() and good.bridge_fingerprint in err.details()


def test_missing_soft_tokens_message(pair, good):
    err = rpc_error(receiver_stub(pair[1].address).Classify, receiver_pb2.ClassifyRequest(), timeout=TIMEOUT)
    assert_status(err, C.INVALID_ARGUMENT, "soft_tokens: is required", exact=True)
    _still_works(pair, good)


def test_message_over_the_size_cap_is_resource_exhausted(pair, good):
    huge = classify_request(soft_tokens_changed(good, tokens__raw_data=b"\x01" * (MAX_MESSAGE + 1)))
    err = rpc_error(receiver_stub(pair[1].address).Classify, huge, timeout=TIMEOUT)
    size = len(huge.SerializeToString())
    assert_status(err, C.RESOURCE_EXHAUSTED, f"SERVER: Received message larger than max ({size} vs. {MAX_MESSAGE})", exact=True)
    _still_works(pair, good)


@pytest.mark.parametrize("request_, code, message", [
    (receiver_pb2.ClassifyTextRequest(text="hi"), C.INVALID_ARGUMENT, "task: is required"),
    (receiver_pb2.ClassifyTextRequest(task="nope", text="hi"), C.NOT_FOUND,
     "task: unknown task 'nope'; known tasks: ag_news, sst2, trec"),
    (receiver_pb2.ClassifyTextRequest(task="sst2", text="x" * (MAX_TEXT + 1)), C.INVALID_ARGUMENT,
     f"text: {MAX_TEXT + 1} characters exceed the limit of {MAX_TEXT}"),
], ids=["missing task", "unknown task", "too long"])
def test_receiver_rejects_bad_text(pair, good, request_, code, message):
    err = rpc_error(receiver_stub(pair[1].address).ClassifyText, request_, timeout=TIMEOUT)
    assert_status(err, code, message, exact=True)
    _still_works(pair, good)


def test_bad_stream_items_get_errors_and_the_stream_stays_open(pair, good):
    bad = soft_tokens_changed(good, request_id="bad", bridge_fingerprint="0123456789abcdef")
    ok = soft_tokens_changed(good, request_id="ok")
    both = receiver_pb2.ClassifyStreamRequest(soft_tokens=soft_tokens_changed(good, request_id="both"),
                                              text=receiver_pb2.ClassifyTextRequest(task="sst2"))
    items = [
        receiver_pb2.ClassifyStreamRequest(soft_tokens=bad),
        receiver_pb2.ClassifyStreamRequest(soft_tokens=soft_tokens_changed(good, request_id="neg"), timeout_ms=-5),
        both,
        receiver_pb2.ClassifyStreamRequest(text=receiver_pb2.ClassifyTextRequest(request_id="txt", task="nope", text="x")),
        receiver_pb2.ClassifyStreamRequest(soft_tokens=ok),
        receiver_pb2.ClassifyStreamRequest(text=receiver_pb2.ClassifyTextRequest(request_id="txt-ok", task="sst2", text="")),
    ]
    answers = {r.request_id: r for r in receiver_stub(pair[1].address).ClassifyStream(iter(items), timeout=TIMEOUT)}
    assert set(answers) == {"bad", "neg", "both", "txt", "ok", "txt-ok"}
    assert (answers["bad"].error.code, answers["bad"].error.field) == (C.FAILED_PRECONDITION.value[0], FP)
    assert answers["neg"].error.message == "timeout_ms: must not be negative, got -5"
    assert answers["both"].error.message == "soft_tokens: set exactly one of soft_tokens and text"
    assert answers["both"].error.code == C.INVALID_ARGUMENT.value[0]
    assert (answers["txt"].error.code, answers["txt"].error.field) == (C.NOT_FOUND.value[0], "text.task")
    assert answers["ok"].result.task == "sst2" and answers["txt-ok"].result.task == "sst2"


SENDER_CASES = {
    "empty text": (relay(text="  "), C.INVALID_ARGUMENT, "text: must not be empty", "text"),
    "text too long": (relay(text="x" * (MAX_TEXT + 1)), C.INVALID_ARGUMENT,
                      f"text: {MAX_TEXT + 1} characters exceed the limit of {MAX_TEXT}", "text"),
    "missing task": (relay(task=""), C.INVALID_ARGUMENT, "task: is required", "task"),
    "unknown task": (relay(task="nope"), C.NOT_FOUND, "task: unknown task 'nope'; known tasks: ag_news, sst2, trec", "task"),
    "unknown path": (relay(path=7), C.INVALID_ARGUMENT, "path: unknown path enum value 7; expected PATH_BRIDGE or PATH_TEXT", "path"),
    "unknown wire dtype": (relay(wire_dtype=9), C.INVALID_ARGUMENT,
                           "wire_dtype: unknown dtype enum value 9; expected one of DTYPE_FP32, DTYPE_FP16, DTYPE_BF16, DTYPE_INT8",
                           "wire_dtype"),
    "relay tokens over the limit": (relay(path=sender_pb2.PATH_TEXT, max_relay_tokens=9), C.INVALID_ARGUMENT,
                                    "max_relay_tokens: must be between 0 and 8 (0 = 8), got 9", "max_relay_tokens"),
    "negative relay tokens": (relay(path=sender_pb2.PATH_TEXT, max_relay_tokens=-1), C.INVALID_ARGUMENT,
                              "max_relay_tokens: must be between 0 and 8 (0 = 8), got -1", "max_relay_tokens"),
}


@pytest.mark.parametrize("case", list(SENDER_CASES))
def test_sender_rejects_bad_relays(pair, good, case):
    request_, code, message, field = SENDER_CASES[case]
    err = rpc_error(sender_stub(pair[0].address).Relay, request_, timeout=TIMEOUT)
    assert_status(err, code, message, exact=True)
    assert field_trailer(err) == field
    _still_works(pair, good)


def test_sender_rejects_bad_encode_and_generate(pair, good):
    stub = sender_stub(pair[0].address)
    err = rpc_error(stub.Encode, sender_pb2.EncodeRequest(task="nope", text="x"), timeout=TIMEOUT)
    assert_status(err, C.NOT_FOUND, "task: unknown task 'nope'; known tasks: ag_news, sst2, trec", exact=True)
    err = rpc_error(stub.Generate, sender_pb2.GenerateRequest(task="sst2", text="x", max_tokens=99), timeout=TIMEOUT)
    assert_status(err, C.INVALID_ARGUMENT, "max_tokens: must be between 0 and 8 (0 = 8), got 99", exact=True)
    _still_works(pair, good)


def test_missing_bridge_starts_and_answers_not_found(tmp_path, tiny_sender, tiny_receiver):
    bridges = make_untrained_bridges(tmp_path / "b", tiny_sender, tiny_receiver, tasks=["sst2"], sender_layer=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    receiver = start_receiver(empty)  # no bridge at all: still starts
    sender = start_sender(bridges, receiver.address)
    try:
        stub = sender_stub(sender.address)
        err = rpc_error(stub.Relay, relay("ag_news"), timeout=TIMEOUT)
        assert_status(err, C.NOT_FOUND, "task: no bridge is loaded for task 'ag_news'; loaded tasks: ['sst2']", exact=True)
        err = rpc_error(stub.Relay, relay("sst2"), timeout=TIMEOUT)  # the receiver has no bridge for it
        assert_status(err, C.NOT_FOUND, "receiver: soft_tokens.task: no bridge is loaded for task 'sst2'; loaded tasks: []",
                      exact=True)
        assert stub.Relay(relay("ag_news", path=sender_pb2.PATH_TEXT, max_relay_tokens=4), timeout=TIMEOUT).result.task == "ag_news"
    finally:
        sender.stop()
        receiver.stop()


def test_sender_and_receiver_with_different_bridges_fail_precondition(pair, tmp_path, tiny_sender, tiny_receiver, good):
    other = make_untrained_bridges(tmp_path, tiny_sender, tiny_receiver, tasks=["sst2"], sender_layer=2, d_model=64)
    sender = start_sender(other, pair[1].address)
    try:
        err = rpc_error(sender_stub(sender.address).Relay, relay("sst2"), timeout=TIMEOUT)
        assert_status(err, C.FAILED_PRECONDITION, f"receiver: {FP}: the soft tokens were made by bridge fingerprint ")
        assert good.bridge_fingerprint in err.details()  # the receiver's own, next to the sender's
        assert field_trailer(err) == FP
    finally:
        sender.stop()
    _still_works(pair, good)
