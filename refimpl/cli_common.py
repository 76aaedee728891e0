"""Shared pieces of the command line: the subcommand registry, the common options and output.

Imported by the subcommand modules (cli_model, cli_analysis, cli_oracle) and by the entry
point (cli.py); it imports none of them, so imports flow one way:
cli -> cli_model / cli_analysis / cli_oracle -> cli_common.
"""
from __future__ import annotations

import argparse
import time
import warnings

from . import output
from .errors import RefimplError

COMMANDS: dict = {}


def command(name: str, help: str):
    def deco(fn):
        COMMANDS[name] = (help, fn)
        return fn
    return deco


class HelpFormatter(argparse.HelpFormatter):
    """Shows every option's default after its help (except for flags and options without one)."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "%(default)" in h or action.default in (None, False, argparse.SUPPRESS) or action.nargs == 0:
            return h
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return h
        return f"{h} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(*a, **kw)

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
    """--ids: ASCII decimal integers separated by commas (spaces allowed around them); an empty
    item ("5,,9", a trailing comma) or any other digit (Python's int() also reads "٥") is refused."""
    import re
    if not s.strip():
        raise RefimplError("--ids is empty")
    items = [x.strip() for x in s.split(",")]
    bad = next((x for x in items if not re.fullmatch(r"[+-]?[0-9]+", x, flags=re.ASCII)), None)
    if bad is not None:
        what = "an empty item" if bad == "" else f"{bad!r}"
        raise RefimplError(f"--ids must be comma-separated integers, got {s!r} ({what})")
    return [int(x) for x in items]


def open_model(args):
    from .api import load
    model, convert = getattr(args, "model", None), getattr(args, "convert", False)
    if convert:
        import os
        from .checkpoints import is_converted
        from .embedded import embedded_models
        if model is None:
            no_effect("--convert", "without --model (the embedded model is converted already)")
        if is_converted(model) or (not os.path.exists(model) and model in embedded_models()):
            no_effect("--convert", f"with --model {model}: it is a converted model already")
    if getattr(args, "target", None) is not None and getattr(args, "target_id", None) is not None:
        raise RefimplError("give either --target or --target-id, not both")
    m = load(model, dtype=getattr(args, "dtype", "float64"), convert=convert)
    m.warm_start()                  # tokenizer and layer 0 in background threads while the command starts
    return m


def model_options(p, dtype=True):
    """--model, --convert and --dtype."""
    p.add_argument("--model", default=None, metavar="NAME_OR_DIR",
                   help="converted model directory or embedded model name (default: the embedded model; "
                        "`refimpl models` lists them)")
    p.add_argument("--convert", action="store_true",
                   help="if --model is an unconverted checkpoint (Hugging Face, Meta, fairseq, llama2.c), "
                        "convert it once into the user cache and use that")
    if dtype:
        p.add_argument("--dtype", default="float64", choices=["float32", "float64"], help="compute dtype")


def common(p, target=True, readout=True, json=True):
    """The prompt, model, position, readout, target and output options of the analysis commands."""
    p.add_argument("prompt", nargs="?", default=None,
                   help="text prompt (tokenized, with the model family's start tokens put in front)")
    p.add_argument("--ids", default=None, help="comma-separated token ids instead of PROMPT, used verbatim")
    add_prepend_bos(p)
    model_options(p)
    p.add_argument("--position", type=int, default=None,
                   help="analysed position, 0-based; negative counts from the end (default: the last)")
    if readout:
        p.add_argument("--readout", default="frozen", choices=["frozen", "frozen-nobias", "raw", "lens"],
                       help="vocabulary readout (default frozen: the final norm's scale frozen at the analysed "
                            "state, its bias kept, so the final state reads as the model's own log-probabilities; "
                            "frozen-nobias: the authors' published convention, final LayerNorm bias dropped; "
                            "raw: no final norm; lens: each vector normalised on its own; docs/design-choices.md)")
    if target:
        p.add_argument("--target", default=None,
                       help="target token: one vocabulary token, its leading space included where the "
                            "tokenizer has one (GPT-2) (default: the top-1 prediction)")
        p.add_argument("--target-id", type=int, default=None, help="target token id (instead of --target)")
    if json:
        p.add_argument("--json", action="store_true",
                       help="print one JSON object (schema in refimpl/data/schemas/, docs/json.md) instead of text")


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
    """(model, trace, t, w, readout) from the common options; remembered for `emit`."""
    from .forward import run
    from .locate import prompt_warnings, resolve_position, resolve_target
    model = open_model(args)
    src = prompt_source(args)
    trace = run(model, src, getattr(args, "prepend_bos", None))
    t = resolve_position(trace, args.position)
    w, notes = None, prompt_warnings(model, src, getattr(args, "prepend_bos", None))
    if hasattr(args, "target"):
        w = resolve_target(model, trace.log_probs[t], args.target, args.target_id, notes=notes)
    for msg in notes:                       # unknown prompt words, target notes: on stderr and in --json
        warnings.warn(msg, UserWarning, stacklevel=2)
    R = trace.readout(t, args.readout) if hasattr(args, "readout") else None
    args._run = (trace, src, t, w)
    return model, trace, t, w, R


def emit(args, body: dict, text: str):
    """Print the text, or with --json the command's JSON object: the common header (for the
    prompt commands, after `prepare`), the body, the warnings shown during the run, timing."""
    if not args.json:
        print(text)
        return
    if "schema_version" in body:                               # built whole already (locate)
        obj = dict(body)
    elif getattr(args, "_run", None) is not None:
        trace, src, t, w = args._run
        obj = {**output.header(args.cmd, trace, src, t, w, getattr(args, "readout", None)), **body}
    else:
        obj = {**output.base(args.cmd), **body}
    shown = [m for m in getattr(args, "_warnings", []) if m not in obj.get("warnings", [])]
    if shown or "warnings" in obj:
        obj["warnings"] = obj.get("warnings", []) + shown
    obj.setdefault("timing", {"seconds": time.perf_counter() - getattr(args, "_t0", time.perf_counter())})
    obj["timing"] = obj.pop("timing")                          # last
    print(output.dumps(obj))


def check_layer(model, i):
    if i is None or not 0 <= i < model.cfg.n_layers:
        raise RefimplError(f"layer {i} out of range (model has {model.cfg.n_layers} layers)")


def check_neuron(model, k):
    if k is None or not 0 <= k < model.cfg.d_ff:
        raise RefimplError(f"neuron {k} out of range (FFN width {model.cfg.d_ff})")


def no_effect(option: str, why: str):
    """An option given where it changes nothing is an error, not silently ignored."""
    raise RefimplError(f"{option} has no effect {why}")
