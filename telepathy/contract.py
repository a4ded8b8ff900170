"""Constants the rooms share, each defined once. Torch-free and importing nothing of ours, so every layer —
the CLI parser, settings, the gateway image (no torch) and bridge/ itself — can read them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

VERSION = "0.1.0"  # the package version (pyproject reads it); services report it in Info and /v1/info

# The embedded default pair: a sender and a receiver of different families that ship as PyPI wheels.
DEFAULT_SENDER = "smollm2-135m-instruct"
DEFAULT_RECEIVER = "gemma-3-270m"

# Soft-token element types on the wire (bridge/codec.py encodes and decodes them; common.proto's DType enum).
WIRE_DTYPES: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")

# gRPC trailing-metadata key in which a service names the offending request field (the gateway reads it back
# to fill the HTTP error envelope's `field`).
FIELD_TRAILER = "telepathy-error-field"


def _package_folder(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # locates the folder without running the package's code
    assert spec is not None and spec.submodule_search_locations, name
    return Path(next(iter(spec.submodule_search_locations))).resolve()


# The bridge checkpoints installed with the package: one folder per task and model pair (bridge/bridges/).
SHIPPED_BRIDGES = _package_folder("telepathy.bridge") / "bridges"

# Edge limits on client-chosen identifiers (request_id, task, bridge_id, bridge_fingerprint) and on a soft-token
# tensor's rank. Error details travel in gRPC trailing metadata, which clients cap at a few KiB; identifiers that
# are echoed back (in answers and errors) must stay far below that. 256, not 128: the gateway accepts 128-character
# X-Request-IDs and passes `<id>:bridge` / `<id>:text` on to the sender.
MAX_ID_CHARS = 256
MAX_SHAPE_DIMS = 8
