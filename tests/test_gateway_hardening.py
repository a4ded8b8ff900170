"""The gateway's edge against hostile or broken clients, end to end: real sender and receiver (tiny random pair),
real uvicorn on loopback, raw sockets where httpx would be too polite (chunked bodies past the cap, bodies that
never arrive, huge bodies without a key). Each refusal is checked for its exact status, envelope and message, and
followed by a request that works. One stack and one gateway (API keys on, body_timeout_s 1 s) for the module.
"""

from __future__ import annotations

import json
import re
import select
import socket
import time
from pathlib import Path

import httpx
import pytest

from telepathy.bridge.checkpoint import read_meta
from telepathy.bridge.codec import wire_nbytes
from telepathy.bridge.models import TINY_RECEIVER, TINY_SENDER
from telepathy.gateway.errors import ERROR_TYPES, error_body
from telepathy.gateway.settings import GatewaySettings
from telepathy.receiver_service.app import build_receiver
from telepathy.receiver_service.settings import ReceiverSettings
from telepathy.sender_service.app import build_sender
from telepathy.sender_service.settings import SenderSettings
from telepathy.testing import GatewayThread, ServiceThread, make_untrained_bridges

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hardening-token"
API_KEY = "hardening-key"
KEY = {"X-API-Key": API_KEY}
LIMIT = 4 * 4000 + 64 * 1024  # max_body_bytes derived from the default max_text_chars
SST2 = {"text": "a gripping , beautifully acted film", "task": "sst2"}
JSON = {"Content-Type": "application/json"}
MISSING_KEY = "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
EMPTY = "request body is empty; expected a JSON object with text and task"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_sender, tiny_receiver):
    bridges = make_untrained_bridges(tmp_path_factory.mktemp("hardening-bridges"), tiny_sender, tiny_receiver,
                                     tasks=["sst2", "ag_news"], sender_layer=2)
    common = dict(bridges=str(bridges), port=0, max_batch_size=4, grace_s=1.0, auth_token=TOKEN)
    receiver = ServiceThread(lambda: build_receiver(ReceiverSettings(model=TINY_RECEIVER, **common), tiny_receiver),
                             "receiver").start()
    sender = ServiceThread(lambda: build_sender(SenderSettings(
        model=TINY_SENDER, receiver_addr=receiver.address, max_relay_tokens=8, **common), tiny_sender),
        "sender").start()
    yield sender, receiver
    sender.stop()
    receiver.stop()


@pytest.fixture(scope="module")
def gateway(stack):
    sender, receiver = stack
    gw = GatewayThread(GatewaySettings(port=0, sender_addr=sender.address, receiver_addr=receiver.address,
                                       auth_token=TOKEN, api_keys=(API_KEY,), body_timeout_s=1.0)).start()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def client(gateway):
    with httpx.Client(base_url=gateway.url, timeout=30.0, headers=KEY) as c:
        yield c


def check_error(status: int, headers, body: dict, want_status: int, message: str, param: str | None = None) -> None:
    assert status == want_status, body
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "param"}, body
    assert body["error"] == {"type": ERROR_TYPES[want_status], "message": message, "param": param}
    assert re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"])


def assert_error(r: httpx.Response, status: int, message: str, param: str | None = None) -> None:
    check_error(r.status_code, r.headers, r.json(), status, message, param)


def assert_works(c: httpx.Client) -> None:
    r = c.post("/v1/classify", json=SST2)
    assert r.status_code == 200, r.text
    assert r.json()["label"] in ("negative", "positive")


# -- raw HTTP/1.1 over a socket ----------------------------------------------------------------------------------

def connect(gw: GatewayThread) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gw.port), timeout=10.0)


def head(path: str, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    """The first response on the socket. A server that closes with our body unread may reset the connection
    right after its answer: what had arrived by then is still read."""
    data = b""

    def more() -> bool:
        nonlocal data
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return False
        data += chunk
        return bool(chunk)

    while b"\r\n\r\n" not in data and more():
        pass
    header_block, _, rest = data.partition(b"\r\n\r\n")
    lines = header_block.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:])}
    length = int(headers["content-length"])
    while len(data) - len(header_block) - 4 < length and more():
        pass
    body = data[len(header_block) + 4:][:length]
    return int(lines[0].split()[1]), headers, json.loads(body)


# -- 1. the body cap holds without Content-Length; the key is checked before any body byte ------------------------

