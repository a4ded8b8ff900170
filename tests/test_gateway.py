"""The HTTP gateway end to end: httpx → uvicorn (loopback, ephemeral port) → real sender → real receiver.

The services run in-process (telepathy.testing.ServiceThread) with the tiny random pair and untrained bridges for
sst2 and ag_news only, so that trec exercises "no bridge for this task" on the bridge path while its text path
works. Both services require a service token, as in a deployment. Every error status the gateway documents is
produced for real here, checked for its exact status, envelope and message, and followed by a request that works.
"""

from __future__ import annotations

import asyncio
import re
import socket

import httpx
import pytest

from telepathy.bridge.models import TINY_RECEIVER, TINY_SENDER
from telepathy.cli import main
from telepathy.gateway.settings import GatewaySettings
from telepathy.receiver_service.app import build_receiver
from telepathy.receiver_service.settings import ReceiverSettings
from telepathy.sender_service.app import build_sender
from telepathy.sender_service.settings import SenderSettings
from telepathy.testing import GatewayThread, ServiceThread, make_untrained_bridges

TOKEN = "gateway-test-token"
SENDER_MAX_TEXT = 2000  # below the gateway's 4000: texts in between reach the sender and come back INVALID_ARGUMENT
SST2 = {"text": "a gripping , beautifully acted film", "task": "sst2"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_sender, tiny_receiver):
    bridges = make_untrained_bridges(tmp_path_factory.mktemp("gw-bridges"), tiny_sender, tiny_receiver,
                                     tasks=["sst2", "ag_news"], sender_layer=2)
    common = dict(bridges=str(bridges), port=0, max_batch_size=4, grace_s=1.0, auth_token=TOKEN)
    receiver = ServiceThread(lambda: build_receiver(ReceiverSettings(model=TINY_RECEIVER, **common), tiny_receiver),
                             "receiver").start()
    sender = ServiceThread(lambda: build_sender(SenderSettings(
        model=TINY_SENDER, receiver_addr=receiver.address, max_text_chars=SENDER_MAX_TEXT, max_relay_tokens=8,
        **common), tiny_sender), "sender").start()
    yield sender, receiver
    sender.stop()
    receiver.stop()


def _gateway(stack, **overrides) -> GatewayThread:
    sender, receiver = stack
    values = dict(port=0, sender_addr=sender.address, receiver_addr=receiver.address, auth_token=TOKEN)
    values.update(overrides)
    return GatewayThread(GatewaySettings(**values)).start()


@pytest.fixture(scope="module")
def gateway(stack):
    gw = _gateway(stack)
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def client(gateway):
    with httpx.Client(base_url=gateway.url, timeout=30.0) as c:
        yield c


