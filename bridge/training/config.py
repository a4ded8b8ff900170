"""What a training run is made of: TrainConfig, the shipped defaults, and the run-config file.

Torch-free (it imports only tasks and the contract), so the `telepathy train` parser, its --help and the
`--config` file handling build without the training stack.

`telepathy train` writes `<out>/train_config.yaml`: every TrainConfig field plus the model dtype, after defaults.
`telepathy train --config FILE --out DIR` reads it back (options given on the command line win over the file),
which reproduces the run: training is seeded.
"""

from __future__ import annotations

import sys
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from telepathy.bridge.tasks import Task, TaskSpec, resolve_task
from telepathy.config import SettingsError, load_config_file
from telepathy.contract import DEFAULT_RECEIVER, DEFAULT_SENDER, VERSION

# Chosen by the wire ablation (docs/RESULTS.md, results/wire_ablation.json): the fewest bytes per request whose
# validation accuracy stays within 1 point of bf16 / full width / K=16 — int8, K=8 × d_wire=64 = 544 bytes.
DEFAULT_SOFT_TOKENS = 8
DEFAULT_D_WIRE = 64
DEFAULT_WIRE_DTYPE = "int8"
# Data split seed: the validation rows carved from train are the same for every training seed.
SPLIT_SEED = 0
# --dtype choices (torch dtype names; bf16 is faster on avx512_bf16 CPUs). None: fp32 on the CPU, bf16 on CUDA.
MODEL_DTYPES = ("float32", "bfloat16")
RUN_CONFIG_FILE = "train_config.yaml"


def fail(command: str, message: str) -> int:
    """Print `telepathy COMMAND: error: MESSAGE` to stderr; the exit code of a usage error, 2 (for the commands
    of the ML core: train, eval, classify, report)."""
    print(f"telepathy {command}: error: {message}", file=sys.stderr)
    return 2


def default_sender_layer(num_layers: int) -> int:
    """A late layer, before the final norm: 24 of SmolLM2's 30 (the research found late layers carry the task)."""
    return max(1, min(num_layers, round(0.8 * num_layers)))