def test_chunked_body_over_the_cap_is_refused_while_it_streams(gateway, client):
    chunk = b"x" * 16384
    sent = 0
    with connect(gateway) as s:
        s.sendall(head("/v1/classify", {**KEY, **JSON, "Transfer-Encoding": "chunked"}))
        while not select.select([s], [], [], 0.02)[0]:  # keep sending until the gateway answers
            assert sent < 200 * 2**20, "the gateway read a 200 MB chunked body without answering"
            try:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        status, headers, body = read_response(s)
    check_error(status, headers, body, 413, f"request body is more than {LIMIT} bytes; the limit is {LIMIT}")
    assert headers["connection"] == "close"  # the unread rest must not be taken for a next request
    assert sent < 4 * 2**20  # answered as soon as the cap was passed, not after the client finished
    assert_works(client)


@pytest.mark.parametrize("key, framing, message", [
    ({}, {"Content-Length": "200000000"}, MISSING_KEY),
    ({}, {"Transfer-Encoding": "chunked"}, MISSING_KEY),
    ({"Authorization": "Bearer wrong"}, {"Content-Length": "200000000"}, "invalid API key"),
])
def test_unauthenticated_body_is_refused_unread(gateway, client, key, framing, message):
    """Nothing of the body is sent: a gateway that waited for it would answer 408 after 1 s, and one that
    read it would first send '100 Continue' (the client asks for it)."""
    with connect(gateway) as s:
        start = time.monotonic()
        s.sendall(head("/v1/classify", {**key, **JSON, "Expect": "100-continue", **framing}))
        status, headers, body = read_response(s)
        elapsed = time.monotonic() - start
    check_error(status, headers, body, 401, message)
    assert headers["www-authenticate"] == "Bearer" and headers["connection"] == "close"
    assert elapsed < 0.9
    assert_works(client)


def test_announced_body_over_the_cap_is_refused_unread(gateway, client):
    with connect(gateway) as s:
        s.sendall(head("/v1/compare", {**KEY, **JSON, "Expect": "100-continue", "Content-Length": "200000000"}))
        status, headers, body = read_response(s)
    check_error(status, headers, body, 413, f"request body is 200000000 bytes; the limit is {LIMIT}")
    assert headers["connection"] == "close"
    assert_works(client)


# -- 2. text that JSON allows and UTF-8 cannot carry; NUL and control characters ---------------------------------

@pytest.mark.parametrize("route", ["/v1/classify", "/v1/compare"])
@pytest.mark.parametrize("raw, message, param", [
    (r'{"text": "ab\ud800c", "task": "sst2"}', "text: contains a lone surrogate (U+D800) that UTF-8 cannot encode",
     "text"),
    (r'{"text": "\udfff", "task": "sst2"}', "text: contains a lone surrogate (U+DFFF) that UTF-8 cannot encode",
     "text"),
    (r'{"text": "fine", "task": "sst2\udc80"}', "task: contains a lone surrogate (U+DC80) that UTF-8 cannot encode",
     "task"),
    (r'{"text": "a\u0000b", "task": "sst2"}', "text: contains a NUL character (U+0000), which is not allowed", "text"),
    (r'{"text": "fine", "task": "sst2\u0000"}',
     "task: contains a control character (U+0000); a task is a name such as sst2", "task"),
    (r'{"text": "fine", "task": "sst2\n"}',
     "task: contains a control character (U+000A); a task is a name such as sst2", "task"),
    (r'{"text": "fine", "task": "\u001bsst2"}',
     "task: contains a control character (U+001B); a task is a name such as sst2", "task"),
    (r'{"text": "fine", "task": "sst2\u0085"}',
     "task: contains a control character (U+0085); a task is a name such as sst2", "task"),
    (r'{"text": "fine", "task": "sst2", "\ud800": 1}',
     "a field name contains a lone surrogate (U+D800) that UTF-8 cannot encode", None),
    # The refusal quotes the field name back: a control character in it is JSON-escaped, nothing breaks.
    (r'{"text": "fine", "task": "sst2", "\u0007": 1}', "\x07: unknown field", "\x07"),
])
def test_422_text_and_task_characters(client, route, raw, message, param):
    assert_error(client.post(route, content=raw.encode(), headers=JSON), 422, message, param)
    assert_works(client)


