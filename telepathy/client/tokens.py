"""The token `telepathy up` leaves for a loopback port, which the SDK uses when the settings carry none."""

from __future__ import annotations

import os
from pathlib import Path

from telepathy.config import is_loopback


def up_token_path(port: int) -> Path:
    """Where `telepathy up` leaves the service token of the gRPC port it serves (mode 0600, removed on stop):
    $XDG_RUNTIME_DIR/telepathy/up-<port>.token, or ~/.cache/telepathy/up-<port>.token without XDG_RUNTIME_DIR."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "telepathy" if runtime else Path.home() / ".cache" / "telepathy"
    return base / f"up-{port}.token"


def _loopback_port(address: str) -> int | None:
    """The port of a single loopback target ("127.0.0.1:50051", "[::1]:50051", "dns:///localhost:50051"), else None."""
    target = address.strip()
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme):]
            break
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not is_loopback(host):
        return None
    return int(port)


def read_up_token(address: str) -> str:
    """The token `telepathy up` left for `address`; "" when the address is not loopback or there is none.

    Only a file owned by this user and unreadable by anyone else counts: any other file is not one `up` wrote,
    and a token planted by someone else must not be sent along."""
    port = _loopback_port(address)
    if port is None:
        return ""
    try:
        fd = os.open(up_token_path(port), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return ""
    with os.fdopen(fd, encoding="ascii", errors="replace") as f:
        st = os.fstat(f.fileno())
        if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o077):
            return ""
        return f.read(4096).strip()
