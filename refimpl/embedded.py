"""Models shipped inside the package (refimpl/data/models/<name>/, canonical format)."""
from __future__ import annotations

import os

from .errors import RefimplError

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "models")
DEFAULT = "capitals-gpt2"


def embedded_models() -> list[str]:
    if not os.path.isdir(DATA):
        return []
    return sorted(n for n in os.listdir(DATA) if os.path.isfile(os.path.join(DATA, n, "config.json")))


def resolve_model(model: str | None) -> str:
    """A --model argument to a directory: a path, an embedded model's name, or None for the default."""
    if model is None:
        if DEFAULT in embedded_models():
            return os.path.join(DATA, DEFAULT)
        raise RefimplError("no --model given and no embedded default model is installed")
    if not os.path.exists(model) and model in embedded_models():
        return os.path.join(DATA, model)
    if not os.path.isdir(model):
        raise RefimplError(f"{model}: model directory not found")
    return model
