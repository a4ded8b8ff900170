"""Bridge checkpoints: a folder with `model.safetensors` (weights) + `config.json` (everything else).

config.json holds the bridge config, the task's whole spec (`task_spec`: labels, verbalizers, primer, prompts;
bridge.tasks.TaskSpec), fingerprints of the sender and receiver the bridge was trained for, the sha256 of the weights
file and training metadata. So a process that loads a bridge knows its task without any other file. Folders written
before `task_spec` was stored get the built-in task of their name; `task`, `labels`, `verbalizers` and `primer` stay
at the top level too, for the readers of those folders. Loading checks the weights hash,
the tensor names and shapes, and (when given) the live models' fingerprints. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from telepathy.bridge.lm import ModelFingerprint
from telepathy.bridge.resampler import Bridge, BridgeAdapter, BridgeConfig, BridgeEncoder
from telepathy.bridge.tasks import BUILTIN_TASKS, Task, TaskSpec, validation_problems

FORMAT = "telepathy-bridge"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(ValueError):
    pass


class FingerprintMismatch(CheckpointError):
    pass


@dataclass
class BridgeMeta:
    path: Path
    config: BridgeConfig
    spec: TaskSpec  # the task the bridge was trained for
    sender: ModelFingerprint
    receiver: ModelFingerprint
    weights_sha256: str
    training: dict = field(default_factory=dict)

    @property
    def task(self) -> str:
        return self.spec.name

    @property
    def labels(self) -> list[str]:
        return list(self.spec.labels)

    @property
    def verbalizers(self) -> list[str]:
        return list(self.spec.verbalizers)

    @property
    def primer(self) -> str:
        return self.spec.primer

    @property
    def fingerprint(self) -> str:
        """What soft tokens carry on the wire: which bridge, for which pair, which weights."""
        key = f"{self.sender.digest}|{self.receiver.digest}|{self.task}|{self.weights_sha256}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    @property
    def bridge_id(self) -> str:
        return f"{self.task}-{self.fingerprint[:8]}"

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "task": self.task,
            "labels": self.labels,
            "verbalizers": self.verbalizers,
            "primer": self.primer,
            "task_spec": self.spec.to_dict(),
            "bridge": self.config.to_dict(),
            "sender": self.sender.to_dict(),
            "receiver": self.receiver.to_dict(),
            "weights_sha256": self.weights_sha256,
            "fingerprint": self.fingerprint,
            "training": self.training,
        }


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def unique_tmp(target: Path) -> Path:
    """A temporary name beside `target` that no concurrent writer uses (the writer then moves it into place)."""
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, but the file gets normal permissions (0666 minus the umask, 0644 usually).

    save_file makes its file 0600 whatever the umask (it writes a private temp file and renames it), so a bridge
    or cache written by one user could not be read by another, e.g. the container images' non-root user."""
    # The mode a new file gets here, learned from the file itself: setting the umask to read it would race
    # with other threads.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, mode)


