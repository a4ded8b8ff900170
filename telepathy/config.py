"""Settings: the one mechanism of every role (the services, their clients, the gateway), on pydantic-settings.

A settings class is a `TelepathySettings` (a pydantic-settings `BaseSettings`, env prefix `TELEPATHY_`): one
field per setting, its default commented beside it, made with `setting(default, help)`. A field reads the
variable `TELEPATHY_<FIELD>` unless it names another (`setting(..., env="TELEPATHY_GATEWAY_HOST")`, a
validation alias) or none (`env=None`: CLI and config file only).

`from_sources(cls, cli, env, config_file, secrets_dir)` builds one, highest priority first:

    1. explicit values: the command line (None = not given)
    2. environment variables (an empty one counts as unset)
    3. the `--config FILE` / TELEPATHY_CONFIG file: YAML, TOML or JSON; keys are setting names
       (`max_batch_size`), a key the class does not have is an error
    4. secret files: `--secrets-dir DIR` / TELEPATHY_SECRETS_DIR (off when unset), one file per variable,
       named like it: DIR/TELEPATHY_AUTH_TOKEN holds the token (pydantic-settings' secrets_dir)
    5. the defaults

Constructing a class directly (`SenderSettings(port=7000)`) takes the given values and the defaults only, never
the environment: a settings object then says everything about its component, whatever the process environment
holds. Validation happens once, in the model (`_check`, run by its model validator); every failure, a bad
variable included, is a SettingsError whose message names the option / variable to fix. `env_vars(cls)` lists
the variables (docs/SERVICES.md and docs/GATEWAY.md hold the tables; a test checks they name every one).

This module must stay torch-free: `telepathy --help` and the gateway import it.
"""

from __future__ import annotations

import contextvars
import difflib
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SecretsSettingsSource, SettingsConfigDict

from telepathy.contract import SHIPPED_BRIDGES

MiB = 1 << 20
DEVICES = ("auto", "cpu", "cuda")
MODEL_DTYPES = ("auto", "fp32", "fp16", "bf16")
FAST_PATH_MODES = ("auto", "on", "off")
ENV_PREFIX = "TELEPATHY_"
CONFIG_ENV = "TELEPATHY_CONFIG"  # --config FILE
SECRETS_DIR_ENV = "TELEPATHY_SECRETS_DIR"  # --secrets-dir DIR
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NO_ENV = "telepathy_no_env"  # json_schema_extra marker of a field that reads no variable
_PREFIXED: Any = object()  # setting(env=...) default: TELEPATHY_<FIELD>


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


def setting(default: Any, help: str = "", *, env: str | None = _PREFIXED, secret: bool = False) -> Any:
    """A settings field: its default, its help line, the variable it reads (`TELEPATHY_<FIELD>` when not given,
    another name as a validation alias, None for none). secret=True keeps the value out of repr() and messages."""
    extra: dict[str, Any] = {}
    if env is None:
        extra["json_schema_extra"] = {_NO_ENV: True}
    elif env is not _PREFIXED:
        extra["validation_alias"] = env
    return Field(default, description=help, repr=not secret, **extra)


def env_name(cls: type, name: str) -> str | None:
    """The variable field `name` of `cls` reads, which is also the name of its secret file (None: it reads none)."""
    info = cls.model_fields[name]
    if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get(_NO_ENV):
        return None
    if isinstance(info.validation_alias, str):
        return info.validation_alias
    return cls.model_config.get("env_prefix", "") + name.upper()


def _field_for_key(cls: type, key: Any) -> str | None:
    """The field a source's or pydantic's key means: its name, or its alias (any case, as secret files may be)."""
    if key in cls.model_fields:
        return key
    for name in cls.model_fields:
        var = env_name(cls, name)
        if var and isinstance(key, str) and key.lower() == var.lower():
            return name
    return None


def is_loopback(host: str) -> bool:
    """True only for names that cannot be reached from another machine ('0.0.0.0' / '' mean every interface)."""
    host = host.strip().strip("[]").lower()
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse(raw: str, typ: Any) -> Any:
    """A variable's (or secret file's) text → the field's type; ValueError says why not. Other types (api_keys'
    tuple) go to the model as text, where a validator splits them."""
    raw = raw.strip()
    if typ is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ValueError("expected 1/0, true/false, yes/no or on/off")
    if typ in (int, float):
        return typ(raw)
    return raw


# -- sources: what one from_sources() call reads, each a pydantic-settings source ----------------------------------

@dataclass
class _Request:
    cls: type
    cli: dict[str, Any]
    env: Mapping[str, str]
    config_path: Path | None
    config: dict[str, Any]
    secrets_dir: Path | None
    origin: dict[str, str] = dataclass_field(default_factory=dict)  # field → where its value came from (messages)