@pytest.mark.parametrize("text", [
    "tab\there, new\nline, carriage\rreturn",  # whitespace controls are ordinary text
    "an escape \x1b[1m code and a bell \x07 from a copy-paste",  # other C0 controls reach the model too
    "emoji \U0001F600 as an escaped surrogate pair",  # json.dumps writes it as \\ud83d\\ude00: a pair, not lone
])
def test_text_with_allowed_characters_is_classified(client, text):
    r = client.post("/v1/classify", content=json.dumps({"text": text, "task": "sst2"}).encode(), headers=JSON)
    assert r.status_code == 200, r.text


# -- 3. every refusal of a body in the envelope, with a message to act on ----------------------------------------

@pytest.mark.parametrize("route", ["/v1/classify", "/v1/compare"])
@pytest.mark.parametrize("content_type, got", [
    ("text/plain", "text/plain"),
    ("application/x-www-form-urlencoded", "application/x-www-form-urlencoded"),  # what `curl -d` sends by default
    (None, "none"),
])
def test_415_content_type(client, route, content_type, got):
    headers = {"Content-Type": content_type} if content_type else {}
    r = client.post(route, content=json.dumps(SST2).encode(), headers=headers)
    assert_error(r, 415, f"expected Content-Type: application/json, got {got}")
    assert_works(client)


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/vnd.telepathy+json"])
def test_json_content_types_are_accepted(client, content_type):
    r = client.post("/v1/classify", content=json.dumps(SST2).encode(), headers={"Content-Type": content_type})
    assert r.status_code == 200, r.text


def _nested(levels: int) -> bytes:
    """A request whose unknown field "x" holds arrays nested so that the whole body is `levels` deep."""
    inner = levels - 1
    return b'{"text": "hi", "task": "sst2", "x": ' + b"[" * inner + b"]" * inner + b"}"


@pytest.mark.parametrize("kwargs, message", [
    (dict(content=b""), EMPTY),
    (dict(content=iter([])), EMPTY),  # chunked with no chunk: no Content-Length to tell
    (dict(content=b"null"), "request body must be a JSON object with text and task, got null"),
    (dict(content=b'"text"'), "request body must be a JSON object with text and task, got a string"),
    (dict(content=b"42"), "request body must be a JSON object with text and task, got a number"),
    (dict(content=b'{"text": "caf\xe9", "task": "sst2"}'),  # Latin-1, not UTF-8
     "request body is not valid UTF-8 (byte 0xe9 at offset 13)"),
    (dict(content=b'{"text": "\xed\xa0\x80", "task": "sst2"}'),  # a surrogate encoded as bytes: not UTF-8 either
     "request body is not valid UTF-8 (byte 0xed at offset 10)"),
    (dict(content=b"[" * 50000), "request body is nested too deeply: more than 32 levels of arrays/objects "
                                 "(a request is one flat JSON object)"),
    (dict(content=_nested(33)), "request body is nested too deeply: more than 32 levels of arrays/objects "
                                "(a request is one flat JSON object)"),
    (dict(content=_nested(32)), "x: unknown field"),  # 32 deep passes the edge and meets the schema
])
def test_422_body(client, kwargs, message):
    param = "x" if message == "x: unknown field" else None
    assert_error(client.post("/v1/classify", headers=JSON, **kwargs), 422, message, param)
    assert_works(client)


