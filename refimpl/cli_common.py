"""Shared pieces of the command line: the subcommand registry and the common options.

Imported by the subcommand modules (cli_model, cli_analysis, cli_oracle) and by the entry
point (cli.py); it imports none of them, so imports flow one way:
cli -> cli_model / cli_analysis / cli_oracle -> cli_common.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from .errors import RefimplError

COMMANDS: dict = {}


def command(name: str, help: str):
    def deco(fn):
        COMMANDS[name] = (help, fn)
        return fn
    return deco


class _Parser(argparse.ArgumentParser):
    def error(self, message):               # argparse's usage errors: one line, exit 2
        raise RefimplError(f"{self.prog}: {message}")


def positive_int(s: str) -> int:
    """argparse type for counts such as --top: an integer >= 1."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def parse_ids(s: str) -> list[int]:
    try:
        ids = [int(x) for x in s.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise RefimplError(f"--ids must be comma-separated integers, got {s!r}") from None
    if not ids:
        raise RefimplError("--ids is empty")
    return ids


def open_model(args):
    from .model import load
    from .embedded import resolve_model
    return load(resolve_model(getattr(args, "model", None)), dtype=getattr(args, "dtype", "float64"))


def common(p, target=True):
    p.add_argument("prompt", nargs="?", default=None, help="text prompt (tokenized with the family's start token)")
    p.add_argument("--ids", default=None, help="comma-separated token ids instead of PROMPT, used verbatim")
    add_prepend_bos(p)
    p.add_argument("--model", default=None, help="converted model directory (default: the embedded model)")
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--position", type=int, default=None, help="analysed position (default: last)")
    p.add_argument("--readout", default="frozen", choices=["frozen", "frozen-nobias", "raw", "lens"],
                   help="vocabulary readout (default frozen: the final norm's scale frozen at the analysed "
                        "position, its bias kept, so the final state reads as the model's own log-probabilities; "
                        "frozen-nobias: the authors' published convention, final LayerNorm bias dropped; "
                        "raw: no final norm; lens: each vector normalised on its own)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    if target:
        p.add_argument("--target", default=None, help="target token (must be a single token)")
        p.add_argument("--target-id", type=int, default=None, help="target token id")


def add_prepend_bos(p):
    p.add_argument("--prepend-bos", action=argparse.BooleanOptionalAction, default=None,
                   help="put the tokenizer's start token before a text PROMPT (--no-prepend-bos: nothing). "
                        "Default: the family's convention: nothing for GPT-2 (as the authors' code and the "
                        "embedded model's training), BOS for Llama, </s> for fairseq")


def prompt_source(args):
    """The prompt text or the --ids list from the common options (one error line otherwise)."""
    if args.ids is not None and args.prompt is not None:
        raise RefimplError("give either PROMPT or --ids, not both")
    if args.ids is None and args.prompt is None:
        raise RefimplError("no prompt given (PROMPT or --ids)")
    if args.ids is not None and getattr(args, "prepend_bos", None) is not None:
        raise RefimplError("--prepend-bos/--no-prepend-bos apply to a text PROMPT; --ids are used verbatim")
    return parse_ids(args.ids) if args.ids is not None else args.prompt


def prepare(args):
    """(model, trace, t, w, readout) from the common options."""
    from .forward import run
    from .locate import resolve_position, resolve_target
    model = open_model(args)
    trace = run(model, prompt_source(args), getattr(args, "prepend_bos", None))
    t = resolve_position(trace, args.position)
    w = resolve_target(model, trace.log_probs[t], getattr(args, "target", None), getattr(args, "target_id", None))
    return model, trace, t, w, trace.readout(t, args.readout)


def emit(args, obj, text: str):
    print(json.dumps(obj, indent=1, default=_jsonable) if args.json else text)


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(type(x).__name__)


def check_layer(model, i):
    if i is None or not 0 <= i < model.cfg.n_layers:
        raise RefimplError(f"layer {i} out of range (model has {model.cfg.n_layers} layers)")


def check_neuron(model, k):
    if k is None or not 0 <= k < model.cfg.d_ff:
        raise RefimplError(f"neuron {k} out of range (FFN width {model.cfg.d_ff})")