# The request of the from_sources() call in progress; settings_customise_sources turns it into sources.
_REQUEST: contextvars.ContextVar[_Request | None] = contextvars.ContextVar("telepathy_settings_request", default=None)


class _MappingSource(PydanticBaseSettingsSource):
    """Values keyed by setting name: the command line (label None), a config file (None = not given)."""

    def __init__(self, settings_cls: type[BaseSettings], request: _Request, values: Mapping[str, Any], label: str | None):
        super().__init__(settings_cls)
        self.request, self.values, self.label = request, values, label

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        out = {k: v for k, v in self.values.items() if v is not None and k in self.settings_cls.model_fields}
        for name in out:
            self.request.origin.setdefault(name, f"{self.label}: {name}" if self.label else where(self.settings_cls, name))
        return out


class _EnvSource(PydanticBaseSettingsSource):
    """Environment variables (a mapping, os.environ by default), parsed here so that a bad one is named."""

    def __init__(self, settings_cls: type[BaseSettings], request: _Request):
        super().__init__(settings_cls)
        self.request = request

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        var = env_name(self.settings_cls, field_name)
        return (self.request.env.get(var, "") if var else "") or None, var or field_name, False

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, info in self.settings_cls.model_fields.items():
            raw, var, _ = self.get_field_value(info, name)
            if raw is None:
                continue
            try:
                out[name] = _parse(raw, info.annotation)
            except ValueError as exc:
                raise SettingsError(self.settings_cls._env_value_error(var, raw.strip(), info.annotation, exc)) from None
            self.request.origin.setdefault(name, var)
        return out


class _SecretsSource(SecretsSettingsSource):
    """pydantic-settings' secrets_dir: DIR/<variable> holds the value (surrounding whitespace dropped; an empty
    file counts as unset). Keys come back as setting names, values parsed like the variable's."""

    def __init__(self, settings_cls: type[BaseSettings], request: _Request):
        super().__init__(settings_cls, secrets_dir=request.secrets_dir)
        self.request = request

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        if env_name(self.settings_cls, field_name) is None:  # no variable, no secret file
            return None, field_name, False
        return super().get_field_value(field, field_name)

    def prepare_field_value(self, field_name: str, field: Any, value: Any, value_is_complex: bool) -> Any:
        return value  # text as it is: parsed in __call__, split by the model (api_keys), never as JSON

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, raw in super().__call__().items():
            name = _field_for_key(self.settings_cls, key)
            if name is None or not isinstance(raw, str) or raw.strip() == "":
                continue
            label = f"--secrets-dir {self.secrets_dir}: {env_name(self.settings_cls, name)}"
            try:
                out[name] = _parse(raw, self.settings_cls.model_fields[name].annotation)
            except ValueError as exc:
                raise SettingsError(f"{label}: {exc}") from None
            self.request.origin.setdefault(name, label)
        return out


# -- the base class ----------------------------------------------------------------------------------------------

class _SettingsMeta(type(BaseSettings)):
    """Class attributes read like a dataclass's: `ReceiverSettings.port` is that field's default."""

    _building = 0  # > 0 while a class is made: pydantic must not see the parents' fields as plain attributes

    def __new__(mcs, *args: Any, **kwargs: Any):
        _SettingsMeta._building += 1
        try:
            return super().__new__(mcs, *args, **kwargs)
        finally:
            _SettingsMeta._building -= 1

    def __getattr__(cls, name: str) -> Any:
        fields = cls.__dict__.get("__pydantic_fields__") or cls.__dict__.get("model_fields") or {}
        if not _SettingsMeta._building and not name.startswith("_") and name in fields:
            return fields[name].default
        return super().__getattr__(name)


class TelepathySettings(BaseSettings, metaclass=_SettingsMeta):
    """Base of every settings class. Mutable like the dataclasses it replaces (no validation on assignment)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", populate_by_name=True,
                                      validate_assignment=False, case_sensitive=False)
    # The variables from_sources() falls back to for --config / --secrets-dir; None = not read from the environment.
    config_env: ClassVar[str | None] = CONFIG_ENV
    secrets_dir_env: ClassVar[str | None] = SECRETS_DIR_ENV

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise SettingsError(_message(type(self), exc)) from None

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        request = _REQUEST.get()
        if request is None or request.cls is not settings_cls:
            return (init_settings,)  # constructed directly: the given values, then the defaults
        config_label = f"--config {request.config_path}" if request.config_path else None
        return (
            init_settings,
            _MappingSource(settings_cls, request, request.cli, None),
            _EnvSource(settings_cls, request),
            _MappingSource(settings_cls, request, request.config, config_label),
            _SecretsSource(settings_cls, request),
        )

    @model_validator(mode="after")
    def _checked(self) -> TelepathySettings:
        self._check()
        return self

    def _check(self) -> None:
        """The validation, once; a subclass checks its own fields after `super()._check()`. Raise SettingsError."""

    @classmethod
    def _env_value_error(cls, var: str, raw: str, typ: Any, exc: ValueError) -> str:
        """The message for a variable whose text is not of the field's type."""
        return f"{var}={raw!r}: {exc}"


