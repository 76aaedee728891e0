"""The notebook entry points: `refimpl.load`, `refimpl.models`, `refimpl.locate`.

    >>> import refimpl
    >>> r = refimpl.locate("The capital of France is")     # the embedded model by default
    >>> r.to_dict()["target"]["token"]
    'Paris'

`locate` returns a `LocateResult`: a short repr, `.report()` (the full text report of
`refimpl locate`), `.to_dict()` (exactly the `refimpl locate --json` object),
`.to_frame(kind)` (pandas), `.plot(dir)` (the paper's figures).
"""
from __future__ import annotations

import copy
import os

from .errors import RefimplError
from .model import Model

_MODELS: dict = {}          # (path, dtype, files' mtimes) -> Model: repeated locate() calls reuse one load


def models() -> list[str]:
    """Names of the models shipped with the package (`refimpl.load(name)` opens one)."""
    from .embedded import embedded_models
    return embedded_models()


def load(name_or_path: str | None = None, dtype: str = "float64", convert: bool = False, **options) -> Model:
    """Open a model: an embedded model's name (see `models()`), a converted model directory,
    or None for the default embedded model. Reads headers only; weights are memory-mapped.

    An unconverted checkpoint (Hugging Face, Meta, fairseq, llama2.c) is refused with the
    `refimpl convert` command to run, or converted once into the user cache with convert=True.
    Other options go to `refimpl.model.load` (e.g. cache_bytes, the in-memory weight cache)."""
    from .embedded import resolve_model
    from .model import load as load_dir
    return load_dir(resolve_model(name_or_path, convert=convert), dtype=dtype, **options)


def _model(model, dtype: str) -> Model:
    if isinstance(model, Model):
        return model
    from .embedded import resolve_model
    path = os.path.abspath(resolve_model(model))
    stamp = tuple(os.stat(os.path.join(path, f)).st_mtime_ns for f in sorted(os.listdir(path))
                  if f.endswith((".json", ".safetensors")))
    key = (path, dtype, stamp)
    if key not in _MODELS:
        _MODELS.clear()                                     # keep one model open, not every one ever used
        _MODELS[key] = load(path, dtype=dtype)
    return _MODELS[key]


def locate(prompt, model=None, target=None, top: int = 10, readout: str = "frozen", *, position=None,
           exhaustive: bool = False, counts="auto", dtype: str = "float64", **options) -> "LocateResult":
    """Where the prediction for `prompt` comes from: `refimpl locate` as a function.

    prompt: text (the family's start tokens are added) or a list of token ids (used verbatim).
    model: a Model, an embedded model's name, a converted model directory, or None (the
    default embedded model, loaded once and reused). target: a token string (a single token)
    or a token id; default the top-1 prediction. top: K best subvalues of each kind.
    readout: how vectors are read in vocabulary space (frozen, raw, lens; see
    docs/design-choices.md). position: analysed position (default the last). exhaustive:
    score every FFN subvalue by brute force. counts: per-layer FFN counts (True, False, "auto").
    dtype: compute dtype when the model is given by name or path. Other keyword options
    are passed to `refimpl.locate.locate`."""
    from .locate import locate as run_locate
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise RefimplError(f"top must be a positive integer, got {top!r}")
    m = _model(model, dtype)
    target_id = None
    if isinstance(target, int) and not isinstance(target, bool):
        target, target_id = None, target
    record = run_locate(m, prompt, target=target, target_id=target_id, position=position, top=top,
                        readout=readout, exhaustive=exhaustive, counts=counts, **options)
    return LocateResult(record, m)


FRAMES = ("layers", "subvalues", "counts", "tokens", "activation")


