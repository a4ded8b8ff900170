"""`telepathy serve sender|receiver|pair`: run one service until SIGTERM/SIGINT, then drain and exit 0.

`pair` runs the sender and the receiver in one process (pair_service): both gRPC services on one port, the
bridge path in one model call. Use it when both models share a GPU (or two GPUs of one host).

Every option also reads an environment variable (table in docs/SERVICES.md). Priority: options > environment
variables > the --config FILE (YAML/TOML/JSON, keys are setting names; or TELEPATHY_CONFIG) > secret files in
--secrets-dir DIR (one per variable, e.g. DIR/TELEPATHY_AUTH_TOKEN; or TELEPATHY_SECRETS_DIR) > defaults.
The auth token has no option (a command line is visible to every user of the machine): TELEPATHY_AUTH_TOKEN,
the config file or a secret file.
Exit codes: 0 after a clean drain, 2 for invalid settings, 1 when the service fails to start (e.g. a loaded bridge
carries a task that differs from a built-in task, or from another bridge's, of the same name).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import typing

from telepathy.bridge.tasks import TaskConflictError, TaskFileError
from telepathy.config import CONFIG_ENV, SECRETS_DIR_ENV, SettingsError, env_name, from_sources, option_name
from telepathy.pair_service.settings import PairSettings
from telepathy.receiver_service.settings import ReceiverSettings
from telepathy.sender_service.settings import SenderSettings

log = logging.getLogger(__name__)
ENV_ONLY = {"auth_token"}
ROLES = {"sender": SenderSettings, "receiver": ReceiverSettings, "pair": PairSettings}


def _option_fields():
    """(name, type, help, env var, {role: default}) for every setting of any role, in declaration order."""
    seen: dict[str, tuple] = {}
    for role, cls in ROLES.items():
        for name, info in cls.model_fields.items():
            if name in ENV_ONLY:
                continue
            entry = seen.setdefault(name, (name, info.annotation, info.description or "", env_name(cls, name), {}))
            entry[4][role] = info.default
    return list(seen.values())


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the sender or receiver gRPC service, or both in one process (pair)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("role", choices=list(ROLES), help="which service to run")
    p.add_argument("--config", metavar="FILE", default=None,
                   help=f"YAML, TOML or JSON file of settings, keys as the option names with underscores "
                        f"(max_batch_size: 8); below options and env vars (env {CONFIG_ENV})")
    p.add_argument("--secrets-dir", metavar="DIR", default=None,
                   help=f"folder of secret files named like the variables, e.g. DIR/TELEPATHY_AUTH_TOKEN; below the "
                        f"config file (env {SECRETS_DIR_ENV}; default: off)")
    for name, typ, help, env, defaults in _option_fields():
        values = {", ".join(d) if isinstance(d, tuple) else str(d) for d in defaults.values()}
        default = next(iter(values)) if len(values) == 1 else ", ".join(f"{r} {d}" for r, d in defaults.items())
        only = "" if len(defaults) == len(ROLES) else f"{' and '.join(defaults)} only; "
        help_text = f"{help} ({only}env {env}; default: {default or 'none'})"
        if typ is bool:
            p.add_argument(option_name(name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(typ) is tuple:  # repeatable: --task-files a.yaml --task-files b.yaml
            p.add_argument(option_name(name), action="append", default=None, help=help_text, metavar="FILE")
        else:
            p.add_argument(option_name(name), type=typ, default=None, help=help_text,
                           metavar=name.upper() if typ is str else typ.__name__.upper())
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    cls = ROLES[args.role]
    names = set(cls.model_fields)
    foreign = [option_name(name) for name, *_ in _option_fields() if name not in names and getattr(args, name) is not None]
    if foreign:
        print(f"telepathy serve {args.role}: {', '.join(foreign)} {'does' if len(foreign) == 1 else 'do'} not apply to this role", file=sys.stderr)
        return 2
    try:
        settings = from_sources(cls, {n: getattr(args, n, None) for n in names if n not in ENV_ONLY},
                                config_file=args.config, secrets_dir=args.secrets_dir)
    except SettingsError as exc:
        print(f"telepathy serve {args.role}: {exc}", file=sys.stderr)
        return 2
    if settings.log_format != "text":
        from telepathy.serving import logs

        logs.configure(settings.log_format)
    return asyncio.run(run_service(args.role, settings))


async def run_service(role: str, settings) -> int:
    """Start the service, wait for SIGTERM/SIGINT, drain. Runs the whole life of `telepathy serve`."""
    if role == "sender":
        from telepathy.sender_service.app import build_sender as build
    elif role == "pair":
        from telepathy.pair_service.app import build_pair as build
    else:
        from telepathy.receiver_service.app import build_receiver as build
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        service = build(settings)
    except SettingsError as exc:  # e.g. tracing on without the [tracing] extra
        print(f"telepathy serve {role}: {exc}", file=sys.stderr)
        return 2
    starting = asyncio.create_task(service.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # signalled while loading: nothing in flight to drain
        log.info("%s: stop requested during start-up", role)
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        service.executor.shutdown(wait=False, cancel_futures=True)
        return 0
    if starting.exception() is not None:
        exc = starting.exception()
        stopping.cancel()
        if isinstance(exc, SettingsError):
            print(f"telepathy serve {role}: {exc}", file=sys.stderr)
            return 2
        # A task conflict or a bad task file is the deployment's files, not a bug: its one-line message, no traceback.
        known = isinstance(exc, (TaskConflictError, TaskFileError))
        log.error("%s failed to start: %s", role, exc, exc_info=None if known else exc)
        return 1
    await stopping
    await service.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m telepathy.ops.serve sender|receiver …` = `telepathy serve …` without the top-level CLI."""
    parser = argparse.ArgumentParser(prog="python -m telepathy.ops.serve")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
