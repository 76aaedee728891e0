"""Models shipped inside the package (refimpl/data/models/<name>/, canonical format),
and the resolution of a model argument (a name, a path, or nothing for the default)."""
from __future__ import annotations

import os

from .errors import FormatError, RefimplError

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "models")
DEFAULT = "capitals-gpt2"


def embedded_models() -> list[str]:
    if not os.path.isdir(DATA):
        return []
    return sorted(n for n in os.listdir(DATA) if os.path.isfile(os.path.join(DATA, n, "config.json")))


def resolve_model(model: str | None, convert: bool = False) -> str:
    """A --model argument to a converted model directory: a path, an embedded model's name, or
    None for the default. An unconverted checkpoint is refused naming what it is and the
    `refimpl convert` command, or with `convert` converted once into the cache."""
    if model is None:
        if DEFAULT in embedded_models():
            return os.path.join(DATA, DEFAULT)
        raise RefimplError("no --model given and no embedded default model is installed")
    model = os.fspath(model)
    if not os.path.exists(model) and model in embedded_models():
        return os.path.join(DATA, model)
    if not os.path.exists(model):
        known = ", ".join(embedded_models()) or "none installed"
        raise RefimplError(f"{model}: model directory not found (and not an embedded model: {known})")
    from . import checkpoints
    if not checkpoints.is_converted(model):
        if convert and checkpoints.detect(model):
            return checkpoints.converted_copy(model)
        msg = checkpoints.unconverted_message(model)
        if msg:
            raise FormatError(msg)
    if not os.path.isdir(model):
        raise RefimplError(f"{model}: not a model directory (a converted model is a directory; see refimpl convert)")
    return model
