"""The `refimpl` command line.

Every user-facing failure is a RefimplError: one line on stderr, exit code 2.
The subcommands live in cli_model, cli_analysis and cli_oracle and register themselves
in cli_common.COMMANDS when imported here (imports flow one way: this module imports
them; they import only cli_common).
"""
from __future__ import annotations

import argparse
import sys
import time

from . import __version__, cli_model, cli_analysis, cli_oracle, cli_batch  # noqa: F401  (register their subcommands)
from .cli_common import COMMANDS, _Parser
from .errors import RefimplError
from .files import printable


# --- entry point ------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="refimpl", description="Residual-stream subvalue analysis in pure NumPy "
                     "(Yu & Ananiadou). `refimpl COMMAND --help` describes each command.")
    parser.add_argument("--version", action="version", version=f"refimpl {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    for name, (help_, fn) in COMMANDS.items():
        fn(sub.add_parser(name, help=help_, description=help_))
    return parser


def _one_line(message, category) -> str:
    return printable(str(message)) if str(message) else category.__name__      # one inert line


def main(argv=None) -> int:
    import warnings
    shown: list[str] = []

    def showwarning(message, category, filename, lineno, file=None, line=None):
        msg = _one_line(message, category)
        print(f"warning: {msg}", file=sys.stderr)
        shown.append(msg)                   # also listed in the JSON output's `warnings`

    with warnings.catch_warnings():         # filters and handler restored on return (main may run in-process)
        warnings.simplefilter("always", UserWarning)      # each run shows its warnings, not once per process
        warnings.showwarning = showwarning
        return _main(argv, shown)


def _main(argv, shown: list) -> int:
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:             # --help, --version
            return int(e.code or 0) if not isinstance(e.code, str) else 2
        if not args.cmd:
            parser.print_help()
            return 2
        args._t0, args._warnings = time.perf_counter(), shown
        return int(COMMANDS[args.cmd][1](None, args) or 0)     # a command may return an exit code (compare: 1)
    except RefimplError as e:
        print(f"error: {printable(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:          # Ctrl-C, or SIGTERM/SIGHUP while writing (errors.Interrupted)
        import signal
        signum = getattr(e, "signum", signal.SIGINT)
        name = signal.Signals(signum).name if signum != signal.SIGINT else ""
        hint = getattr(e, "hint", "")
        print(f"error: interrupted{f' ({name})' if name else ''}{f'; {hint}' if hint else ''}", file=sys.stderr)
        return 128 + int(signum)
    except BrokenPipeError:
        return 0
    except MemoryError:
        print("error: out of memory", file=sys.stderr)
        return 2
    except OSError as e:                    # the user's files and disk (permissions, a directory, full disk)
        where = "".join(f"{f}: " for f in (e.filename, e.filename2) if f)
        print(f"error: {printable(where + str(e.strerror or e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
