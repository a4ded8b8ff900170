"""`telepathy gateway | up | bench | healthcheck` (registered in telepathy.cli.COMMANDS).

Imports of heavy modules happen inside the handlers: `telepathy --help` must stay fast and torch-free.
"""

from __future__ import annotations

import argparse
import os
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    from telepathy.gateway import settings as gw_settings

    # -- gateway ---------------------------------------------------------------------------------------------
    p = subparsers.add_parser("gateway", help="serve the HTTP gateway alone (uvicorn) in front of a running sender",
                              description="Serve the FastAPI gateway. Settings: flags > TELEPATHY_* env vars > the "
                                          "--config file > secret files (--secrets-dir) > defaults. API keys, the "
                                          "service token and TLS files have no flags (argv is visible to every user): "
                                          "TELEPATHY_API_KEYS, TELEPATHY_AUTH_TOKEN, TELEPATHY_TLS_*, or the same "
                                          "names as files in the secrets dir (keys in the config file).")
    gw_settings.add_arguments(p)
    p.add_argument("--access-log", dest="access_log", action="store_true", default=True,
                   help="log every request (default)")
    p.add_argument("--no-access-log", dest="access_log", action="store_false", help="do not log every request")
    p.set_defaults(func=_gateway)

    # -- up --------------------------------------------------------------------------------------------------
    # torch-free copies of bridge.models' defaults: the gateway image has no torch (nor filelock, which
    # bridge.embedded needs), and `telepathy --help` must work there.
    from telepathy.receiver_service.settings import DEFAULT_RECEIVER
    from telepathy.sender_service.settings import DEFAULT_SENDER

    p = subparsers.add_parser("up", help="run receiver, sender and gateway locally until Ctrl-C (`make up`)",
                              description="Start the receiver, the sender and the gateway as local processes on "
                                          "loopback, wait until /readyz is 200, stream their logs, stop all on "
                                          "Ctrl-C / SIGTERM.")
    p.add_argument("--port", type=int, default=8000, help="gateway HTTP port (default 8000)")
    p.add_argument("--sender-model", default=DEFAULT_SENDER, help=f"sender model spec (default {DEFAULT_SENDER})")
    p.add_argument("--receiver-model", default=DEFAULT_RECEIVER, help=f"receiver model spec (default {DEFAULT_RECEIVER})")
    p.add_argument("--bridges", default=None, help="bridge checkpoints folder (default: the shipped bridges)")
    p.add_argument("--sender-port", type=int, default=50051, help="sender gRPC port (default 50051)")
    p.add_argument("--receiver-port", type=int, default=50052, help="receiver gRPC port (default 50052)")
    p.add_argument("--device", default="", help="cpu, cuda, cuda:N (default: each service's default)")
    p.add_argument("--startup-timeout-s", type=float, default=900.0, help="give up if not ready after this long")
    p.add_argument("--access-log", action="store_true", help="log every gateway request")
    p.add_argument("--pair", action="store_true",
                   help="one `telepathy serve pair` process (both models, on --sender-port) instead of two services")
    p.set_defaults(func=_up)

    # -- bench -----------------------------------------------------------------------------------------------
    p = subparsers.add_parser("bench", help="latency benchmark of a running gateway: bridge vs text path",
                              description="Drive the gateway with real test texts; report p50/p95/p99/mean latency, "
                                          "throughput, errors and the bridge-vs-text speed-up; write JSON (+ a CDF plot). "
                                          "An API key, when the gateway needs one, comes from TELEPATHY_API_KEY.")
    p.add_argument("--url", default=os.environ.get("TELEPATHY_GATEWAY_URL", "http://127.0.0.1:8000"),
                   help="gateway base URL [$TELEPATHY_GATEWAY_URL, http://127.0.0.1:8000]")
    p.add_argument("--task", default="", help="a built-in task's name or the path of a task file, asked for by its "
                                               "name (default: the first built-in task)")
    p.add_argument("--requests", type=int, default=100, help="measured requests per path (default 100)")
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight (default 1: batch-1 latency)")
    p.add_argument("--paths", default="bridge,text", help="comma-separated paths, run one after the other")
    p.add_argument("--texts", default="", help="JSONL ({'text', 'label'?}) or one text per line; "
                                               "default: the task's test split")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured requests per path first (default 5)")
    p.add_argument("--timeout-s", type=float, default=60.0, help="per-request client timeout")
    p.add_argument("--out", required=True, help="JSON report path")
    p.add_argument("--plot", default="", help="latency CDF PNG path")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_bench)

    # -- healthcheck -----------------------------------------------------------------------------------------
    p = subparsers.add_parser("healthcheck", help="probe the gateway (HTTP) or a service (grpc.health.v1); exit 0/1",
                              description="For docker HEALTHCHECK and scripts. --http URL: 200 → exit 0 (a URL "
                                          "without a path probes /readyz). --grpc HOST:PORT: SERVING → exit 0; uses "
                                          "TELEPATHY_AUTH_TOKEN and TELEPATHY_TLS_* like the services do.")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--http", metavar="URL", help="gateway URL, e.g. http://127.0.0.1:8000 or …/healthz")
    target.add_argument("--grpc", metavar="HOST:PORT", help="a sender or receiver, e.g. 127.0.0.1:50051")
    p.add_argument("--service", default="", help="grpc.health.v1 service name (default '': the whole server)")
    p.add_argument("--timeout-s", type=float, default=3.0, help="probe deadline (default 3)")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    p.set_defaults(func=_healthcheck)


