"""Fast-path settings: FastPathConfig (one switch per optimisation; from the command line, the environment or a
dict), the batch buckets a batch is padded up to, and the check that a model is loaded in the configured dtype."""

from __future__ import annotations

import argparse
import functools
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from pydantic import create_model
from pydantic_settings import SettingsConfigDict

from telepathy.bridge.codec import WIRE_DTYPES
from telepathy.bridge.lm import LanguageModel
from telepathy.config import TelepathySettings, from_sources, setting

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class FastPathConfig:
    """Switches for each optimisation (all on by default); every one can be turned off for ablations."""

    cuda_graphs: bool = True  # capture one CUDA graph per static shape and replay it (CUDA only; elsewhere the
    #                           same static-shape code runs eagerly)
    length_buckets: bool = True  # pad sender/receiver-text lengths up to a power of two ≥ 16 (few graphs);
    #                              False: one shape per exact length (a graph per distinct length)
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # batches are padded up to one of these;
    #                                                             larger batches are split into chunks
    fused_layers: bool = True  # Llama/Mistral-family decoders run our own layer code over the same weights: QKV and
    #                            gate/up projections fused into one GEMM each (the HF modules keep views of them),
    #                            residual adds in the GEMM epilogue, flash attention (is_causal, native GQA); other
    #                            architectures (Gemma 3, …) keep the HF forward
    compile_layers: bool = True  # torch.compile that layer function (CUDA only): one compile shared by every layer
    #                              of both models (dynamic shapes); norm, rotary and SiLU·up become single kernels
    compile_bridge: bool = True  # torch.compile the bridge encoder + wire quantise (sender) and the dequantise +
    #                              adapter (receiver) (CUDA only): their ~50 small LayerNorm / attention / GELU
    #                              kernels fuse into fewer
    stop_at_layer: bool = True  # sender runs decoder layers 1..L only; False runs the whole model with
    #                             output_hidden_states and full-vocabulary logits (the naive research path)
    label_only_logits: bool = True  # receiver multiplies only the L label rows at the last position; False
    #                                 computes full-vocabulary logits at every position and picks them after
    dtype: str = "auto"  # dtype the LLMs must be loaded in: "auto" (bf16 on CUDA, fp32 on CPU), "bf16",
    #                      "fp16" or "fp32"; the fast path checks it, loaders use `torch_dtype(device)`
    wire_dtype: str = "int8"  # codec run inside the graphs by encode_quantized / classify_quantized
    max_graphs: int = 128  # captured graphs per side; shapes beyond this run the static code eagerly (a service
    #                        warms batch buckets × lengths 16–128 per bridge: 24 graphs a bridge at max batch 32)

    def __post_init__(self) -> None:
        for name in ("cuda_graphs", "length_buckets", "fused_layers", "compile_layers", "compile_bridge", "stop_at_layer",
                     "label_only_logits"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"FastPathConfig.{name} must be a bool, got {getattr(self, name)!r}")
        buckets = tuple(self.batch_buckets)
        if not buckets or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in buckets):
            raise ValueError(f"FastPathConfig.batch_buckets must be positive integers, got {self.batch_buckets!r}")
        if list(buckets) != sorted(set(buckets)):
            raise ValueError(f"FastPathConfig.batch_buckets must be strictly increasing, got {self.batch_buckets!r}")
        self.batch_buckets = buckets
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"FastPathConfig.dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"FastPathConfig.wire_dtype must be one of {WIRE_DTYPES}, got {self.wire_dtype!r}")
        if not isinstance(self.max_graphs, int) or self.max_graphs < 0:
            raise ValueError(f"FastPathConfig.max_graphs must be a non-negative integer, got {self.max_graphs!r}")

    @property
    def max_batch(self) -> int:
        return self.batch_buckets[-1]

    def buckets_upto(self, batch_size: int) -> tuple[int, ...]:
        """The batch buckets that batches of 1..batch_size land in (what a service warms up)."""
        b = self.batch_buckets
        return tuple(x for i, x in enumerate(b) if i == 0 or b[i - 1] < batch_size)

    def torch_dtype(self, device: str | torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
        return _DTYPES[self.dtype]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["batch_buckets"] = list(self.batch_buckets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FastPathConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown FastPathConfig fields: {sorted(unknown)}")
        d = dict(d)
        if "batch_buckets" in d:
            d["batch_buckets"] = tuple(d["batch_buckets"])
        return cls(**d)

    # ---- command line / service settings -------------------------------------------------------------------
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, prefix: str = "") -> None:
        """--no-cuda-graphs, --no-fused-layers, …, --dtype; `prefix` (e.g. "fast-") avoids clashes with a service's own flags."""
        g = parser.add_argument_group("fast path (each optimisation can be turned off)")
        for name, help_ in (("cuda-graphs", "run the static-shape code eagerly"), ("length-buckets", "exact lengths (a graph each)"),
                            ("fused-layers", "HF decoder layers"), ("compile-layers", "no torch.compile of the layers"),
                            ("compile-bridge", "no torch.compile of the bridge encoder / adapter"),
                            ("stop-at-layer", "run the whole sender model"),
                            ("label-only-logits", "full-vocabulary logits at every receiver position")):
            g.add_argument(f"--{prefix}no-{name}", dest="fp_" + name.replace("-", "_"), action="store_false", help=help_)
        g.add_argument(f"--{prefix}batch-buckets", dest="fp_batch_buckets", default="1,2,4,8,16,32,64", help="comma-separated")
        g.add_argument(f"--{prefix}dtype", dest="fp_dtype", default="auto", choices=["auto", *_DTYPES])
        g.add_argument(f"--{prefix}wire-dtype", dest="fp_wire_dtype", default="int8", choices=list(WIRE_DTYPES))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FastPathConfig:
        return cls(
            cuda_graphs=args.fp_cuda_graphs, length_buckets=args.fp_length_buckets, fused_layers=args.fp_fused_layers,
            compile_layers=args.fp_compile_layers, compile_bridge=args.fp_compile_bridge, stop_at_layer=args.fp_stop_at_layer,
            label_only_logits=args.fp_label_only_logits,
            batch_buckets=tuple(int(b) for b in str(args.fp_batch_buckets).split(",") if b.strip()),
            dtype=args.fp_dtype, wire_dtype=args.fp_wire_dtype,
        )

    @classmethod
    def from_env(cls, environ: dict[str, str]) -> FastPathConfig:
        """Service settings: TELEPATHY_FASTPATH_CUDA_GRAPHS=0, …_BATCH_BUCKETS=1,8,32, …_DTYPE=bf16 (unset: default),
        read through the one settings mechanism (telepathy.config) like every other TELEPATHY_* variable."""
        values = from_sources(_fast_path_env_settings(), env=environ).model_dump()
        values["batch_buckets"] = tuple(int(x) for x in str(values["batch_buckets"]).split(",") if x.strip())
        return cls(**values)


class _FastPathEnvBase(TelepathySettings):
    model_config = SettingsConfigDict(env_prefix="TELEPATHY_FASTPATH_")
    config_env = None  # switches come from the environment only (no --config file, no secrets)
    secrets_dir_env = None

    @classmethod
    def _env_value_error(cls, var: str, raw: str, typ: Any, exc: ValueError) -> str:
        if typ is bool:
            return f"{var} must be a boolean (1/0, true/false, on/off), got {raw!r}"
        return f"{var}={raw!r}: {exc}"


@functools.cache
def _fast_path_env_settings() -> type[TelepathySettings]:
    """A settings class with FastPathConfig's fields and defaults (batch buckets as comma-separated text), so the
    fields are declared once, on the dataclass."""
    env_fields: dict[str, Any] = {}
    for f in fields(FastPathConfig):
        default = f.default
        typ: type = type(default)
        if typ is tuple:
            typ, default = str, ",".join(map(str, default))
        env_fields[f.name] = (typ, setting(default, f"FastPathConfig.{f.name}"))
    return create_model("FastPathEnvSettings", __base__=_FastPathEnvBase, **env_fields)


def _pick_bucket(n: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if b >= n:
            return b
    return buckets[-1]


def _check_dtype(lm: LanguageModel, config: FastPathConfig) -> None:
    if config.dtype != "auto" and lm.dtype != config.torch_dtype(lm.device):
        raise ValueError(
            f"fast path configured for {config.dtype} but {lm.spec} is loaded in {lm.dtype}; load it with "
            f"dtype=FastPathConfig.torch_dtype(device)"
        )