@dataclass
class TrainConfig:
    task: str  # a built-in task's name, or the path of a task file (made absolute, so a run config names it anywhere)
    sender: str = DEFAULT_SENDER  # model spec (bridge.models)
    receiver: str = DEFAULT_RECEIVER
    soft_tokens: int = DEFAULT_SOFT_TOKENS  # K soft tokens per request
    d_model: int = 512  # resampler width
    depth: int = 1  # perceiver blocks; 1 keeps the shipped bridge ≤ 10 MB (4.8M params in bf16)
    num_heads: int = 8
    d_wire: int = DEFAULT_D_WIRE  # values per soft token on the wire (≤ d_model)
    sender_layer: int | None = None  # None → default_sender_layer(sender layers): 24 of 30 for SmolLM2
    steps: int = 800
    batch_size: int = 32  # class-balanced
    lr: float = 2e-4  # AdamW peak learning rate
    weight_decay: float = 0.01  # on matrices only (not norms, biases, the RMS scale)
    warmup_steps: int = 50  # linear warmup, then cosine to min_lr_ratio × lr
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm, per run
    diversity_weight: float | None = None  # None → 0.1 for > 2 classes, 0 for 2 (where it caused collapse)
    eval_every: int = 100  # validation accuracy (model selection) every this many steps, and at the end
    checkpoint_every: int = 200  # resumable checkpoint every this many steps, and at the end
    validation_size: int = 500  # rows carved from train for model selection
    train_limit: int | None = None  # use only the first rows of the remaining train split (tests)
    max_text_tokens: int = 256  # sender input truncation (SenderEngine's limit)
    seed: int = 0  # bridge init + batch order
    device: str = "cpu"

    def __post_init__(self) -> None:
        # UnknownTaskError with the known names, or TaskFileError naming the file, the field and the problem
        self._task = resolve_task(self.task)
        self.task = self._task.reference
        for name in ("soft_tokens", "d_model", "depth", "num_heads", "d_wire", "steps", "batch_size", "eval_every",
                     "checkpoint_every", "validation_size", "max_text_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if self.sender_layer is not None and self.sender_layer < 1:
            raise ValueError(f"TrainConfig.sender_layer must be ≥ 1, got {self.sender_layer}")
        if self.train_limit is not None and self.train_limit < 1:
            raise ValueError(f"TrainConfig.train_limit must be ≥ 1, got {self.train_limit}")
        if not self.lr > 0 or self.weight_decay < 0 or self.grad_clip <= 0:
            raise ValueError("TrainConfig: lr and grad_clip must be > 0 and weight_decay ≥ 0")
        if self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("TrainConfig: warmup_steps must be ≥ 0 and min_lr_ratio in [0, 1]")
        if self.d_wire > self.d_model:
            raise ValueError(f"TrainConfig.d_wire ({self.d_wire}) cannot exceed d_model ({self.d_model})")
        if self.batch_size < self.spec.num_labels:
            raise ValueError(f"TrainConfig.batch_size must be ≥ the {self.spec.num_labels} labels of {self.spec.name}")

    @property
    def loaded_task(self) -> Task:
        """The task: its spec and its data files."""
        return self._task

    @property
    def spec(self) -> TaskSpec:
        return self._task.spec

    @property
    def diversity(self) -> float:
        if self.diversity_weight is not None:
            return self.diversity_weight
        return 0.1 if self.spec.num_labels > 2 else 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# --------------------------------------------------------------------------------------------- run-config files


def train_defaults() -> dict[str, Any]:
    """TrainConfig's defaults by field (the `telepathy train` help shows them)."""
    return {f.name: f.default for f in fields(TrainConfig) if f.name != "task"}


def run_config_keys() -> tuple[str, ...]:
    """The keys of a run-config file: every TrainConfig field, then the model dtype."""
    return (*(f.name for f in fields(TrainConfig)), "dtype")


def _key_types() -> dict[str, tuple[type, bool]]:
    """key → (base type, None allowed)."""
    hints = typing.get_type_hints(TrainConfig)
    out: dict[str, tuple[type, bool]] = {}
    for name, hint in hints.items():
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        out[name] = (base, type(None) in args)
    out["dtype"] = (str, True)
    return out


def _coerce(path: Path, key: str, value: Any, typ: type, optional: bool) -> Any:
    """A file value → the key's type (YAML reads `2e-4` as a string, `1` where a float is meant as an int)."""
    if value is None:
        if optional:
            return None
    elif typ is float and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is int and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
    elif typ is str and isinstance(value, str):
        return value
    expected = {int: "an integer", float: "a number", str: "a string"}[typ] + (" or null" if optional else "")
    raise SettingsError(f"--config {path}: {key} must be {expected}, got {value!r}")


def read_run_config(path: str | Path) -> dict[str, Any]:
    """The values of a run-config file (YAML, TOML or JSON), keys checked, values of the keys' types.

    Raises SettingsError naming the file: unknown keys, a value of the wrong type, an unreadable file.
    """
    path = Path(path)
    data = load_config_file(path)
    keys = run_config_keys()
    unknown = [str(k) for k in data if k not in keys]
    if unknown:
        raise SettingsError(f"--config {path}: unknown key{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(map(repr, unknown))}; known keys: {', '.join(keys)}")
    types = _key_types()
    values = {k: _coerce(path, k, v, *types[k]) for k, v in data.items()}
    if values.get("dtype") is not None and values["dtype"] not in MODEL_DTYPES:
        raise SettingsError(f"--config {path}: dtype must be one of {', '.join(MODEL_DTYPES)}, got {values['dtype']!r}")
    return values


def merge_run_options(file_values: dict[str, Any], cli_values: dict[str, Any]) -> dict[str, Any]:
    """File values, then the options given on the command line (None = not given) over them."""
    return {**file_values, **{k: v for k, v in cli_values.items() if v is not None}}


def render_run_config(config: TrainConfig, dtype: str, num_sender_layers: int | None = None) -> str:
    """YAML of every TrainConfig field (in declaration order) and the dtype, with what each None resolves to."""
    import yaml

    notes = {
        "sender_layer": "None: round(0.8 × sender layers)"
                        + (f" = {default_sender_layer(num_sender_layers)}" if num_sender_layers else ""),
        "diversity_weight": f"None: 0.1 for > 2 classes, 0 for 2 → {config.diversity}",
        "train_limit": "None: every training row",
    }
    lines = [f"# telepathy {VERSION}: the full configuration of this `telepathy train` run.",
             "# `telepathy train --config THIS_FILE --out DIR` reproduces it; options given on the command line",
             "# override the values here. --out, --resume, --cache-dir, --no-cache and --no-progress are not",
             "# recorded: they do not change the result."]
    values = {**config.to_dict(), "dtype": dtype}
    for key in run_config_keys():
        line = yaml.safe_dump({key: values[key]}, default_flow_style=False, allow_unicode=True).strip()
        note = notes.get(key) if values[key] is None else None
        lines.append(f"{line}  # {note}" if note else line)
    return "\n".join(lines) + "\n"


def write_run_config(out_dir: str | Path, config: TrainConfig, dtype: str, num_sender_layers: int | None = None) -> Path:
    """<out_dir>/train_config.yaml (written whole, then moved into place)."""
    import os

    path = Path(out_dir) / RUN_CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_run_config(config, dtype, num_sender_layers), encoding="utf-8")
    os.replace(tmp, path)
    return path


__all__ = ["TrainConfig", "DEFAULT_SOFT_TOKENS", "DEFAULT_D_WIRE", "DEFAULT_WIRE_DTYPE", "SPLIT_SEED", "MODEL_DTYPES",
           "RUN_CONFIG_FILE", "fail", "default_sender_layer", "train_defaults", "run_config_keys", "read_run_config",
           "merge_run_options", "render_run_config", "write_run_config"]
