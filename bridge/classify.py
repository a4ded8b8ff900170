"""`telepathy classify --task T "text" [--json]`: one text through the whole bridge path, in-process.

    text → sender (SmolLM2) hidden states → bridge encoder → wire bytes (int8 by default, bridge.codec)
         → bridge adapter → receiver (Gemma) → label probabilities

The same engines and codec the gRPC services use, without the network. By default the shipped bridge for the
default pair is used (bridge/bridges/<sender>__<receiver>/<task>/); `--bridge DIR` takes another checkpoint, and
then the models default to the ones that bridge was trained for. `--task` is a built-in task's name or the path of a
task file; with `--bridge` it may be left out: a bridge folder carries its task's spec.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from telepathy.bridge.checkpoint import (
    BridgeMeta,
    CheckpointError,
    FingerprintMismatch,
    check_task,
    find_bridges,
    load_adapter,
    load_encoder,
    read_meta,
)
from telepathy.bridge.codec import WIRE_DTYPES, decode_batch
from telepathy.bridge.lm import LanguageModel
from telepathy.bridge.models import DEFAULT_RECEIVER, DEFAULT_SENDER, ModelSpecError
from telepathy.bridge.runtime.engine import SHIPPED_BRIDGES, BridgeSet, LoadedBridge, ReceiverEngine, SenderEngine
from telepathy.bridge.tasks import TaskFileError, TaskSpec, UnknownTaskError, resolve_task
from telepathy.bridge.training.train import DEFAULT_WIRE_DTYPE, fail, resolve_device


def shipped_bridge_dir(task: str, sender: str = DEFAULT_SENDER, receiver: str = DEFAULT_RECEIVER,
                       root: Path = SHIPPED_BRIDGES) -> Path:
    """bridge/bridges/<sender>__<receiver>/<task>, where the package ships its trained bridges."""
    return root / f"{sender}__{receiver}" / task


class Classifier:
    """Sender + receiver + one bridge per task, in one process; `classify(texts, task)` → probabilities."""

    def __init__(self, sender: LanguageModel, receiver: LanguageModel, bridge_dirs: list[Path],
                 wire_dtype: str = DEFAULT_WIRE_DTYPE):
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"unknown wire dtype {wire_dtype!r}; expected one of {', '.join(WIRE_DTYPES)}")
        encoders, adapters = [], []
        for d in bridge_dirs:
            encoder, meta = load_encoder(d, sender.fingerprint(), device=str(sender.device))
            adapter, _ = load_adapter(d, receiver.fingerprint(), device=str(receiver.device))
            encoders.append(LoadedBridge(meta, encoder.to(sender.dtype)))
            adapters.append(LoadedBridge(meta, adapter.to(receiver.dtype)))
        self.sender = SenderEngine(sender, BridgeSet(encoders))
        self.receiver = ReceiverEngine(receiver, BridgeSet(adapters))
        self.wire_dtype = wire_dtype

    @torch.no_grad()
    def classify(self, texts: list[str], task: str) -> tuple[torch.Tensor, BridgeMeta, int]:
        """texts → label probabilities [B, L] (float32, CPU), the bridge used, and wire bytes per request."""
        wire, meta = self.sender.encode_wire(texts, task, self.wire_dtype)
        latents = decode_batch(wire, expected_shape=(meta.config.num_latents, meta.config.d_wire))
        probs, _ = self.receiver.classify_latents(latents, task, meta.bridge_id)
        return probs.float().cpu(), meta, wire[0].nbytes


# `telepathy classify`: the arguments are in telepathy.commands (torch-free, for a fast `--help`).


def classify_command(args: argparse.Namespace) -> int:
    if not args.task and not args.bridge:
        return fail("classify", "--task is required without --bridge (a bridge folder knows its task)")
    try:
        task = resolve_task(args.task) if args.task else None
    except (UnknownTaskError, TaskFileError) as exc:
        return fail("classify", str(exc))
    if not args.text.strip():
        return fail("classify", "the text to classify is empty")
    sender_spec, receiver_spec = args.sender or DEFAULT_SENDER, args.receiver or DEFAULT_RECEIVER
    if args.bridge:
        bridge_dir = Path(args.bridge)
        if not bridge_dir.exists():
            return fail("classify", f"bridge folder {bridge_dir} does not exist")
    else:
        bridge_dir = shipped_bridge_dir(task.name, sender_spec, receiver_spec)
        if not find_bridges(bridge_dir):
            return fail("classify", f"no shipped bridge for task {task.name!r} and the pair {sender_spec} → "
                                    f"{receiver_spec} (looked in {bridge_dir}); train one with `telepathy train` "
                                    "and pass --bridge")
    try:
        meta = read_meta(bridge_dir)
        if task is not None:
            check_task(meta, task)
    except CheckpointError as exc:
        return fail("classify", str(exc))
    spec: TaskSpec = meta.spec  # what the bridge was trained for: the same as --task's, checked above
    if args.bridge:
        sender_spec = args.sender or meta.training.get("sender") or meta.sender.spec
        receiver_spec = args.receiver or meta.training.get("receiver") or meta.receiver.spec
    device = resolve_device(args.device)
    try:
        sender = LanguageModel.load(sender_spec, device=device)
        receiver = LanguageModel.load(receiver_spec, device=device)
        classifier = Classifier(sender, receiver, [bridge_dir], args.wire_dtype)
    except (ModelSpecError, FileNotFoundError, FingerprintMismatch, CheckpointError) as exc:
        return fail("classify", str(exc))
    probs, meta, nbytes = classifier.classify([args.text], spec.name)
    p = probs[0].tolist()
    best = max(range(len(p)), key=p.__getitem__)
    if args.json:
        print(json.dumps({
            "task": spec.name, "label": spec.labels[best], "scores": dict(zip(spec.labels, p)),
            "bridge_id": meta.bridge_id, "sender": sender.spec, "receiver": receiver.spec,
            "wire": {"dtype": args.wire_dtype, "bytes": nbytes},
        }, indent=2))
    else:
        print(spec.labels[best])
        for label, prob in sorted(zip(spec.labels, p), key=lambda x: -x[1]):
            print(f"  {label:<12} {prob:.4f}")
    return 0