def _message(cls: type, exc: ValidationError) -> str:
    """A pydantic ValidationError → one line naming what to fix: our own SettingsError text when a check raised
    it, else the option / variable / file entry the value came from."""
    request = _REQUEST.get()
    origin = request.origin if request is not None and request.cls is cls else {}
    parts = []
    for err in exc.errors():
        cause = (err.get("ctx") or {}).get("error")
        loc = err.get("loc") or ()
        name = _field_for_key(cls, loc[0]) if loc else None
        if isinstance(cause, SettingsError):
            parts.append(str(cause))
        elif err.get("type") == "extra_forbidden":
            parts.append(f"unknown setting {loc[0]!r} for {cls.__name__}" if loc else err["msg"])
        elif name is None:
            parts.append(err["msg"])
        else:
            shown = cls.model_fields[name].repr  # secrets stay out of messages
            parts.append(f"{origin.get(name) or where(cls, name)}: {err['msg']}" + (f", got {err.get('input')!r}" if shown else ""))
    return "; ".join(dict.fromkeys(parts))


def _unknown_keys(cls: type, path: Path, unknown: list[str]) -> str:
    hints = []
    for key in unknown:
        guess = difflib.get_close_matches(key.lower().removeprefix(ENV_PREFIX.lower()), list(cls.model_fields), n=1)
        hints.append(f"{key!r}" + (f" (did you mean {guess[0]!r}?)" if guess else ""))
    return f"--config {path}: unknown setting{'s' if len(unknown) > 1 else ''} for {cls.__name__}: {', '.join(hints)}"


T = TypeVar("T")


def from_sources(cls: type[T], cli: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                 config_file: str | Path | None = None, secrets_dir: str | Path | None = None) -> T:
    """Build `cls` from explicit values (None = not given) > env vars (os.environ when None) > the config file
    (`config_file`, else $TELEPATHY_CONFIG) > secret files (`secrets_dir`, else $TELEPATHY_SECRETS_DIR) > defaults."""
    env = os.environ if env is None else env
    config_file = config_file or (env.get(cls.config_env, "") if cls.config_env else "") or None
    secrets_dir = secrets_dir or (env.get(cls.secrets_dir_env, "") if cls.secrets_dir_env else "") or None
    config_path, config = (Path(config_file), load_config_file(config_file)) if config_file else (None, {})
    unknown = sorted(str(k) for k in config if k not in cls.model_fields)
    if unknown:
        raise SettingsError(_unknown_keys(cls, config_path, unknown))
    secrets_path = Path(secrets_dir).expanduser() if secrets_dir else None
    if secrets_path is not None and not secrets_path.is_dir():
        raise SettingsError(f"--secrets-dir {secrets_dir}: no such directory")
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    unknown = sorted(k for k in cli if k not in cls.model_fields)
    if unknown:
        raise SettingsError(f"unknown setting{'s' if len(unknown) > 1 else ''} for {cls.__name__}: {', '.join(unknown)}")
    token = _REQUEST.set(_Request(cls, cli, env, config_path, config, secrets_path))
    try:
        return cls()
    finally:
        _REQUEST.reset(token)


def env_vars(cls: type) -> dict[str, tuple[str, Any, str]]:
    """env var → (field name, default, help) for every field of `cls` that reads one, plus the two that say where
    else settings come from (TELEPATHY_CONFIG → "config", TELEPATHY_SECRETS_DIR → "secrets_dir") when it reads them."""
    out = {}
    for name, info in cls.model_fields.items():
        var = env_name(cls, name)
        if var:
            out[var] = (name, info.default, info.description or "")
    if cls.config_env:
        out[cls.config_env] = ("config", None, "YAML, TOML or JSON file of settings (--config)")
    if cls.secrets_dir_env:
        out[cls.secrets_dir_env] = ("secrets_dir", None, "folder of secret files named like the variables (--secrets-dir)")
    return out


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def require(ok: bool, what: str, message: str) -> None:
    if not ok:
        raise SettingsError(f"{what}: {message}")