def assert_error(r: httpx.Response, status: int, type_: str, message: str | re.Pattern, param: str | None = None):
    """Exact status, the one envelope (nothing else in it), the message, the param, and a request id header."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "param"}, body
    assert body["error"]["type"] == type_
    if isinstance(message, re.Pattern):
        assert message.search(body["error"]["message"]), body
    else:
        assert body["error"]["message"] == message
    assert body["error"]["param"] == param
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])


def assert_works(c: httpx.Client, headers: dict | None = None) -> None:
    r = c.post("/v1/classify", json=SST2, headers=headers or {})
    assert r.status_code == 200, r.text
    assert r.json()["label"] in ("negative", "positive")


# -- the happy paths --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["bridge", "text"])
def test_classify(client, path):
    r = client.post("/v1/classify", json={**SST2, "path": path})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"task", "label", "scores", "path", "timings_ms", "wire_bytes", "request_id"}
    assert body["task"] == "sst2" and body["path"] == path
    assert list(body["scores"]) == ["negative", "positive"]  # every label, in label order
    assert abs(sum(body["scores"].values()) - 1.0) < 1e-4
    assert body["label"] == max(body["scores"], key=body["scores"].get)
    t = body["timings_ms"]
    assert set(t) == {"sender", "wire", "receiver", "total"}
    assert t["sender"] > 0 and t["receiver"] > 0 and t["wire"] >= 0
    assert t["total"] >= t["sender"] + t["receiver"] - 0.01  # the gateway's wall time covers both services
    assert body["wire_bytes"] > 0
    assert body["request_id"] == r.headers["x-request-id"]
    if path == "bridge":
        assert body["bridge_id"].startswith("sst2-") and body["relay_text"] is None
        assert body["wire_bytes"] == 4 * 16 + 4 * 4  # int8 wire: K=4 tokens × d_wire=16 bytes + 4 fp32 scales
    else:
        assert body["bridge_id"] is None and isinstance(body["relay_text"], str)
        assert body["wire_bytes"] == len(body["relay_text"].encode())


def test_path_defaults_to_bridge(client):
    r = client.post("/v1/classify", json=SST2)
    assert r.status_code == 200 and r.json()["path"] == "bridge"


def test_request_id_header_is_kept_when_sane_and_replaced_otherwise(client):
    r = client.post("/v1/classify", json=SST2, headers={"X-Request-ID": "client-trace-42"})
    assert r.headers["x-request-id"] == "client-trace-42" and r.json()["request_id"] == "client-trace-42"
    r = client.post("/v1/classify", json=SST2, headers={"X-Request-ID": "no spaces or newlines please!"})
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"]) and r.json()["request_id"] == r.headers["x-request-id"]
    for path in ("/healthz", "/readyz", "/metrics", "/v1/tasks", "/nope"):  # every response carries one
        assert client.get(path).headers["x-request-id"]


def test_compare(client):
    r = client.post("/v1/compare", json={"text": "who invented the telephone ?", "task": "ag_news"},
                    headers={"X-Request-ID": "cmp-1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["bridge"]["path"] == "bridge" and body["text"]["path"] == "text"
    assert body["request_id"] == body["bridge"]["request_id"] == body["text"]["request_id"] == "cmp-1"
    assert body["speedup"] == pytest.approx(body["text"]["timings_ms"]["total"] / body["bridge"]["timings_ms"]["total"], rel=1e-2)
    assert body["wire_ratio"] == pytest.approx(body["text"]["wire_bytes"] / body["bridge"]["wire_bytes"], rel=1e-2)
    assert body["agree"] == (body["bridge"]["label"] == body["text"]["label"])


def test_tasks(client):
    r = client.get("/v1/tasks")
    assert r.status_code == 200
    tasks = {t["name"]: t for t in r.json()["tasks"]}
    assert tasks["sst2"] == {"name": "sst2", "labels": ["negative", "positive"], "bridge": True}
    assert tasks["ag_news"]["labels"] == ["World", "Sports", "Business", "Sci/Tech"]
    assert tasks["trec"]["bridge"] is False


def test_info(client, stack):
    body = client.get("/v1/info").json()
    assert body["sender"]["model"] == TINY_SENDER and body["receiver"]["model"] == TINY_RECEIVER
    assert body["sender"]["status"] == body["receiver"]["status"] == "SERVING"
    assert body["sender"]["address"] == stack[0].address and body["sender"]["device"] == "cpu"


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "services": {"sender": "SERVING", "receiver": "SERVING", "link": "CONNECTED"}}


def test_metrics(client):
    client.post("/v1/classify", json=SST2)
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'telepathy_gateway_http_requests_total{method="POST",route="/v1/classify",status="200"}' in text
    assert 'telepathy_gateway_stage_seconds_count{path="bridge",stage="receiver"}' in text
    assert "telepathy_gateway_in_flight 0.0" in text
    assert "python_gc_objects_collected_total" not in text  # our own registry, not the process-global default one


def test_openapi_docs(client):
    r = client.get("/docs")
    assert r.status_code == 200 and "swagger" in r.text.lower()
    spec = client.get("/openapi.json").json()
    assert {"/v1/classify", "/v1/compare", "/v1/tasks", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    assert "ErrorResponse" in spec["components"]["schemas"]


# -- 422 ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message, param", [
    (dict(json={"text": "", "task": "sst2"}), "text: must not be empty or whitespace", "text"),
    (dict(json={"text": " \n\t ", "task": "sst2"}), "text: must not be empty or whitespace", "text"),
    (dict(json={"task": "sst2"}), "text: field required", "text"),
    (dict(json={"text": "hi"}), "task: field required", "task"),
    (dict(json={"text": 5, "task": "sst2"}), "text: Input should be a valid string", "text"),
    (dict(json={**SST2, "path": "telepathy"}), "path: Input should be 'bridge' or 'text'", "path"),
    (dict(json={**SST2, "paht": "text"}), "paht: unknown field", "paht"),
    (dict(content=b'{"text": ', headers={"content-type": "application/json"}),
     re.compile(r"^request body is not valid JSON: "), None),
    (dict(json=["not", "an", "object"]), "request body must be a JSON object with text and task, got an array", None),
])
def test_422_invalid_body(client, kwargs, message, param):
    assert_error(client.post("/v1/classify", **kwargs), 422, "invalid_request_error", message, param)
    assert_works(client)


def test_422_from_the_sender_is_passed_on(client):
    """The sender's own limit (2000 chars here) is below the gateway's: its INVALID_ARGUMENT becomes our 422."""
    r = client.post("/v1/classify", json={"text": "word " * 500, "task": "sst2"})
    assert_error(r, 422, "invalid_request_error", re.compile(r"^text: .*2000"), "text")
    assert_works(client)


# -- 404 ---------------------------------------------------------------------------------------------------------

def test_404_unknown_task(client):
    """The gateway knows no task: the sender's NOT_FOUND, its message listing the tasks the sender serves."""
    message = "task: unknown task 'imdb'; known tasks: ag_news, sst2, trec"
    for path in ("bridge", "text"):
        r = client.post("/v1/classify", json={"text": "hello", "task": "imdb", "path": path})
        assert_error(r, 404, "not_found_error", message, "task")
    r = client.post("/v1/compare", json={"text": "hello", "task": "imdb"})
    assert_error(r, 404, "not_found_error", message, "task")
    assert_works(client)


