"""The agent SDK beyond the blocking clients: asyncio gRPC clients, the HTTP gateway clients, retries through the
service config, and field errors as google.rpc.BadRequest — all against real services on loopback (tiny pair)."""

from __future__ import annotations

import asyncio
import threading
from concurrent import futures

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from telepathy.client import (
    AsyncGatewayClient,
    AsyncReceiverClient,
    AsyncSenderClient,
    ClientSettings,
    GatewayClient,
    GatewayError,
    ReceiverClient,
    SenderClient,
    bad_request,
    error_field,
)
from telepathy.contract import FIELD_TRAILER
from telepathy.gateway.settings import GatewaySettings
from telepathy.serving.channels import service_config
from telepathy.serving.errors import ServiceError, error_trailers
from telepathy.testing import GatewayThread
from tests.services_support import TIMEOUT, start_pair

TEXT = "a gripping , beautifully acted film"


@pytest.fixture(scope="module")
def pair(tiny_bridges_dir):
    service = start_pair(tiny_bridges_dir)
    yield service
    service.stop()


def test_async_clients_answer_like_the_blocking_ones(pair):
    with SenderClient(pair.address) as s, ReceiverClient(pair.address) as r:
        sync = (s.relay(TEXT, "sst2"), s.encode(TEXT, "sst2"), r.fingerprint("sst2"), [b.task for b in r.bridges()],
                s.info().model, r.classify_text(TEXT, "sst2").label, s.relay(TEXT, "sst2", path="text").path)
        sync_classified = r.classify(sync[1])

    async def run():
        async with AsyncSenderClient(pair.address) as s, AsyncReceiverClient(pair.address) as r:
            soft = await s.encode(TEXT, "sst2")
            return ((await s.relay(TEXT, "sst2"), soft, await r.fingerprint("sst2"), [b.task for b in await r.bridges()],
                     (await s.info()).model, (await r.classify_text(TEXT, "sst2")).label,
                     (await s.relay(TEXT, "sst2", path="text")).path), await r.classify(soft))

    got, classified = asyncio.run(run())
    assert got[0].label == sync[0].label and got[0].scores == pytest.approx(sync[0].scores, abs=1e-5)
    assert got[1].tokens == sync[1].tokens and got[1].fingerprint == sync[2] == got[2]
    assert got[3:] == sync[3:] and got[6] == "text"
    assert classified.scores == pytest.approx(sync_classified.scores, abs=1e-5)


def _unknown_task(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_field_errors_carry_a_standard_bad_request(pair):
    with SenderClient(pair.address) as s, ReceiverClient(pair.address) as r:
        for err in (_unknown_task(lambda: s.relay(TEXT, "nope", timeout=TIMEOUT)),
                    _unknown_task(lambda: r.classify_text(TEXT, "nope", timeout=TIMEOUT)),
                    _unknown_task(lambda: s.relay(" ", "sst2", timeout=TIMEOUT))):
            status = rpc_status.from_call(err)  # what any grpcio-status user reads; it checks code and message agree
            assert status is not None and status.code == err.code().value[0] and status.message == err.details()
            [detail] = status.details
            br = error_details_pb2.BadRequest()
            assert detail.Unpack(br)
            [violation] = br.field_violations
            assert violation.description == err.details()
            assert dict(err.trailing_metadata())[FIELD_TRAILER] == violation.field  # the old trailer stays
            assert bad_request(err) == {violation.field: err.details()} and error_field(err) == violation.field
        assert [error_field(e) for e in (_unknown_task(lambda: s.encode(TEXT, "nope")),)] == ["task"]

    async def aio_error():
        async with AsyncSenderClient(pair.address) as s:
            try:
                await s.encode(TEXT, "nope")
            except grpc.aio.AioRpcError as err:
                return err.code(), error_field(err), bad_request(err)

    code, field, violations = asyncio.run(aio_error())
    assert code == grpc.StatusCode.NOT_FOUND and field == "task" and set(violations) == {"task"}


def test_an_error_without_a_field_has_no_details():
    assert error_trailers(ServiceError(grpc.StatusCode.UNAVAILABLE, "draining")) == ()


def test_worst_case_error_trailers_fit_the_metadata_limit():
    err = ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "x: " + "é" * 5000, "f" * 5000)
    trailers = error_trailers(err)
    size = sum(len(k) + len(v) * (4 / 3 if isinstance(v, bytes) else 1) for k, v in trailers)  # -bin is base64
    size += len(err.message.encode()) * 3  # grpc-message, percent-encoded
    assert size < 8 * 1024  # gRPC's default max_metadata_size


