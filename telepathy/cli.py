"""`telepathy` command line. Each subcommand lives beside the code it drives and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

from telepathy.contract import VERSION

# command → the module that registers it (`register(subparsers)`; the parser it adds sets `func(args)`).
# Only the module of the command being run is imported, so `telepathy gateway` / `healthcheck` work in the
# gateway image, which has no torch, and start fast everywhere.
COMMANDS: dict[str, str] = {
    "models": "telepathy.cli",
    "serve": "telepathy.ops.serve",
    "gateway": "telepathy.gateway.cli",
    "up": "telepathy.gateway.cli",
    "bench": "telepathy.gateway.cli",
    "healthcheck": "telepathy.gateway.cli",
    "train": "telepathy.bridge.training.train",
    "eval": "telepathy.bridge.training.evaluate",
    "classify": "telepathy.bridge.classify",
    "report": "telepathy.bridge.training.report",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="list model presets: family, sizes, where the files are, cache state")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_models)


def _models(args: argparse.Namespace) -> int:
    from telepathy.bridge import embedded
    from telepathy.bridge.models import RANDOM_PRESETS

    rows = [embedded.preset_status(name) for name in embedded.EMBEDDED_PRESETS]
    for name, make in RANDOM_PRESETS.items():
        c = make()
        rows.append({
            "name": f"random:{name}", "role": "any", "family": c.architectures[0] if getattr(c, "architectures", None)
            else type(c).__name__.replace("Config", "ForCausalLM").replace("Gemma3Text", "Gemma3"),
            "hidden_size": c.hidden_size, "num_layers": c.num_hidden_layers, "vocab_size": c.vocab_size,
            "installed": True, "files": "built from config (random weights)",
        })
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    header = f"{'preset':<24} {'role':<9} {'family':<20} {'hidden':>6} {'layers':>6} {'vocab':>7}  files / cache"
    print(header)
    print("-" * len(header))
    for r in rows:
        files = r.get("files") or (os.path.commonpath(r["package_files"]) if r.get("package_files") else "-")
        cache = r.get("converted_path") if r.get("converted") else ("n/a" if "files" in r else "not converted yet")
        state = "installed" if r.get("installed") else f"NOT INSTALLED ({r.get('install_command')})"
        print(f"{r['name']:<24} {r['role']:<9} {r['family']:<20} {r['hidden_size']:>6} {r['num_layers']:>6} "
              f"{r['vocab_size']:>7}  {state}: {files}; converted: {cache}")
    return 0


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The full parser, or (given argv naming a command) one holding just that command's module."""
    parser = argparse.ArgumentParser(prog="telepathy", description="LLM-to-LLM communication through learned soft tokens")
    parser.add_argument("--version", action="version", version=f"telepathy {VERSION}")
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING, …)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv or [] if a in COMMANDS), None)
    modules = [COMMANDS[wanted]] if wanted else list(dict.fromkeys(COMMANDS.values()))
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:  # e.g. training commands in the torch-free gateway image
            for command in (c for c, m in COMMANDS.items() if m == name):
                subparsers.add_parser(command, help=f"(unavailable here: {exc.name} is not installed)")
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
