"""Service settings: one dataclass per component, commented defaults, validated in __post_init__.

Values come from, in order: CLI arguments, environment variables (each field names its own in
`metadata["env"]`), the dataclass default. `from_sources(cls, cli, env)` does the merge; `env_vars(cls)`
lists the variables (docs/SERVICES.md holds the table and a test checks that it names every one).

This module must stay torch-free: `telepathy --help` and the gateway import it.
"""

from __future__ import annotations

import ipaddress
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, TypeVar

from telepathy.contract import SHIPPED_BRIDGES

MiB = 1 << 20
DEVICES = ("auto", "cpu", "cuda")
MODEL_DTYPES = ("auto", "fp32", "fp16", "bf16")
FAST_PATH_MODES = ("auto", "on", "off")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class SettingsError(ValueError):
    """A setting is invalid; the message names the CLI option / env var to fix."""


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a `--config` file: YAML (.yaml/.yml), TOML (.toml) or JSON (.json), chosen by suffix.
    Keys are setting names (`max_batch_size`, not the env var); a file names only what it changes."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"--config {path}: {exc.strerror or exc}") from None
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        elif suffix == ".json":
            import json

            data = json.loads(text)
        else:
            raise SettingsError(f"--config {path}: unknown format {suffix or '(no suffix)'!r}; use .yaml, .yml, .toml or .json")
    except SettingsError:
        raise
    except Exception as exc:  # noqa: BLE001 - yaml, tomllib and json each raise their own error type
        raise SettingsError(f"--config {path}: not valid {suffix.lstrip('.').upper()}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"--config {path}: expected a mapping of setting names to values, got {type(data).__name__}")
    return data


def env_field(default: Any, env: str, help: str) -> Any:
    return field(default=default, metadata={"env": env, "help": help})


def is_loopback(host: str) -> bool:
    """True only for names that cannot be reached from another machine ('0.0.0.0' / '' mean every interface)."""
    host = host.strip().strip("[]").lower()
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse(raw: str, typ: Any, env: str) -> Any:
    raw = raw.strip()
    try:
        if typ is bool:
            if raw.lower() in _TRUE:
                return True
            if raw.lower() in _FALSE:
                return False
            raise ValueError("expected 1/0, true/false, yes/no or on/off")
        return typ(raw)
    except ValueError as exc:
        raise SettingsError(f"{env}={raw!r}: {exc}") from None


T = TypeVar("T")


def from_sources(cls: type[T], cli: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> T:
    """Build `cls` from CLI values (None = not given), then env vars, then defaults."""
    cli = cli or {}
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if cli.get(f.name) is not None:
            kwargs[f.name] = cli[f.name]
        elif f.metadata.get("env") and env.get(f.metadata["env"], "") != "":
            kwargs[f.name] = _parse(env[f.metadata["env"]], hints[f.name], f.metadata["env"])
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise SettingsError(str(exc)) from None


def env_vars(cls: type) -> dict[str, tuple[str, Any, str]]:
    """env var → (field name, default, help) for every field of `cls` that reads one."""
    return {f.metadata["env"]: (f.name, f.default, f.metadata.get("help", "")) for f in fields(cls) if "env" in f.metadata}


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def require(ok: bool, what: str, message: str) -> None:
    if not ok:
        raise SettingsError(f"{what}: {message}")


def where(settings: Any, name: str) -> str:
    """'--max-batch-size / TELEPATHY_MAX_BATCH_SIZE', for error messages."""
    env = {f.name: f.metadata.get("env") for f in fields(settings)}.get(name)
    return f"{option_name(name)} / {env}" if env else option_name(name)


@dataclass
class ServiceSettings:
    """What every Telepathy gRPC service reads at start-up. Subclasses set the port and model defaults."""

    host: str = env_field("127.0.0.1", "TELEPATHY_HOST", "interface to listen on; non-loopback needs an auth token or mTLS")
    port: int = env_field(0, "TELEPATHY_PORT", "gRPC port (sender 50051, receiver 50052; 0 = pick a free one)")
    model: str = env_field("", "TELEPATHY_MODEL", "model spec: embedded preset, random:NAME, .gguf file, folder, HF id")
    bridges: str = env_field(str(SHIPPED_BRIDGES), "TELEPATHY_BRIDGES", "folder of bridge checkpoints (the shipped ones by default)")
    device: str = env_field("auto", "TELEPATHY_DEVICE", "cpu, cuda, cuda:N or auto (cuda when available)")
    dtype: str = env_field("auto", "TELEPATHY_DTYPE", "model dtype: auto (fp32 on CPU, bf16 on GPU), fp32, fp16, bf16")
    auth_token: str = env_field("", "TELEPATHY_AUTH_TOKEN", "shared service token, sent as 'authorization: Bearer <token>'")
    tls_cert: str = env_field("", "TELEPATHY_TLS_CERT", "PEM certificate chain; turns TLS on (also the client cert for mTLS)")
    tls_key: str = env_field("", "TELEPATHY_TLS_KEY", "PEM private key of --tls-cert")
    tls_ca: str = env_field("", "TELEPATHY_TLS_CA", "PEM CA bundle; when set, peers must present a certificate it signed (mTLS)")
    insecure: bool = env_field(False, "TELEPATHY_INSECURE", "allow a non-loopback host without token or mTLS")
    max_batch_size: int = env_field(32, "TELEPATHY_MAX_BATCH_SIZE", "largest batch one model call takes")
    # 2 ms costs batch-1 latency almost nothing and lets concurrent requests share one forward pass.
    max_queue_delay_ms: float = env_field(2.0, "TELEPATHY_MAX_QUEUE_DELAY_MS", "longest a request waits for batch-mates")
    # Bounded so overload turns into fast RESOURCE_EXHAUSTED answers instead of ever-growing latency.
    max_queue_size: int = env_field(256, "TELEPATHY_MAX_QUEUE_SIZE", "requests waiting per batcher before RESOURCE_EXHAUSTED")
    # 2: a batch whose work is queued on the GPU lets the model thread queue the next one behind it (pair service,
    # fast path), so the device does not idle while the host gathers and tokenises. 1 = one batch at a time.
    max_batches_in_flight: int = env_field(2, "TELEPATHY_MAX_BATCHES_IN_FLIGHT", "batches queued on the device at once (1 = no pipelining)")
    max_text_chars: int = env_field(4000, "TELEPATHY_MAX_TEXT_CHARS", "longest input / relay text accepted")
    # 4 MiB = gRPC's usual receive limit, set explicitly on both ends and for sends too. The biggest legitimate
    # message is fp32 soft tokens: K × d_wire × 4 bytes (16 × 512 × 4 = 32 KiB for the default bridge);
    # the receiver refuses to start if a loaded bridge could not fit.
    max_message_bytes: int = env_field(4 * MiB, "TELEPATHY_MAX_MESSAGE_BYTES", "gRPC max send/receive message size")
    metrics_port: int = env_field(0, "TELEPATHY_METRICS_PORT", "Prometheus /metrics HTTP port on --host (0 = off)")
    grace_s: float = env_field(10.0, "TELEPATHY_GRACE_S", "on SIGTERM, how long in-flight requests get to finish")
    warmup: bool = env_field(True, "TELEPATHY_WARMUP", "run a max-size batch before reporting SERVING")
    # The static-shape path of bridge/fastpath.py (CUDA graphs, fused layers, label-only logits); its own
    # switches are TELEPATHY_FASTPATH_* (docs/PERFORMANCE.md). Eager engines on the CPU, where graphs gain nothing.
    fast_path: str = env_field("auto", "TELEPATHY_FAST_PATH", "static-shape fast path: auto (on with CUDA), on, off")

    def __post_init__(self) -> None:
        self.host = self.host.strip()
        require(bool(self.host), where(self, "host"), "must not be empty")
        for name in ("port", "metrics_port"):
            require(0 <= getattr(self, name) <= 65535, where(self, name), f"{getattr(self, name)} is not a port number")
        require(bool(self.model), where(self, "model"), "must not be empty")
        require(self.device in DEVICES or self.device.startswith("cuda:"), where(self, "device"),
                 f"{self.device!r} is not one of {', '.join(DEVICES)}, cuda:N")
        require(self.dtype in MODEL_DTYPES, where(self, "dtype"), f"{self.dtype!r} is not one of {', '.join(MODEL_DTYPES)}")
        for name in ("max_batch_size", "max_queue_size", "max_text_chars", "max_batches_in_flight"):
            require(getattr(self, name) >= 1, where(self, name), f"must be at least 1, got {getattr(self, name)}")
        require(self.max_queue_delay_ms >= 0, where(self, "max_queue_delay_ms"), "must not be negative")
        require(self.max_message_bytes >= 64 * 1024, where(self, "max_message_bytes"), "must be at least 65536")
        require(self.grace_s >= 0, where(self, "grace_s"), "must not be negative")
        require(self.fast_path in FAST_PATH_MODES, where(self, "fast_path"),
                f"{self.fast_path!r} is not one of {', '.join(FAST_PATH_MODES)}")
        self._check_security()

    def _check_security(self) -> None:
        token = self.auth_token
        require(token == token.strip() and token.isascii() and token.isprintable() and " " not in token,
                 "TELEPATHY_AUTH_TOKEN", "must be printable ASCII without spaces")
        require(bool(self.tls_cert) == bool(self.tls_key), "--tls-cert / --tls-key", "give both or neither")
        require(not self.tls_ca or bool(self.tls_cert), "--tls-ca", "mTLS needs the server's own --tls-cert and --tls-key")
        for name in ("tls_cert", "tls_key", "tls_ca"):
            path = getattr(self, name)
            require(not path or Path(path).is_file(), where(self, name), f"no such file: {path}")
        if not is_loopback(self.host) and not (self.auth_token or self.tls_ca) and not self.insecure:
            raise SettingsError(
                f"refusing to listen on {self.host}:{self.port} without authentication: set TELEPATHY_AUTH_TOKEN "
                "(or mTLS with --tls-cert/--tls-key/--tls-ca), bind to 127.0.0.1, or pass --insecure / TELEPATHY_INSECURE=1"
            )

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_ms / 1000.0

    @property
    def security(self) -> str:
        """One word for logs: none, token, tls, tls+token, mtls, mtls+token."""
        tls = "mtls" if self.tls_ca else "tls" if self.tls_cert else ""
        parts = [p for p in (tls, "token" if self.auth_token else "") if p]
        return "+".join(parts) or "none"