class FlakyProxy:
    """A real gRPC server in front of a real service: the first `failures` calls of each method it is told to break
    are answered UNAVAILABLE, the others are forwarded byte for byte. Counts every attempt that reached it."""

    def __init__(self, target: str, failures: dict[str, int]):
        self.failures, self.attempts, self._lock = dict(failures), {}, threading.Lock()
        self._upstream = grpc.insecure_channel(target)
        self.server = grpc.server(futures.ThreadPoolExecutor(8), handlers=[self])
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def service(self, details):  # grpc.GenericRpcHandler
        method = details.method
        forward = self._upstream.unary_unary(method)

        def handle(request: bytes, context):
            name = method.rsplit("/", 1)[-1]
            with self._lock:
                self.attempts[name] = self.attempts.get(name, 0) + 1
                fail = self.failures.get(name, 0) > 0
                if fail:
                    self.failures[name] -= 1
            if fail:
                context.abort(grpc.StatusCode.UNAVAILABLE, "flaky proxy: try again")
            return forward(request, timeout=TIMEOUT, metadata=context.invocation_metadata())

        return grpc.unary_unary_rpc_method_handler(handle)

    def close(self):
        self.server.stop(0)
        self._upstream.close()


@pytest.fixture
def flaky(pair):
    made = []

    def make(**failures):
        made.append(FlakyProxy(pair.address, failures))
        return made[-1]

    yield make
    for proxy in made:
        proxy.close()


def test_idempotent_calls_are_retried_on_unavailable(flaky):
    proxy = flaky(Info=2, ListBridges=3, Classify=1, Encode=2, Generate=1)
    with SenderClient(proxy.address) as s, ReceiverClient(proxy.address) as r:
        assert s.info(timeout=TIMEOUT).model and r.fingerprint("sst2", timeout=TIMEOUT)
        soft = s.encode(TEXT, "sst2", timeout=TIMEOUT)
        assert r.classify(soft, timeout=TIMEOUT).label and isinstance(s.generate(TEXT, "sst2", timeout=TIMEOUT), str)
    assert proxy.attempts == {"Info": 3, "ListBridges": 4, "Classify": 2, "Encode": 3, "Generate": 2}


def test_retries_give_up_with_unavailable_after_the_attempts(flaky):
    proxy = flaky(Info=10)
    with SenderClient(proxy.address) as s:
        with pytest.raises(grpc.RpcError) as info:
            s.info(timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and info.value.details() == "flaky proxy: try again"
    assert proxy.attempts == {"Info": ClientSettings().retry_attempts} == {"Info": 4}


def test_relay_is_never_retried(flaky):
    proxy = flaky(Relay=1)
    with SenderClient(proxy.address) as s:
        with pytest.raises(grpc.RpcError) as info:
            s.relay(TEXT, "sst2", timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert s.relay(TEXT, "sst2", timeout=TIMEOUT).label  # the next one goes through
    assert proxy.attempts == {"Relay": 2}


def test_retries_can_be_turned_off_and_the_async_client_retries_too(flaky):
    proxy = flaky(Info=1, ListBridges=1)
    with SenderClient(proxy.address, ClientSettings(retry_attempts=1)) as s:
        with pytest.raises(grpc.RpcError) as info:
            s.info(timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and proxy.attempts == {"Info": 1}
    assert service_config(1) == "{}"

    async def run():
        async with AsyncReceiverClient(proxy.address) as r:
            return await r.bridges(timeout=TIMEOUT)

    assert asyncio.run(run()) and proxy.attempts["ListBridges"] == 2


def test_retry_attempts_setting_is_checked():
    assert ClientSettings.from_env({"TELEPATHY_CLIENT_RETRY_ATTEMPTS": "2"}).retry_attempts == 2
    with pytest.raises(Exception, match="TELEPATHY_CLIENT_RETRY_ATTEMPTS"):
        ClientSettings(retry_attempts=6)


@pytest.fixture(scope="module")
def gateway(pair):
    with GatewayThread(GatewaySettings(sender_addr=pair.address, port=0)) as gw:
        yield gw


def test_http_client_classifies_and_reports_errors(gateway, pair):
    with GatewayClient(gateway.url) as gw:
        r = gw.classify(TEXT, "sst2", request_id="req-1")
        assert r["task"] == "sst2" and set(r["scores"]) == {"negative", "positive"} and r["request_id"] == "req-1"
        assert r["path"] == "bridge" and gw.classify(TEXT, "sst2", "text")["path"] == "text"
        assert "sst2" in [t["name"] for t in gw.tasks()]
        assert gw.compare(TEXT, "sst2")["task"] == "sst2" and gw.info()["sender"]["address"] == pair.address
        with pytest.raises(GatewayError) as info:
            gw.classify(TEXT, "nope")
    err = info.value
    assert (err.status, err.type, err.param) == (404, "not_found_error", "task") and "nope" in err.message
    assert err.request_id


def test_async_http_client(gateway):
    async def run():
        async with AsyncGatewayClient(gateway.url) as gw:
            ok = await gw.classify(TEXT, "sst2")
            try:
                await gw.classify("", "sst2")
            except GatewayError as err:
                return ok, err

    ok, err = asyncio.run(run())
    assert ok["label"] in ok["scores"] and (err.status, err.param) == (422, "text")
