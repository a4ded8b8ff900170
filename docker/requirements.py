"""Print the runtime requirements of one image role, one per line, from pyproject.toml.

    python3 docker/requirements.py model     # sender and receiver images: everything but the torch line
    python3 docker/requirements.py gateway   # gateway image: no torch / transformers / model-file tooling

pyproject.toml stays the only list of dependencies: this script only leaves lines out. The Dockerfile
installs torch on its own first (from the CPU or CUDA wheel index chosen by build argument), so the
`model` role drops the torch line to keep pip from swapping that build for another one. The gateway never
loads a model, so its image leaves out everything that exists to load or plot one; tests/test_deploy.py
proves that `telepathy gateway` and `telepathy healthcheck` run with those modules unimportable.

Python >= 3.11 (tomllib), as in both base images.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

# Distributions each role leaves out (normalized names, see `_name`).
EXCLUDE: dict[str, frozenset[str]] = {
    # torch comes from its own index in an earlier layer; matplotlib only draws plots for eval/bench reports.
    "model": frozenset({"torch", "matplotlib"}),
    # The gateway talks HTTP and gRPC only.
    "gateway": frozenset({"torch", "transformers", "gguf", "accelerate", "safetensors", "matplotlib", "tqdm"}),
}

# Import names of the distributions a role leaves out (what the tests block to prove the role runs without them).
EXCLUDED_MODULES: dict[str, frozenset[str]] = {
    "model": frozenset({"matplotlib"}),
    "gateway": frozenset({"torch", "transformers", "gguf", "accelerate", "safetensors", "matplotlib", "tqdm"}),
}


def _name(requirement: str) -> str:
    """Normalized distribution name of a PEP 508 requirement string (PEP 503 normalization)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"cannot read a distribution name from {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(role: str, pyproject: Path) -> list[str]:
    if role not in EXCLUDE:
        raise SystemExit(f"unknown role {role!r}; known: {', '.join(sorted(EXCLUDE))}")
    deps = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    return [d for d in deps if _name(d) not in EXCLUDE[role]]


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print(__doc__, file=sys.stderr)
        return 2
    pyproject = Path(argv[1]) if len(argv) == 2 else Path(__file__).resolve().parent.parent / "pyproject.toml"
    print("\n".join(requirements(argv[0], pyproject)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
