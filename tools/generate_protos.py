"""Generate the Python stubs for protos/telepathy/v1/*.proto (`make protos`); `--check` fails if they are stale.

The protos are compiled from the repository root so that generated imports read
`from protos.telepathy.v1 import common_pb2`, which resolves inside this package.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos" / "telepathy" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    from grpc_tools import protoc
    import grpc_tools

    protos = sorted(PROTO_DIR.glob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_root}", f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}", *[str(p.relative_to(ROOT)) for p in protos]]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    out_dir = out_root / "protos" / "telepathy" / "v1"
    return sorted(p for p in out_dir.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def stale_files() -> list[str]:
    """Names of generated files that differ from (or are missing next to) what protoc makes now."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        problems = []
        for f in fresh:
            committed = PROTO_DIR / f.name
            if not committed.exists() or not filecmp.cmp(f, committed, shallow=False):
                problems.append(f.name)
        fresh_names = {f.name for f in fresh}
        problems += [p.name for p in PROTO_DIR.iterdir() if p.name.endswith(GENERATED_SUFFIXES) and p.name not in fresh_names]
        return problems


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
    for f in generate(ROOT):
        print(f"wrote {f.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
