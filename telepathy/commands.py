"""The arguments of the model commands (`models`, `train`, `eval`, `classify`, `report`), torch-free.

telepathy.cli builds its parser from these builders; each command's run function stays beside the code it
drives (bridge.training.train, bridge.training.evaluate, bridge.classify, bridge.training.report) and is imported
only when that command runs. So `telepathy --help` and `telepathy train --help` import neither torch nor
transformers, and work in the gateway image, which has neither. Defaults shown here come from torch-free
places: telepathy.contract, bridge.tasks and bridge.training.config (TrainConfig).
"""

from __future__ import annotations

import argparse

from telepathy.bridge.tasks import TASKS
from telepathy.bridge.training.config import DEFAULT_WIRE_DTYPE, MODEL_DTYPES, RUN_CONFIG_FILE, train_defaults
from telepathy.contract import DEFAULT_RECEIVER, DEFAULT_SENDER, WIRE_DTYPES

# bridge.training.evaluate.METHODS, for the `eval` help (tests/test_cli.py checks that the two agree).
EVAL_METHODS = ("bridge", "sender_zero_shot", "receiver_zero_shot", "receiver_few_shot", "text_relay", "prompt_tuning",
                "linear_probe")
DEVICE_HELP = "cpu, cuda, cuda:N or auto (default: cuda when available)"
DTYPE_HELP = "model dtype (default: bf16 on CUDA, fp32 on CPU)"


def _tasks() -> str:
    return f"a built-in task ({', '.join(TASKS)}) or the path of a task file (docs/TASKS.md)"


def models_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def train_arguments(p: argparse.ArgumentParser) -> None:
    """Options that set a TrainConfig field use the field's name as dest and default to None ("not given"), so
    that train_command can put them over a --config file; the help shows TrainConfig's defaults."""
    d = train_defaults()
    p.add_argument("--config", default=None, metavar="FILE",
                   help=f"run config (YAML, TOML or JSON; every `telepathy train` writes <out>/{RUN_CONFIG_FILE}): "
                        "its values, with the options given here over them")
    p.add_argument("--task", default=None, help=f"{_tasks()}; required, here or in --config")
    p.add_argument("--sender", default=None, help=f"sender model spec (default {d['sender']})")
    p.add_argument("--receiver", default=None, help=f"receiver model spec (default {d['receiver']})")
    p.add_argument("--soft-tokens", type=int, default=None, help=f"K soft tokens (default {d['soft_tokens']})")
    p.add_argument("--d-wire", type=int, default=None, help=f"values per soft token on the wire (default {d['d_wire']})")
    p.add_argument("--d-model", type=int, default=None, help=f"resampler width (default {d['d_model']})")
    p.add_argument("--depth", type=int, default=None, help=f"perceiver blocks (default {d['depth']})")
    p.add_argument("--heads", dest="num_heads", metavar="HEADS", type=int, default=None, help=f"attention heads (default {d['num_heads']})")
    p.add_argument("--sender-layer", type=int, default=None, help="sender layer (default: round(0.8 × layers))")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {d['steps']})")
    p.add_argument("--batch-size", type=int, default=None, help=f"class-balanced batch (default {d['batch_size']})")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {d['lr']})")
    p.add_argument("--warmup", dest="warmup_steps", metavar="WARMUP", type=int, default=None, help=f"warmup steps (default {d['warmup_steps']})")
    p.add_argument("--diversity", dest="diversity_weight", metavar="DIVERSITY", type=float, default=None,
                   help="diversity weight (default 0.1, 0 for 2 classes)")
    p.add_argument("--eval-every", type=int, default=None, help=f"validate every N steps (default {d['eval_every']})")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help=f"checkpoint every N steps (default {d['checkpoint_every']})")
    p.add_argument("--validation-size", type=int, default=None,
                   help=f"rows carved from train (default {d['validation_size']})")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training rows")
    p.add_argument("--seed", type=int, default=None, help=f"init and batch-order seed (default {d['seed']})")
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--dtype", default=None, choices=list(MODEL_DTYPES), help=DTYPE_HELP)
    p.add_argument("--cache-dir", default=None, help="sender hidden-state cache (default: <telepathy cache>/hidden-states)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the hidden-state cache")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True,
                   help=f"output folder (bridge checkpoint, {RUN_CONFIG_FILE}, diagnostics.jsonl, checkpoints/)")


def eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help=_tasks())
    p.add_argument("--bridge", default=None, help="a bridge folder, or a folder of bridges (one per seed)")
    p.add_argument("--methods", default="all", help=f"'all' or a comma list of: {', '.join(EVAL_METHODS)}")
    p.add_argument("--seeds", type=int, default=3, help="bridges / few-shot draws / prompt-tuning runs (default 3)")
    p.add_argument("--splits", default="test", help="comma list of splits; the first goes to --out (default test)")
    p.add_argument("--sender", default=None, help="sender spec (default: the one the bridge was trained with)")
    p.add_argument("--receiver", default=None, help="receiver spec (default: the one the bridge was trained with)")
    p.add_argument("--few-shot-k", type=int, default=2, help="demonstrations per class (default 2)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows of each split")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per forward (default 64)")
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--dtype", default=None, choices=list(MODEL_DTYPES), help=DTYPE_HELP)
    p.add_argument("--cache-dir", default=None, help="sender hidden-state cache folder (default: none)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="results JSON, e.g. results/<task>.json")


def classify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", help="the text to classify")
    p.add_argument("--task", default=None, help=f"{_tasks()}; may be left out with --bridge (the bridge knows its task)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--bridge", default=None, help="bridge checkpoint folder (default: the shipped one for the task)")
    p.add_argument("--sender", default=None, help=f"sender spec (default {DEFAULT_SENDER}, or the bridge's)")
    p.add_argument("--receiver", default=None, help=f"receiver spec (default {DEFAULT_RECEIVER}, or the bridge's)")
    p.add_argument("--wire-dtype", default=DEFAULT_WIRE_DTYPE, choices=WIRE_DTYPES, help="wire dtype (default %(default)s)")
    p.add_argument("--device", default=None, help=DEVICE_HELP)


def report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default="results", help="folder of results/*.json (default %(default)s)")
    p.add_argument("--out", default=None, help="where summary.md and accuracy.png go (default: --results); with "
                                                "--curves, the PNG's path (default curves.png in the current folder)")
    p.add_argument("--curves", nargs="+", default=None, metavar="RUN_DIR",
                   help="plot loss (and validation accuracy) vs step from each run folder's diagnostics.jsonl "
                        "(written by `telepathy train`) into one PNG, with its data beside it as .json")
    p.add_argument("--task", action="append", default=None, metavar="TASK",
                   help=f"report only this task ({_tasks()}; repeat for several, in column order); a task file also "
                        "gives the labels of results that do not record them (default: every task in --results)")
