"""GGUF file → a plain Hugging Face folder (config, bf16 safetensors, tokenizer), once per embedded model.

bridge/embedded.py finds, joins and checks the files and calls `convert_gguf` under its cache lock.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

CONVERSION_INFO = "telepathy_conversion.json"  # written last: a folder holding it is complete
DTYPES = ("bfloat16", "float16", "float32")


def _drop_quantization_config(config: Any) -> None:
    """Make a GGUF-loaded config look like a plain one (save_pretrained refuses quantized models)."""
    with contextlib.suppress(AttributeError):
        delattr(config, "quantization_config")
    if getattr(config, "quantization_config", None) is not None:
        config.quantization_config = None


MIN_TRANSFORMERS_FOR_GGUF = (5, 24)


def check_gguf_tokenizers(version: str) -> None:
    """Refuse transformers older than 5.24 before converting: they dequantize the weights right but build these
    GGUF tokenizers wrongly (Gemma split into characters, so its verbalizers collide and its relays are garbage;
    SmolLM2's EOS set to <|im_start|>), and a folder converted with them stays wrong in the cache."""
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < MIN_TRANSFORMERS_FOR_GGUF:
        need = ".".join(map(str, MIN_TRANSFORMERS_FOR_GGUF))
        raise RuntimeError(f"transformers {version} builds the embedded models' GGUF tokenizers wrongly; install "
                           f"transformers>={need} (pip install 'transformers>={need},<6'), see docs/RESULTS.md, "
                           "'Tokenizers'")


def convert_gguf(gguf: Path, out_dir: Path, dtype: str = "bfloat16") -> dict[str, Any]:
    """Dequantize ``gguf`` into a plain transformers folder ``out_dir`` (config, safetensors, tokenizer).

    transformers will not ``save_pretrained`` a GGUF-loaded model, so the weights are moved into a
    fresh model built from the same config. Returns a small summary (also saved in the folder).
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    check_gguf_tokenizers(transformers.__version__)
    torch_dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch_dtype)
    state = source.state_dict()
    # Newer transformers can keep GGUF blocks packed (with the `kernels` package); such a state dict
    # holds raw bytes, and saving it as bf16 would silently produce garbage.
    packed = [key for key, tensor in state.items() if not tensor.is_floating_point()]
    if packed:
        raise RuntimeError(f"GGUF weights were left packed (e.g. {packed[:3]}); cannot convert {gguf}")

    config = source.config
    _drop_quantization_config(config)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    # Tied models list lm_head.weight in both state dicts (as one tensor), so strict loading holds.
    fresh.load_state_dict(state, strict=True)
    fresh.tie_weights()
    fresh.generation_config = source.generation_config
    del source, state

    fresh.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    info = {
        "source_gguf": gguf.name,
        "dtype": dtype,
        "architecture": type(fresh).__name__,
        "num_parameters": sum(p.numel() for p in fresh.parameters()),
        "transformers_version": transformers.__version__,
    }
    (out_dir / CONVERSION_INFO).write_text(json.dumps(info, indent=1))
    return info