class LocateResult:
    """The result of `refimpl.locate`: `.to_dict()` is the `refimpl locate --json` object;
    `r["key"]` reads it; `.report()` is the full text report."""

    def __init__(self, record: dict, model: Model):
        self._record, self.model = record, model

    def to_dict(self) -> dict:
        """A copy of the JSON object (schema refimpl/data/schemas/locate.json, docs/json.md)."""
        return copy.deepcopy(self._record)

    def __getitem__(self, key):
        return self._record[key]

    def keys(self):
        return self._record.keys()

    def report(self) -> str:
        """The full text report, as `refimpl locate` prints it."""
        from .locate import format_report
        return format_report(self._record, self.model)

    def __repr__(self) -> str:
        from . import display
        r = self._record
        tok = lambda o: display.show(o["token"], o.get("piece"))                                   # noqa: E731
        prompt = r["prompt"] if r["prompt"] is not None else f"ids {r['ids']}"
        prompt = prompt if len(prompt) <= 80 else prompt[:77] + "..."
        t, p = r["target"], r["prediction"]
        lines = [f"LocateResult({prompt!r}, model={r['model']['name']!r}, {r['dtype']}, readout={r['readout']})",
                 f"  prediction {tok(p)} p={p['prob']:.4f}; target {tok(t)} (id {t['id']}) "
                 f"log p={t['log_prob']:.4f} rank {t['rank']}"]
        if r["layers"]:
            kind, L = max(((k, L) for L in r["layers"] for k in ("attn", "ffn")),
                          key=lambda x: x[1][x[0]]["log_prob_increase"])
            lines.append(f"  strongest layer: {'FFN' if kind == 'ffn' else 'attention'} {L['layer']} "
                         f"(log p {L[kind]['log_prob_increase']:+.4f})")
        names = {"attn": "attention", "ffn": "FFN", "attn_neuron": "attention-neuron"}
        for kind, name in names.items():
            subs = [s for s in r["top_subvalues"] if s["kind"] == kind][:3]
            if subs:
                lines.append(f"  top {name} subvalues: " + ", ".join(f"{_where(s, r)} {s['log_prob_increase']:+.4f}"
                                                                   for s in subs))
        for w in r.get("warnings", [])[:3]:
            lines.append(f"  warning: {w[:150]}")
        lines.append("  (.report() full report, .to_dict(), .to_frame(kind), .plot(dir))")
        return "\n".join(lines)

    __str__ = __repr__

    def to_frame(self, kind: str = "layers"):
        """A pandas DataFrame of one part of the result: "layers" (one row per layer),
        "subvalues" (the top subvalues), "counts" (per-layer FFN counts), "tokens" (the
        prompt), "activation" (what activates the top FFN subvalue). Needs pandas."""
        if kind not in FRAMES:
            raise ValueError(f"kind must be one of {', '.join(FRAMES)}, got {kind!r}")
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("to_frame needs pandas: pip install pandas") from None
        r = self._record
        if kind == "layers":
            rows = [{"layer": L["layer"], "attn_log_prob_increase": L["attn"]["log_prob_increase"],
                     "attn_prob_increase": L["attn"]["prob_increase"],
                     "ffn_log_prob_increase": L["ffn"]["log_prob_increase"],
                     "ffn_prob_increase": L["ffn"]["prob_increase"]} for L in r["layers"]]
            return pd.DataFrame(rows).set_index("layer")
        if kind == "subvalues":
            return pd.DataFrame([dict(s) for s in r["top_subvalues"]])
        if kind == "counts":
            if "ffn_counts" not in r:
                raise ValueError(f"this result has no per-layer counts ({r.get('ffn_counts_note', 'counts=False')}); "
                                 f"call refimpl.locate(..., counts=True)")
            return pd.DataFrame([dict(c) for c in r["ffn_counts"]]).set_index("layer")
        if kind == "tokens":
            return pd.DataFrame({"position": range(len(r["ids"])), "id": r["ids"], "token": r["tokens"],
                                 "piece": r["pieces"]}).set_index("position")
        rows = [{"which": a["which"], "source": c["source"], "value": c["value"]}
                for a in r.get("activation_trace", []) for c in a["contributions"]]
        return pd.DataFrame(rows, columns=["which", "source", "value"])

    def plot(self, directory: str) -> dict[str, str]:
        """Write the paper's figures for this result as PNGs into `directory` (created; must be
        empty or absent) and return {figure name: path}. Needs matplotlib."""
        from .plots import require_matplotlib, write_figures
        require_matplotlib()
        figures = write_figures(self.model, self._record["ids"], self._record, os.fspath(directory))
        self._record["figures"] = figures
        return dict(figures)


def _where(s: dict, r: dict) -> str:
    from . import display
    if s["kind"] == "attn":
        pieces = r.get("pieces") or [None] * len(r["tokens"])
        return f"L{s['layer']} pos {s['index']} {display.show(r['tokens'][s['index']], pieces[s['index']])}"
    if s["kind"] == "ffn":
        return f"L{s['layer']} n{s['index']}"
    return f"L{s['layer']} head {s.get('head')} dim {s.get('dim')} pos {s.get('position')}"
