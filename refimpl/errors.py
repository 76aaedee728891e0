"""One exception type for every user-facing failure.

The CLI turns a `RefimplError` into one line on stderr and exit code 2; anything else
is a bug in refimpl and is allowed to show a traceback.
"""


class RefimplError(Exception):
    """A clear, one-line problem with the user's input (file, prompt, option)."""


class FormatError(RefimplError):
    """A file is not in the format it claims to be (truncated, corrupted, hostile)."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived while refimpl was writing (SIGINT stays a plain
    KeyboardInterrupt): raised so that the writer removes its temporary files first."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
