"""The `refimpl` command line.

Every user-facing failure is a RefimplError: one line on stderr, exit code 2.
Subcommands register themselves in COMMANDS as (add_arguments, run) pairs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

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


# --- convert / verify / predict ------------------------------------------------------

@command("convert", "convert a checkpoint (llama2.c, HF GPT-2/Llama, Meta LLaMA, fairseq) to the canonical format")
def cmd_convert(p, args=None):
    if args is None:
        p.add_argument("src", help="checkpoint file or directory")
        p.add_argument("dst", help="output model directory (must be empty or absent)")
        p.add_argument("--format", dest="fmt", default=None, help="force a source format")
        p.add_argument("--tokenizer", default=None, help="tokenizer file, where the format needs one")
        p.add_argument("--force", action="store_true", help="replace a non-empty DST")
        return
    import converters
    out = converters.convert(args.src, args.dst, fmt=args.fmt, force=args.force, tokenizer=args.tokenizer)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    print(f"wrote {out}: {cfg['family']} ({cfg['source']['format']}), {cfg['n_layers']} layers, "
          f"d_model {cfg['d_model']}, vocabulary {cfg['d_vocab']}")


@command("verify", "re-hash a converted model directory against the hashes recorded at conversion")
def cmd_verify(p, args=None):
    if args is None:
        p.add_argument("model", help="converted model directory")
        return
    from .verify import verify
    problems = verify(args.model)
    if problems:
        for line in problems:
            print(line)
        raise RefimplError(f"{args.model}: {len(problems)} file(s) failed verification")
    print(f"{args.model}: all files match their recorded sha256")


@command("predict", "run a prompt and print the next-token distribution at the last position")
def cmd_predict(p, args=None):
    if args is None:
        p.add_argument("prompt", nargs="?", default=None)
        p.add_argument("--ids", default=None, help="comma-separated token ids, used verbatim")
        p.add_argument("--model", default=None, help="converted model directory")
        p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
        p.add_argument("--top", type=positive_int, default=10)
        p.add_argument("--generate", type=positive_int, default=None, help="greedy-decode this many tokens")
        return
    from .forward import forward, run
    model = open_model(args)
    ids = parse_ids(args.ids) if args.ids else model.encode(args.prompt or "")
    if args.generate:
        out = list(ids)
        for _ in range(args.generate):
            nxt = int(np.argmax(forward(model, out).log_probs[-1]))
            if nxt in model.cfg.prepend_ids or len(out) >= model.cfg.n_ctx:
                break
            out.append(nxt)
        print(model.decode(out))
        return
    trace = run(model, ids)
    lp = trace.log_probs[-1]
    print("tokens:", " ".join(repr(t) for t in trace.tokens))
    for r, w in enumerate(np.argsort(-lp, kind="stable")[:args.top]):
        print(f"{r:>3}  {int(w):>6}  {model.token_str(w)!r:<20} p={np.exp(lp[w]):.6f}  log p={lp[w]:.6f}")


# --- entry point ------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from . import cli_analysis, cli_oracle  # noqa: F401  (register their subcommands)
    parser = _Parser(prog="refimpl", description="Residual-stream subvalue analysis in pure NumPy.")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    for name, (help_, fn) in COMMANDS.items():
        fn(sub.add_parser(name, help=help_, description=help_))
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {str(message).splitlines()[0] if str(message) else category.__name__}", file=sys.stderr)


def main(argv=None) -> int:
    import warnings
    warnings.showwarning = _one_line_warning
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not args.cmd:
            parser.print_help()
            return 2
        COMMANDS[args.cmd][1](None, args)
        return 0
    except RefimplError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except MemoryError:
        print("error: out of memory", file=sys.stderr)
        return 2
    except OSError as e:                    # the user's files and disk (permissions, a directory, full disk)
        where = "".join(f"{f}: " for f in (e.filename, e.filename2) if f)
        print(f"error: {where}{e.strerror or e}".splitlines()[0], file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