def where(settings: Any, name: str) -> str:
    """'--max-batch-size / TELEPATHY_MAX_BATCH_SIZE', for error messages (`settings`: an instance or a class)."""
    cls = settings if isinstance(settings, type) else type(settings)
    env = env_name(cls, name) if name in cls.model_fields else None
    return f"{option_name(name)} / {env}" if env else option_name(name)


class TelemetrySettings(TelepathySettings):
    """Tracing and log lines, as the services and the gateway read them (the types are the check)."""
    tracing: Literal["off", "console", "otlp"] = setting("off", "OpenTelemetry tracing: off, console, otlp")
    otlp_endpoint: str = setting("http://127.0.0.1:4318/v1/traces", "OTLP/HTTP traces endpoint when tracing=otlp")
    log_format: Literal["text", "json"] = setting("text", "log lines: text, or json (one object a line)")


class ServiceSettings(TelemetrySettings):
    """What every Telepathy gRPC service reads at start-up. Subclasses set the port and model defaults."""

    host: str = setting("127.0.0.1", "interface to listen on; non-loopback needs an auth token or mTLS")
    port: int = setting(0, "gRPC port (sender 50051, receiver 50052; 0 = pick a free one)")
    model: str = setting("", "model spec: embedded preset, random:NAME, .gguf file, folder, HF id")
    bridges: str = setting(str(SHIPPED_BRIDGES), "folder of bridge checkpoints (the shipped ones by default)")
    # More tasks than the built-ins and the bridges' own, served on the text path (docs/TASKS.md).
    task_files: tuple[str, ...] = setting((), "task file (YAML/JSON) to serve on the text path too; repeatable "
                                              "(the variable: comma-separated)")
    device: str = setting("auto", "cpu, cuda, cuda:N or auto (cuda when available)")
    dtype: str = setting("auto", "model dtype: auto (fp32 on CPU, bf16 on GPU), fp32, fp16, bf16")
    auth_token: str = setting("", "shared service token, sent as 'authorization: Bearer <token>'", secret=True)
    tls_cert: str = setting("", "PEM certificate chain; turns TLS on (also the client cert for mTLS)")
    tls_key: str = setting("", "PEM private key of --tls-cert")
    tls_ca: str = setting("", "PEM CA bundle; when set, peers must present a certificate it signed (mTLS)")
    insecure: bool = setting(False, "allow a non-loopback host without token or mTLS")
    max_batch_size: int = setting(32, "largest batch one model call takes")
    # 2 ms costs batch-1 latency almost nothing and lets concurrent requests share one forward pass.
    max_queue_delay_ms: float = setting(2.0, "longest a request waits for batch-mates")
    # Bounded so overload turns into fast RESOURCE_EXHAUSTED answers instead of ever-growing latency.
    max_queue_size: int = setting(256, "requests waiting per batcher before RESOURCE_EXHAUSTED")
    # 2: a batch whose work is queued on the GPU lets the model thread queue the next one behind it (pair service,
    # fast path), so the device does not idle while the host gathers and tokenises. 1 = one batch at a time.
    max_batches_in_flight: int = setting(2, "batches queued on the device at once (1 = no pipelining)")
    max_text_chars: int = setting(4000, "longest input / relay text accepted")
    # 4 MiB = gRPC's usual receive limit, set explicitly on both ends and for sends too. The biggest legitimate
    # message is fp32 soft tokens: K × d_wire × 4 bytes (16 × 512 × 4 = 32 KiB for the default bridge);
    # the receiver refuses to start if a loaded bridge could not fit.
    max_message_bytes: int = setting(4 * MiB, "gRPC max send/receive message size")
    metrics_port: int = setting(0, "Prometheus /metrics HTTP port on --host (0 = off)")
    grace_s: float = setting(10.0, "on SIGTERM, how long in-flight requests get to finish")
    warmup: bool = setting(True, "run a max-size batch before reporting SERVING")
    # The static-shape path of bridge/runtime/fastpath/ (CUDA graphs, fused layers, label-only logits); its own
    # switches are TELEPATHY_FASTPATH_* (docs/PERFORMANCE.md). Eager engines on the CPU, where graphs gain nothing.
    fast_path: str = setting("auto", "static-shape fast path: auto (on with CUDA), on, off")

    @field_validator("task_files", mode="before")
    @classmethod
    def _split_files(cls, value: Any) -> Any:
        return tuple(f.strip() for f in value.split(",") if f.strip()) if isinstance(value, str) else value

    def _check(self) -> None:
        super()._check()
        for path in self.task_files:
            require(Path(path).is_file(), where(self, "task_files"), f"no such file: {path}")
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
