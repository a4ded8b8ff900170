"""The README's agent-to-agent snippet, run as written against a real `telepathy up` (tiny random pair).

Only the two addresses change (the test cannot count on the default ports being free); the token comes the way
it does for a user: from the file `telepathy up` leaves, with TELEPATHY_AUTH_TOKEN unset.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from test_up import READY_LINE, Up, _free_ports

from telepathy.bridge.tasks import get_task

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## Agent-to-agent over gRPC"
DEFAULT_SENDER_ADDR, DEFAULT_RECEIVER_ADDR = "127.0.0.1:50051", "127.0.0.1:50052"


def readme_snippet() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index(SECTION):]
    section = section[: section.find("\n## ", len(SECTION))]
    blocks = re.findall(r"^```python\n(.*?)^```$", section, re.S | re.M)
    assert len(blocks) == 1, f"expected one python block under {SECTION!r}, found {len(blocks)}"
    return blocks[0]


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)


def test_readme_agent_snippet_runs_against_telepathy_up(tiny_bridges_dir, tmp_path):
    snippet = readme_snippet()
    # `make up` uses the default ports; the snippet must name exactly those, once each.
    assert snippet.count(DEFAULT_SENDER_ADDR) == 1 and snippet.count(DEFAULT_RECEIVER_ADDR) == 1, snippet
    port, sender_port, receiver_port = _free_ports(3)
    code = (snippet.replace(DEFAULT_SENDER_ADDR, f"127.0.0.1:{sender_port}")
            .replace(DEFAULT_RECEIVER_ADDR, f"127.0.0.1:{receiver_port}"))
    env = {k: v for k, v in os.environ.items() if k != "TELEPATHY_AUTH_TOKEN"} | {"XDG_RUNTIME_DIR": str(tmp_path)}
    up = Up("--port", str(port), "--sender-port", str(sender_port), "--receiver-port", str(receiver_port),
            "--sender-model", "random:tiny-llama", "--receiver-model", "random:tiny-gemma",
            "--bridges", str(tiny_bridges_dir), "--startup-timeout-s", "60", env=env)
    try:
        up.wait_for(READY_LINE, timeout=90)

        run = _run(code, env)
        assert run.returncode == 0, run.stderr
        lines = run.stdout.splitlines()
        assert len(lines) == 3, run.stdout
        ag_news, trec = get_task("ag_news").labels, get_task("trec").labels
        label, nbytes, unit = lines[0].rsplit(" ", 2)
        assert label in ag_news and unit == "bytes" and int(nbytes) >= 4 * 16, lines[0]  # K=4 × d_wire=16 int8
        scores = ast.literal_eval(lines[1])
        assert list(scores) == list(ag_news) and abs(sum(scores.values()) - 1.0) < 1e-4, lines[1]
        assert max(scores, key=scores.get) == label
        relay_label, relay_text = lines[2].split(" ", 1)
        assert relay_label in trec and isinstance(ast.literal_eval(relay_text), str), lines[2]

        # Without the token file the same snippet is turned away: the file is what lets it in.
        empty = tmp_path / "elsewhere"
        empty.mkdir()
        refused = _run(code, env | {"XDG_RUNTIME_DIR": str(empty)})
        assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stderr, refused.stderr[-2000:]
    finally:
        up.proc.send_signal(signal.SIGTERM)
        try:
            up.proc.wait(timeout=30)
        finally:
            up.kill_all()
