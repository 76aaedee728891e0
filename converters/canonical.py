"""The canonical model writer, for the converters: it lives in `refimpl.writer` (the format
owns how its directories are written; refimpl never imports converters)."""
from refimpl.writer import (CONVERTER_VERSION, SHARD_BYTES, Planned, check_destination,  # noqa: F401
                            write_canonical)

__all__ = ["CONVERTER_VERSION", "SHARD_BYTES", "Planned", "check_destination", "write_canonical"]