def test_404_no_bridge_for_task_but_text_path_works(client):
    q = {"text": "what is the capital of australia ?", "task": "trec"}
    r = client.post("/v1/classify", json={**q, "path": "bridge"})
    assert_error(r, 404, "not_found_error", re.compile(r"no bridge is loaded for task 'trec'"), "task")
    r = client.post("/v1/classify", json={**q, "path": "text"})
    assert r.status_code == 200 and r.json()["label"] in ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")


def test_404_unknown_route(client):
    assert_error(client.get("/v2/classify"), 404, "not_found_error", "no route GET /v2/classify")
    assert_error(client.get("/v1/classify"), 405, "invalid_request_error",
                 "method GET is not allowed on /v1/classify; allowed: POST")
    assert_works(client)


# -- 413 ---------------------------------------------------------------------------------------------------------

def test_413_text_over_the_limit(client):
    r = client.post("/v1/classify", json={"text": "x" * 4001, "task": "sst2"})
    assert_error(r, 413, "request_too_large", "text is 4001 characters; the limit is 4000", "text")
    r = client.post("/v1/compare", json={"text": "x" * 4001, "task": "sst2"})
    assert_error(r, 413, "request_too_large", "text is 4001 characters; the limit is 4000", "text")
    assert_works(client)


def test_413_body_refused_unread(client):
    limit = 4 * 4000 + 64 * 1024
    r = client.post("/v1/classify", content=b"x" * (limit + 1), headers={"content-type": "application/json"})
    assert_error(r, 413, "request_too_large", f"request body is {limit + 1} bytes; the limit is {limit}")
    assert_works(client)


# -- 401 ---------------------------------------------------------------------------------------------------------

def test_401_api_keys(stack):
    with _gateway(stack, api_keys=("key-one", "key-two")) as gw, httpx.Client(base_url=gw.url, timeout=30.0) as c:
        r = c.post("/v1/classify", json=SST2)
        assert_error(r, 401, "authentication_error",
                     "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
        assert r.headers["www-authenticate"] == "Bearer"
        assert_error(c.post("/v1/classify", json=SST2, headers={"Authorization": "Bearer nope"}), 401,
                     "authentication_error", "invalid API key")
        assert_error(c.get("/v1/tasks", headers={"X-API-Key": "nope"}), 401, "authentication_error", "invalid API key")
        assert_works(c, {"Authorization": "Bearer key-two"})
        assert_works(c, {"X-API-Key": "key-one"})
        # Probes and metrics stay open: kubelet and Prometheus hold no API key.
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert c.get("/metrics").status_code == 200


# -- 429 ---------------------------------------------------------------------------------------------------------

def test_429_concurrency_limit(stack):
    with _gateway(stack, max_concurrency=1) as gw:
        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=gw.url, timeout=30.0) as c:
                body = {**SST2, "path": "text"}
                return await asyncio.gather(*(c.post("/v1/classify", json=body) for _ in range(8)))

        responses = asyncio.run(burst())
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) == {200, 429}, statuses
        refused = next(r for r in responses if r.status_code == 429)
        assert_error(refused, 429, "overloaded_error", "too many requests in flight (limit 1); retry later")
        assert refused.headers["retry-after"] == "1"
        with httpx.Client(base_url=gw.url, timeout=30.0) as c:
            assert_works(c)  # the slot was released
            assert 'telepathy_gateway_http_requests_total{method="POST",route="/v1/classify",status="429"}' in c.get("/metrics").text


