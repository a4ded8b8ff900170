"""Generate the Python stubs for protos/telepathy/v1/*.proto (`make protos`); `--check` fails if they are stale.

The protos are compiled with `-I protos`, so they import each other as "telepathy/v1/common.proto" (the path
other languages see too). protoc writes absolute imports (`from telepathy.v1 import common_pb2`); they are
rewritten to relative ones, so the stubs work wherever the package is installed (as `telepathy.protos.v1`).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO_DIR = PROTO_ROOT / "telepathy" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
_ABSOLUTE_IMPORT = re.compile(r"^from telepathy\.v1 import ", re.MULTILINE)


def generate(out_root: Path) -> list[Path]:
    """Compile every .proto under out_root/telepathy/v1 → the generated files, imports made relative."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(PROTO_DIR.glob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_root}", f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}", *[str(p.relative_to(PROTO_ROOT)) for p in protos]]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    out_dir = out_root / "telepathy" / "v1"
    generated = sorted(p for p in out_dir.iterdir() if p.name.endswith(GENERATED_SUFFIXES))
    for path in generated:
        path.write_text(_ABSOLUTE_IMPORT.sub("from . import ", path.read_text()))
    return generated


def stale_files() -> list[str]:
    """Names of generated files that differ from (or are missing next to) what protoc makes now."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {f.name: f.read_bytes() for f in generate(Path(tmp))}
    committed = {p.name: p.read_bytes() for p in PROTO_DIR.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}
    return sorted(name for name in fresh.keys() | committed.keys() if fresh.get(name) != committed.get(name))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed stubs are stale")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale generated stubs: {', '.join(stale)}; run `make protos`", file=sys.stderr)
            return 1
        print("generated stubs are current")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for f in generate(Path(tmp)):
            (PROTO_DIR / f.name).write_bytes(f.read_bytes())
            print(f"wrote {(PROTO_DIR / f.name).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
