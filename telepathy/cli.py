"""`telepathy` command line: one table, COMMANDS, says how every subcommand is built and what it runs.

Building the parser imports nothing heavy (no torch, no transformers), so `telepathy --help`, `telepathy CMD
--help` and every command of the torch-free gateway image start fast:

- the model commands' arguments come from torch-free builders (telepathy.commands) and their run function is a
  "module:function" string, imported only when that command runs;
- `serve` and the gateway commands come from torch-free modules that register their own parsers (their run
  code imports the heavy parts inside the handlers).

A command whose run code needs a package that is not installed fails with exit code 2 and names the package
and the extra to install (`pip install 'telepathy-llm[train]'`); its --help still works.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from dataclasses import dataclass

from telepathy.contract import VERSION

# Packages of the extras (pyproject [project.optional-dependencies]) → the extra that installs them.
OPTIONAL_PACKAGES = {
    "torch": "serve", "transformers": "serve", "gguf": "serve", "safetensors": "serve", "filelock": "serve",
    "accelerate": "serve", "tqdm": "train", "matplotlib": "train", "fastapi": "gateway", "uvicorn": "gateway",
}


@dataclass(frozen=True)
class Command:
    """How `telepathy NAME` is built and run. Either `arguments` + `run`, or `registers`."""

    help: str = ""
    arguments: str = ""  # "module:function(parser)": adds the command's arguments; imports nothing heavy
    run: str = ""  # "module:function(args) -> exit code", imported when the command runs
    registers: str = ""  # "module:function(subparsers)": a torch-free module that adds its own parser(s) and func
    extra: str = ""  # the extra its run code needs: `pip install 'telepathy-llm[EXTRA]'`


COMMANDS: dict[str, Command] = {
    "models": Command("list model presets: family, sizes, where the files are, cache state",
                      "telepathy.commands:models_arguments", "telepathy.cli:models_command", extra="serve"),
    "serve": Command(registers="telepathy.ops.serve:register", extra="serve"),
    "gateway": Command(registers="telepathy.gateway.cli:register", extra="gateway"),
    "up": Command(registers="telepathy.gateway.cli:register", extra="serve,gateway"),
    "bench": Command(registers="telepathy.gateway.cli:register", extra="train"),
    "healthcheck": Command(registers="telepathy.gateway.cli:register"),
    "train": Command("train a bridge (frozen sender and receiver; only the bridge learns)",
                     "telepathy.commands:train_arguments", "telepathy.bridge.training.train:train_command",
                     extra="train"),
    "eval": Command("evaluate a bridge against fair baselines on a full test split",
                    "telepathy.commands:eval_arguments", "telepathy.bridge.training.evaluate:eval_command",
                    extra="train"),
    "classify": Command("classify a text in-process (default pair + shipped bridge)",
                        "telepathy.commands:classify_arguments", "telepathy.bridge.classify:classify_command",
                        extra="serve"),
    "report": Command("markdown table + bar chart of evaluation results",
                      "telepathy.commands:report_arguments", "telepathy.bridge.training.report:report_command",
                      extra="train"),
}


def _resolve(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


class LazyRun:
    """A parser's `func`: imports "module:function" when called, then runs it with the parsed args."""

    def __init__(self, target: str):
        self.target = target

    def __call__(self, args: argparse.Namespace) -> int:
        return _resolve(self.target)(args)

    def __repr__(self) -> str:
        return f"LazyRun({self.target!r})"


def models_command(args: argparse.Namespace) -> int:
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


def _add(subparsers: argparse._SubParsersAction, names: list[str], registered: set[str]) -> None:
    """Add the parsers of `names` (in order); a self-registering module is called once for all its commands."""
    for name in names:
        command = COMMANDS[name]
        if command.registers:
            if command.registers in registered:
                continue
            registered.add(command.registers)
            try:
                register = _resolve(command.registers)
            except ImportError as exc:  # a base dependency missing: the other commands still work
                for other in (c for c, spec in COMMANDS.items() if spec.registers == command.registers):
                    subparsers.add_parser(other, help=f"(unavailable here: {exc.name} is not installed)")
                continue
            register(subparsers)
            continue
        p = subparsers.add_parser(name, help=command.help, description=command.help)
        _resolve(command.arguments)(p)
        p.set_defaults(func=LazyRun(command.run))


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The full parser, or (given argv naming a command) one holding just that command."""
    parser = argparse.ArgumentParser(prog="telepathy", description="LLM-to-LLM communication through learned soft tokens")
    parser.add_argument("--version", action="version", version=f"telepathy {VERSION}")
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING, …)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv or [] if a in COMMANDS), None)
    _add(subparsers, [wanted] if wanted else list(COMMANDS), set())
    return parser


def missing_dependency(command: str, exc: ModuleNotFoundError) -> int | None:
    """Exit code 2 and a message naming the package and the extra, for a package of an extra; else None."""
    package = (exc.name or "").split(".")[0]
    if package not in OPTIONAL_PACKAGES:
        return None
    extra = COMMANDS[command].extra if command in COMMANDS and COMMANDS[command].extra else OPTIONAL_PACKAGES[package]
    print(f"telepathy {command}: error: this command needs the Python package {package!r}, which is not installed "
          f"here; install it with: pip install 'telepathy-llm[{extra}]'", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ModuleNotFoundError as exc:
        code = missing_dependency(args.command, exc)
        if code is None:
            raise
        return code


if __name__ == "__main__":
    sys.exit(main())
