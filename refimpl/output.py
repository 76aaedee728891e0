"""The one output contract: what every `--json` (and `refimpl.locate(...).to_dict()`) is made of.

Every JSON output is one object. Those about a prompt start with the same header
(`header`): schema_version, refimpl_version, command, model (name, path, family,
config_digest, sizes), dtype, readout, prompt, ids, tokens, pieces, position, target,
prediction, warnings; then the command's own labelled entries; then `timing`, the only
part that changes between two runs of the same command. Commands about files
(models, verify, compare, ...) start with schema_version, refimpl_version and command.

The JSON Schema of each command's output ships in refimpl/data/schemas/<command>.json
(docs/json.md describes them); `schema(command)` loads one, `validate(obj)` checks one
(needs the `jsonschema` package).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings

import numpy as np

SCHEMA_VERSION = 2          # 2: ffn_counts with a negligible threshold, exact shares (docs/json.md)
SCHEMA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "schemas")


def _version() -> str:
    from . import __version__
    return __version__


def base(command: str) -> dict:
    """The keys every output starts with."""
    return {"schema_version": SCHEMA_VERSION, "refimpl_version": _version(), "command": command}


# --- the model, tokens and the target -------------------------------------------------------

def model_name(model) -> str:
    """The embedded model's name, or the model directory's name."""
    return os.path.basename(os.path.normpath(os.path.abspath(model.path)))


def config_digest(path: str) -> str:
    """sha256 of config.json's content without its own recorded digest (the digest `refimpl
    convert` records as config_sha256 and `refimpl verify` checks), computed from the file."""
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        raw = json.load(f)
    body = {k: v for k, v in raw.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def model_info(model) -> dict:
    c = model.cfg
    return {"name": model_name(model), "path": os.path.abspath(model.path), "family": c.family,
            "config_digest": config_digest(model.path), "n_layers": c.n_layers, "d_model": c.d_model,
            "d_ff": c.d_ff, "n_heads": c.n_heads, "d_vocab": c.d_vocab}


def token_info(model, i: int) -> dict:
    """{id, token (the exact decoded string), piece (the raw vocabulary entry)}."""
    from .display import piece
    return {"id": int(i), "token": model.token_str(int(i)), "piece": piece(model, int(i))}


def target_info(model, log_probs_t: np.ndarray, w: int) -> dict:
    """The target object: the token and its log-probability, probability and 0-based rank
    in the model's own next-token distribution at the analysed position."""
    from .readout import rank_of
    lp = float(log_probs_t[w])
    return {**token_info(model, w), "log_prob": lp, "prob": float(np.exp(lp)), "rank": rank_of(log_probs_t, int(w))}


def header(command: str, trace, prompt, t: int, w: int | None, readout: str | None) -> dict:
    """The common head of every prompt command's output (see the module docstring)."""
    from .display import piece
    model = trace.model
    lp = trace.log_probs[t]
    top = int(np.argmax(lp))
    return {**base(command), "model": model_info(model), "dtype": str(model.dtype), "readout": readout,
            "prompt": prompt if isinstance(prompt, str) else None,
            "ids": [int(i) for i in trace.ids], "tokens": trace.tokens,
            "pieces": [piece(model, i) for i in trace.ids], "position": int(t),
            "target": None if w is None else target_info(model, lp, w),
            "prediction": target_info(model, lp, top), "warnings": []}


# --- warnings ------------------------------------------------------------------------------

def collected(fn):
    """Decorator: the warnings (UserWarning and its subclasses: refimpl's own, such as an
    unknown token) raised while `fn` builds an output object are also listed in the object's
    `warnings`, every time (not once per place as Python shows them), and all caught warnings
    still reach the caller's handlers. (Warning filters are process-wide: do not build two
    objects at once in threads of one process.)"""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            out = fn(*args, **kwargs)
        add_warnings(out, caught)
        return out
    return wrapper


def add_warnings(obj: dict, caught) -> None:
    """List the messages of caught UserWarnings in obj["warnings"] (once each) and re-emit
    every caught warning to the handlers outside."""
    for w in caught:
        msg = str(w.message).splitlines()[0] if str(w.message) else w.category.__name__
        if isinstance(obj, dict) and issubclass(w.category, UserWarning) and msg not in obj.setdefault("warnings", []):
            obj["warnings"].append(msg)
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


# --- JSON ----------------------------------------------------------------------------------

def jsonable(x):
    """NumPy values and containers -> plain JSON values (json.dumps `default`)."""
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def dumps(obj: dict) -> str:
    return json.dumps(obj, indent=1, default=jsonable)


def schema(command: str) -> dict:
    """The JSON Schema of `command`'s output (refimpl/data/schemas/<command>.json)."""
    path = os.path.join(SCHEMA_DIR, f"{command}.json")
    if not os.path.isfile(path):
        from .errors import RefimplError
        raise RefimplError(f"no output schema for {command!r} (have: {', '.join(schema_names())})")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def schema_names() -> list[str]:
    return sorted(n[:-5] for n in os.listdir(SCHEMA_DIR) if n.endswith(".json"))


def validate(obj: dict, command: str | None = None) -> None:
    """Raise jsonschema.ValidationError unless obj matches the schema of its command
    (obj["command"] unless given). Needs the `jsonschema` package."""
    try:
        import jsonschema
    except ImportError:
        raise ImportError("validating output needs jsonschema: pip install jsonschema") from None
    s = schema(command or obj["command"])
    jsonschema.validate(json.loads(dumps(obj)), s, cls=jsonschema.Draft202012Validator)
