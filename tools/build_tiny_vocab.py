"""Rebuild bridge/presets/tiny_vocab.json, the word vocabulary of the tiny random test models.

Deterministic: special tokens, every word of the task prompts and verbalizers, then the most frequent words
of the shipped data (ties broken alphabetically). Run: python tools/build_tiny_vocab.py
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORD = re.compile(r"\w+|[^\w\s]")
SIZE = 2048


def main() -> None:
    from telepathy.bridge.tasks import TASKS

    specials = ["<pad>", "<bos>", "<eos>", "<unk>", "<|im_start|>", "<|im_end|>"]
    task_words: list[str] = []
    for spec in TASKS.values():
        for text in (spec.primer, spec.instruction, spec.answer_prefix, spec.relay_instruction, spec.input_name,
                     "Summary:", "user assistant system", *spec.verbalizers):
            task_words += WORD.findall(text.lower())
    counts: Counter[str] = Counter()
    for task in TASKS:
        with (ROOT / "data" / task / "train.jsonl").open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i >= 5000:
                    break
                counts.update(WORD.findall(json.loads(line)["text"].lower()))
    vocab: list[str] = []
    for w in specials + task_words + [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]:
        if w not in vocab:
            vocab.append(w)
        if len(vocab) >= SIZE:
            break
    out = ROOT / "bridge" / "presets" / "tiny_vocab.json"
    out.write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} words to {out}")


if __name__ == "__main__":
    main()
