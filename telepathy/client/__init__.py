"""Python clients for agents: talk to a sender with text, or to a receiver with your own soft tokens.

    from telepathy.client import SenderClient, ReceiverClient

    with SenderClient("127.0.0.1:50051") as sender, ReceiverClient("127.0.0.1:50052") as receiver:
        print(sender.relay("the match went to extra time", task="ag_news").label)     # full round trip
        soft = sender.encode("the match went to extra time", task="ag_news")           # SoftTokens, no receiver
        print(receiver.classify(soft).scores)                                          # another agent reads them
        print(receiver.classify_latents(my_latents, task="ag_news", fingerprint=fp))   # an agent's own encoder

    async with AsyncSenderClient("127.0.0.1:50051") as sender:                         # the same methods, grpc.aio
        print((await sender.relay("the match went to extra time", task="ag_news")).label)

    with GatewayClient("http://127.0.0.1:8000") as gw:                                 # the HTTP gateway (httpx)
        print(gw.classify("the match went to extra time", task="ag_news")["label"])

SenderClient/ReceiverClient block (one sync gRPC channel per client; thread-safe); AsyncSenderClient/
AsyncReceiverClient are made inside the event loop that uses them. Token / TLS / retries come from ClientSettings
(by default from the environment: TELEPATHY_AUTH_TOKEN, TELEPATHY_TLS_CA, TELEPATHY_CLIENT_RETRY_ATTEMPTS, …). With
no token there and a loopback address, the token `telepathy up` left for that port is used (see up_token_path), so a
script on the same machine needs no configuration. Every call has a deadline (`timeout`, else settings.timeout_s);
idempotent calls answered UNAVAILABLE are retried by gRPC within it (serving/channels.py RETRIED_METHODS; not
relay). Errors are grpc.RpcError: `.code()` is the status, `.details()` the message, `error_field(err)` the request
field it names and `bad_request(err)` its google.rpc.BadRequest as {field: description}.
"""

from telepathy.client.http import AsyncGatewayClient, GatewayClient, GatewayError
from telepathy.client.rpc import (
    AsyncReceiverClient,
    AsyncSenderClient,
    ReceiverClient,
    SenderClient,
    bad_request,
    error_field,
)
from telepathy.client.tokens import read_up_token, up_token_path
from telepathy.client.types import Classification, RelayResult, SoftTokens
from telepathy.serving.channels import ClientSettings

__all__ = ["AsyncGatewayClient", "AsyncReceiverClient", "AsyncSenderClient", "Classification", "ClientSettings",
           "GatewayClient", "GatewayError", "ReceiverClient", "RelayResult", "SenderClient", "SoftTokens",
           "bad_request", "error_field", "read_up_token", "up_token_path"]