def _gateway(args: argparse.Namespace) -> int:
    import uvicorn

    from telepathy.gateway.app import build_app
    from telepathy.gateway.settings import GatewaySettings

    try:
        settings = GatewaySettings.from_args(args)
        app = build_app(settings)  # tracing on without the [tracing] extra is a SettingsError too
    except ValueError as exc:  # SettingsError: names the flag, variable or config entry to fix
        print(f"gateway: invalid settings: {exc}", file=sys.stderr)
        return 2
    extra = {}
    if settings.log_format == "json":  # uvicorn's loggers then propagate to the root logger, JSON like ours
        from telepathy.serving import logs

        logs.configure("json", settings.log_level.upper())
        extra["log_config"] = None
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                access_log=args.access_log, timeout_graceful_shutdown=settings.graceful_shutdown_s, **extra)
    return 0


def _up(args: argparse.Namespace) -> int:
    from telepathy.ops.up import UpConfig, up

    _quiet_http_client_logs()  # the readiness poll would log a line every half second
    try:
        config = UpConfig(port=args.port, sender_model=args.sender_model, receiver_model=args.receiver_model,
                          sender_port=args.sender_port, receiver_port=args.receiver_port, device=args.device,
                          startup_timeout_s=args.startup_timeout_s, access_log=args.access_log, pair=args.pair,
                          **({"bridges": args.bridges} if args.bridges else {}))
    except ValueError as exc:
        print(f"up: {exc}", file=sys.stderr)
        return 2
    return up(config)


def _quiet_http_client_logs() -> None:
    import logging

    # httpx logs every request at INFO: thousands of lines on a bench run, noise in a health probe.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _bench(args: argparse.Namespace) -> int:
    from telepathy.bridge.tasks import UnknownTaskError
    from telepathy.ops.bench import BenchConfig, format_report, run_bench

    _quiet_http_client_logs()
    try:
        cfg = BenchConfig(url=args.url, task=args.task, requests=args.requests, concurrency=args.concurrency,
                          paths=args.paths, texts_file=args.texts, warmup=args.warmup, timeout_s=args.timeout_s,
                          api_key=os.environ.get("TELEPATHY_API_KEY", ""), progress=not args.no_progress)
        report = run_bench(cfg, args.out, args.plot or None)
    except (UnknownTaskError, ValueError) as exc:  # a bad task, task file or texts file: a usage error
        print(f"telepathy bench: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # gateway not ready
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    print(format_report(report))
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    # Non-zero when a path got no answer at all: a benchmark of nothing must not look like a success in scripts.
    return 1 if any(p["ok"] == 0 for p in report["paths"].values()) else 0


def _healthcheck(args: argparse.Namespace) -> int:
    from telepathy.ops.healthcheck import check_grpc, check_http

    _quiet_http_client_logs()
    if args.http:
        ok, detail = check_http(args.http, args.timeout_s, api_key=os.environ.get("TELEPATHY_API_KEY", ""))
    else:
        ok, detail = check_grpc(args.grpc, args.service, args.timeout_s)
    if not args.quiet:
        print(("healthy: " if ok else "unhealthy: ") + detail)
    return 0 if ok else 1