def test_brackets_inside_strings_are_not_nesting(client):
    r = client.post("/v1/classify", json={"text": '"\\' + "[" * 100 + "{" * 100, "task": "sst2"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("framing, first, message", [
    ({"Content-Length": "100"}, b'{"text": ', "request body not received in full within 1 s; 9 of 100 bytes arrived"),
    ({"Transfer-Encoding": "chunked"}, b'9\r\n{"text": \r\n',
     "request body not received in full within 1 s; 9 bytes arrived"),
])
def test_408_body_never_arrives(gateway, client, framing, first, message):
    with connect(gateway) as s:
        start = time.monotonic()
        s.sendall(head("/v1/classify", {**KEY, **JSON, **framing}) + first)
        status, headers, body = read_response(s)
        elapsed = time.monotonic() - start
    check_error(status, headers, body, 408, message)
    assert headers["connection"] == "close"
    assert 0.9 <= elapsed < 5.0
    assert_works(client)


# -- 4. /v1/info's bridges; metrics labels; the docs' example ----------------------------------------------------

def test_info_lists_the_bridges_of_both_services(client):
    body = client.get("/v1/info").json()
    sender, receiver = body["sender"]["bridges"], body["receiver"]["bridges"]
    assert [b.split("-")[0] for b in sender] == ["ag_news", "sst2"]
    assert receiver == sender  # the same checkpoints on both sides: the ids match


def test_metrics_label_refusals_and_docs_with_their_route(gateway, client):
    with httpx.Client(base_url=gateway.url, timeout=30.0) as keyless:
        assert keyless.post("/v1/classify", json=SST2).status_code == 401
        assert keyless.get("/docs").status_code == 200 and keyless.get("/openapi.json").status_code == 200
        assert keyless.get("/no/such/route").status_code == 404
    assert client.post("/v1/compare", content=b"x" * (LIMIT + 1), headers=JSON).status_code == 413
    assert client.post("/v1/classify", content=b"{}", headers={"Content-Type": "text/plain"}).status_code == 415
    assert client.get("/v1/classify").status_code == 405
    text = client.get("/metrics").text
    for route, method, status in [("/v1/classify", "POST", 401), ("/v1/compare", "POST", 413),
                                  ("/v1/classify", "POST", 415), ("/v1/classify", "GET", 405),
                                  ("/docs", "GET", 200), ("/openapi.json", "GET", 200), ("unmatched", "GET", 404)]:
        assert f'telepathy_gateway_http_requests_total{{method="{method}",route="{route}",status="{status}"}}' in text
    unmatched = re.findall(r'telepathy_gateway_http_requests_total\{[^}]*route="unmatched",status="(\d+)"\}', text)
    assert unmatched and set(unmatched) == {"404"}  # "unmatched" is for real 404s only


def test_docs_example_shows_what_the_shipped_bridges_send():
    text = (ROOT / "docs/GATEWAY.md").read_text()
    meta = read_meta(ROOT / "bridge/bridges/smollm2-135m-instruct__gemma-3-270m/sst2")
    example = re.search(r'"wire_bytes": (\d+),\s*"request_id": "[^"]*", "bridge_id": "([^"]+)"', text)
    assert example, "no /v1/classify example in docs/GATEWAY.md"
    assert int(example.group(1)) == wire_nbytes("int8", meta.config.num_latents, meta.config.d_wire) == 544
    assert re.fullmatch(r"sst2-[0-9a-f]{8}", example.group(2))  # the id's shape (it changes with every retraining)


# -- 5. the documented statuses are the OpenAPI ones --------------------------------------------------------------

def documented_statuses() -> dict[str, set[int]]:
    """docs/GATEWAY.md's "Statuses by endpoint" table: endpoint → statuses (an empty endpoint cell continues the
    row above)."""
    section = (ROOT / "docs/GATEWAY.md").read_text().split("## Statuses by endpoint", 1)[1].split("\n## ", 1)[0]
    table: dict[str, set[int]] = {}
    current: list[str] = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3 or not cells[1].isdigit():
            continue
        if cells[0]:
            current = re.findall(r"`([A-Z]+ [^`]+)`", cells[0]) or [cells[0]]
        for endpoint in current:
            table.setdefault(endpoint, set()).add(int(cells[1]))
    return table


def test_documented_statuses_match_openapi(client):
    documented = documented_statuses()
    spec = client.get("/openapi.json").json()
    in_schema = {f"{method.upper()} {path}": {int(code) for code in op["responses"]}
                 for path, ops in spec["paths"].items() for method, op in ops.items()}
    assert set(in_schema) == {"POST /v1/classify", "POST /v1/compare", "GET /v1/tasks", "GET /v1/info",
                              "GET /healthz", "GET /readyz", "GET /metrics"}
    for endpoint, statuses in in_schema.items():
        assert documented.get(endpoint) == statuses, endpoint
    # Outside the schema: the docs themselves and requests no route takes; the table says what they answer.
    assert documented["GET /docs"] == documented["GET /openapi.json"] == {200, 500}
    assert documented["unknown route"] == {404, 405}
    every = set().union(*documented.values()) - {200}
    assert every == set(ERROR_TYPES)  # and each of them has an envelope type


def test_error_body_renders_whatever_the_message_quotes():
    """Defence in depth behind the field rules: a refusal that quotes a lone surrogate still encodes as UTF-8."""
    body = error_body(422, "x\ud800: bad", "x\ud800")
    assert body["error"]["message"] == "x\\ud800: bad" and body["error"]["param"] == "x\\ud800"
    json.dumps(body, ensure_ascii=False).encode("utf-8")
