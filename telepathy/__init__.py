"""Telepathy: two different LLMs talking through learned soft tokens.

One namespace, one job per room (docs/ARCHITECTURE.md):

    telepathy.contract          shared constants, defined once (torch-free)
    telepathy.config            the one settings mechanism: env vars, --config YAML/TOML, secrets from files
    telepathy.protos.v1         the gRPC contract (generated from protos/)
    telepathy.bridge            the ML core, no sockets: models, the bridge, codec, checkpoints, tasks;
                                bridge.runtime (eager and fast engines), bridge.training (train, eval, report)
    telepathy.serving           gRPC plumbing: server, channels, auth, errors, metrics, batcher, lifecycle
    telepathy.sender_service    the sender role        telepathy.receiver_service   the receiver role
    telepathy.pair_service      both roles in one process, the bridge path fused
    telepathy.gateway           the HTTP API            telepathy.client   the agent SDK
    telepathy.ops               serve, up, bench, healthcheck      telepathy.cli   the `telepathy` command
    telepathy.testing           the harness tests, examples and benchmarks use

Importing this package imports nothing heavy.
"""

from telepathy.contract import VERSION as __version__

__all__ = ["__version__"]