def save_bridge(
    path: str | Path,
    bridge: Bridge,
    task: TaskSpec,
    sender: ModelFingerprint,
    receiver: ModelFingerprint,
    training: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> BridgeMeta:
    """Write weights + config atomically (a reader never sees half a checkpoint).

    `dtype` is the storage dtype of the weights (bf16 halves the file; loading casts back to the module's dtype).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous().cpu() for k, v in bridge.state_dict().items()}
    tmp_weights = unique_tmp(path / WEIGHTS)
    try:
        write_safetensors(state, tmp_weights, metadata={"format": FORMAT})
        meta = BridgeMeta(
            path=path, config=bridge.config, spec=task, sender=sender, receiver=receiver,
            weights_sha256=_sha256_file(tmp_weights), training=training or {},
        )
        os.replace(tmp_weights, path / WEIGHTS)
    finally:
        tmp_weights.unlink(missing_ok=True)
    tmp_config = path / (CONFIG + ".tmp")
    tmp_config.write_text(json.dumps(meta.to_json(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_config, path / CONFIG)
    return meta


def read_meta(path: str | Path) -> BridgeMeta:
    """Parse and validate config.json (cheap: weights are not read)."""
    path = Path(path)
    config_file = path / CONFIG
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no {CONFIG} (not a bridge checkpoint)")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_file}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{config_file}: format is not {FORMAT!r}")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{config_file}: unsupported format_version {raw.get('format_version')!r}")
    try:
        meta = BridgeMeta(
            path=path,
            config=BridgeConfig.from_dict(raw["bridge"]),
            spec=_task_spec(raw, config_file),
            sender=ModelFingerprint.from_dict(raw["sender"]),
            receiver=ModelFingerprint.from_dict(raw["receiver"]),
            weights_sha256=str(raw["weights_sha256"]),
            training=dict(raw.get("training", {})),
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{config_file}: missing or invalid field ({exc})") from exc
    return meta


def _task_spec(raw: dict, config_file: Path) -> TaskSpec:
    """The bridge's task: its stored `task_spec`, or (folders written before it was stored) the built-in task of
    its name. Either way the top-level copies must agree with it: they are what older readers use."""
    if "task_spec" in raw:
        try:
            spec = TaskSpec.model_validate(raw["task_spec"])
        except ValidationError as exc:
            problems = "; ".join(f"{field}: {problem}" for field, problem in validation_problems(exc))
            raise CheckpointError(f"{config_file}: invalid task_spec ({problems})") from None
    else:
        spec = BUILTIN_TASKS.get(str(raw["task"]))
        if spec is None:
            raise CheckpointError(f"{config_file}: no task_spec, and {raw['task']!r} is not a built-in task, so the "
                                  "bridge's task is unknown")
    stored = {"task": spec.name, "labels": list(spec.labels), "verbalizers": list(spec.verbalizers),
              "primer": spec.primer}
    for key, expected in stored.items():
        if raw[key] != expected:
            source = "its task_spec" if "task_spec" in raw else f"the built-in task {spec.name!r}"
            raise CheckpointError(f"{config_file}: {key} {raw[key]!r} differs from {source} ({expected!r})")
    return spec


def check_fingerprint(meta: BridgeMeta, role: str, live: ModelFingerprint) -> None:
    expected = meta.sender if role == "sender" else meta.receiver
    if expected.digest != live.digest:
        raise FingerprintMismatch(
            f"bridge {meta.path} was trained for {role} {expected.describe()}, "
            f"but the loaded {role} is {live.describe()}"
        )


def check_task(meta: BridgeMeta, task: Task) -> None:
    """CheckpointError unless the bridge was trained for `task`: the same name and the same spec."""
    if meta.task != task.name:
        raise CheckpointError(f"bridge {meta.path} was trained for task {meta.task!r}, not {task.name!r}")
    if meta.spec != task.spec:
        raise CheckpointError(f"bridge {meta.path} was trained for a task {task.name!r} that differs from "
                              f"{task.source} in {', '.join(task.spec.differences(meta.spec))}")


def _load_state(meta: BridgeMeta, prefix: str) -> dict[str, torch.Tensor]:
    weights = meta.path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{meta.path}: no {WEIGHTS}")
    actual = _sha256_file(weights)
    if actual != meta.weights_sha256:
        raise CheckpointError(
            f"{weights}: sha256 {actual[:16]}… does not match config.json ({meta.weights_sha256[:16]}…); "
            "the file is corrupt or was replaced"
        )
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {k.removeprefix(prefix): f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    except SafetensorError as exc:
        raise CheckpointError(f"{weights}: unreadable safetensors file ({exc})") from exc


def _fill(module: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{where}: missing tensors {missing[:5]} / unexpected tensors {unexpected[:5]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{where}: tensor {name} has shape {list(tensor.shape)}, config.json implies {list(expected[name].shape)}"
            )
    module.load_state_dict(state, strict=True)


def load_encoder(path: str | Path, sender: ModelFingerprint | None = None, device: str = "cpu") -> tuple[BridgeEncoder, BridgeMeta]:
    meta = read_meta(path)
    if sender is not None:
        check_fingerprint(meta, "sender", sender)
    encoder = BridgeEncoder(meta.config)
    _fill(encoder, _load_state(meta, "encoder."), meta.path)
    return encoder.to(device).eval().requires_grad_(False), meta


def load_adapter(path: str | Path, receiver: ModelFingerprint | None = None, device: str = "cpu") -> tuple[BridgeAdapter, BridgeMeta]:
    meta = read_meta(path)
    if receiver is not None:
        check_fingerprint(meta, "receiver", receiver)
    adapter = BridgeAdapter(meta.config)
    _fill(adapter, _load_state(meta, "adapter."), meta.path)
    return adapter.to(device).eval().requires_grad_(False), meta


def load_bridge(
    path: str | Path, sender: ModelFingerprint | None = None, receiver: ModelFingerprint | None = None, device: str = "cpu"
) -> tuple[Bridge, BridgeMeta]:
    meta = read_meta(path)
    for role, live in (("sender", sender), ("receiver", receiver)):
        if live is not None:
            check_fingerprint(meta, role, live)
    bridge = Bridge(meta.config)
    _fill(bridge, _load_state(meta, ""), meta.path)
    return bridge.to(device).eval().requires_grad_(False), meta


def find_bridges(root: str | Path) -> list[Path]:
    """Every bridge folder under `root` (config.json + model.safetensors), sorted. The resumable checkpoints a
    training run keeps under its `checkpoints/` are training state, not bridges to serve or evaluate: skipped,
    unless `root` is one of them itself."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.parent for p in root.rglob(CONFIG) if (p.parent / WEIGHTS).exists()
                  and "checkpoints" not in p.parent.relative_to(root).parts)