# -- 502 / 503 / 504 ---------------------------------------------------------------------------------------------

def test_502_wrong_service_token(stack, client):
    """The sender refuses the gateway's token: a deployment error, not the HTTP client's: 502, no details."""
    with _gateway(stack, auth_token="not-the-token") as gw, httpx.Client(base_url=gw.url, timeout=30.0) as c:
        r = c.post("/v1/classify", json=SST2)
        assert_error(r, 502, "upstream_error",
                     "the sender service failed (UNAUTHENTICATED); see the gateway log for details")
        # Health is open by design (no token), but Sender.Info is not: readiness notices the bad token.
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["services"] == {"sender": "SERVING", "receiver": "SERVING", "link": "UNAUTHENTICATED"}
    assert_works(client)


def test_503_sender_unreachable(stack, client):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    with _gateway(stack, sender_addr=dead, receiver_addr=dead) as gw, httpx.Client(base_url=gw.url, timeout=30.0) as c:
        r = c.post("/v1/classify", json=SST2)
        assert_error(r, 503, "service_unavailable", "the sender service is unavailable; retry later")
        assert r.headers["retry-after"] == "1"
        r = c.get("/readyz")
        assert r.status_code == 503
        assert r.json()["error"] == {"type": "service_unavailable", "param": None,
                                     "message": "not ready: sender UNAVAILABLE, receiver UNAVAILABLE, link UNAVAILABLE"}
        assert r.json()["services"] == {"sender": "UNAVAILABLE", "receiver": "UNAVAILABLE", "link": "UNAVAILABLE"}
        # The gateway knows no task of its own: without the sender there is no list, only the sender's status.
        r = c.get("/v1/tasks")
        assert_error(r, 503, "service_unavailable", "the sender service is unavailable; retry later")
        assert r.headers["retry-after"] == "1"
    assert_works(client)


def test_504_deadline(stack, client):
    with _gateway(stack, request_timeout_s=0.001) as gw, httpx.Client(base_url=gw.url, timeout=30.0) as c:
        for path in ("bridge", "text"):
            r = c.post("/v1/classify", json={**SST2, "path": path})
            assert_error(r, 504, "timeout_error",
                         "deadline exceeded: the request did not finish within the gateway's budget")
        assert c.get("/readyz").status_code == 200  # probes have their own deadline
    with _gateway(stack, probe_timeout_s=1e-4) as gw, httpx.Client(base_url=gw.url, timeout=30.0) as c:
        assert_error(c.get("/v1/tasks"), 504, "timeout_error",  # /v1/tasks asks the sender within the probe deadline
                     "deadline exceeded: the request did not finish within the gateway's budget")
    assert_works(client)


# -- telepathy healthcheck (docker HEALTHCHECK) ------------------------------------------------------------------

def test_healthcheck_command(stack, gateway, capsys):
    sender, receiver = stack
    assert main(["healthcheck", "--http", gateway.url]) == 0  # bare URL → /readyz
    assert "healthy: " + gateway.url + "/readyz: HTTP 200" in capsys.readouterr().out
    assert main(["healthcheck", "--http", gateway.url + "/healthz", "--quiet"]) == 0
    assert main(["healthcheck", "--grpc", sender.address]) == 0
    assert main(["healthcheck", "--grpc", receiver.address, "--service", "telepathy.v1.Receiver"]) == 0
    assert "SERVING" in capsys.readouterr().out
    assert main(["healthcheck", "--grpc", receiver.address, "--service", "no.such.Service"]) == 1
    assert main(["healthcheck", "--http", gateway.url + "/v1/nope"]) == 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    assert main(["healthcheck", "--grpc", f"127.0.0.1:{dead}", "--timeout-s", "1"]) == 1
    assert main(["healthcheck", "--http", f"http://127.0.0.1:{dead}", "--timeout-s", "1"]) == 1
    assert "unhealthy: " in capsys.readouterr().out
