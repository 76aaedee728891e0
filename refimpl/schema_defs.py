"""The JSON Schemas of every `--json` output, written as Python data (the source of truth).

`python -m refimpl.schema_defs` writes them to refimpl/data/schemas/<command>.json, the
files that ship in the package (self-contained: every file carries the shared `$defs`);
tests/test_json_contract.py checks the files equal what this module builds and validates
every command's real output against them. docs/json.md describes them.

What the schemas enforce: the required keys and their types (integers, numbers, strings,
booleans, enums, labelled objects rather than bare arrays of numbers). What they allow:
extra keys anywhere (additions are not breaking changes; schema_version changes when a
key is removed, renamed or changes meaning).
"""
from __future__ import annotations

import json
import os

from .output import SCHEMA_DIR, SCHEMA_VERSION

INT = {"type": "integer"}
NAT = {"type": "integer", "minimum": 0}
NUM = {"type": "number"}
STR = {"type": "string"}
BOOL = {"type": "boolean"}
PROB = {"type": "number", "minimum": 0, "maximum": 1}
STRS = {"type": "array", "items": STR}


def obj(required: dict, optional: dict | None = None) -> dict:
    """An object with these required and optional properties (others allowed)."""
    return {"type": "object", "required": list(required), "properties": {**required, **(optional or {})}}


def arr(items) -> dict:
    return {"type": "array", "items": items}


def ref(name: str) -> dict:
    return {"$ref": f"#/$defs/{name}"}


def nullable(s: dict) -> dict:
    return {"anyOf": [s, {"type": "null"}]}


INCREASE = obj({"log_prob_increase": NUM, "prob_increase": NUM})
SHARE_BOUND = {"type": "array", "items": PROB, "minItems": 2, "maxItems": 2}   # [lo, hi] with share "bound"

DEFS = {
    "token": obj({"id": NAT, "token": STR}, {"piece": nullable(STR)}),
    "target": obj({"id": NAT, "token": STR, "log_prob": NUM, "prob": PROB, "rank": NAT}, {"piece": nullable(STR)}),
    "model": obj({"name": STR, "path": STR, "family": STR,
                  "config_digest": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
                 {"n_layers": NAT, "d_model": NAT, "d_ff": NAT, "n_heads": NAT, "d_vocab": NAT}),
    "timing": obj({"seconds": {"type": "number", "minimum": 0}}),
    "increase": INCREASE,
    "layer_row": obj({"layer": NAT, "attn": INCREASE, "ffn": INCREASE}),
    "ffn_counts_row": obj({"layer": NAT, "activated": NAT, "helpful": NAT, "unhelpful": NAT, "negligible": NAT,
                           "threshold": {"type": "number", "minimum": 0},
                           "top10_share": {"anyOf": [PROB, SHARE_BOUND]},
                           "top10_share_unhelpful": {"anyOf": [PROB, SHARE_BOUND]},
                           "share": {"enum": ["exact", "bound"]}},
                          {"scored": NAT}),
    "bs_token": obj({"id": NAT, "token": STR, "bs": NUM}, {"piece": nullable(STR)}),
}

READOUTS = ["frozen", "frozen-nobias", "raw", "lens"]


def _common_file() -> dict:
    return {"schema_version": {"const": SCHEMA_VERSION}, "refimpl_version": STR}


def _prompt_header(command: str, readout: bool, target: bool) -> dict:
    """Required keys of every prompt command's output."""
    return {**_common_file(), "command": {"const": command},
            "model": ref("model"), "dtype": {"enum": ["float32", "float64"]},
            "readout": {"enum": READOUTS} if readout else {"type": "null"},
            "prompt": nullable(STR), "ids": arr(NAT), "tokens": STRS, "pieces": arr(nullable(STR)),
            "position": NAT, "target": ref("target") if target else nullable(ref("target")),
            "prediction": ref("target"), "warnings": STRS, "timing": ref("timing")}


def _schema(command: str, title: str, required: dict, optional: dict | None = None,
            extra: dict | None = None) -> dict:
    s = {"$schema": "https://json-schema.org/draft/2020-12/schema",
         "$id": f"https://refimpl/schemas/{command}.json",
         "title": f"refimpl {command} --json", "description": title,
         **obj(required, optional), "$defs": DEFS}
    s.update(extra or {})
    return s


def _prompt(command, title, body: dict, optional: dict | None = None, readout=True, target=True, extra=None):
    return _schema(command, title, {**_prompt_header(command, readout, target), **body}, optional, extra)


def _file(command, title, body: dict, optional: dict | None = None):
    return _schema(command, title, {**_common_file(), "command": {"const": command}, **body}, optional)


def _kind_rule(kind: str, required: dict) -> dict:
    return {"if": {"properties": {"kind": {"const": kind}}, "required": ["kind"]},
            "then": {"required": list(required), "properties": required}}


TOP_SUBVALUE = {
    **obj({"kind": {"enum": ["attn", "ffn", "attn_neuron"]}, "layer": NAT, "log_prob_increase": NUM,
           "prob_increase": NUM, "target_rank": NAT, "top_tokens": STRS},
          {"top_token_ids": arr(NAT)}),
    "allOf": [_kind_rule("attn", {"index": NAT, "source_token": STR}),
              _kind_rule("ffn", {"index": NAT, "coefficient": NUM, "target_rank_in_fc2": NAT}),
              _kind_rule("attn_neuron", {"head": NAT, "dim": NAT, "position": NAT})],
}

CONTRIBUTION = obj({"source": STR, "value": NUM})
LABELLED_VALUE = obj({"label": STR, "value": NUM}, {"top_tokens": STRS, "top_token_ids": arr(NAT)})
ACTIVATION = obj({"layer": NAT, "neuron": NAT, "position": NAT, "which": {"enum": ["in", "gate"]},
                  "pre_activation": NUM, "coefficient": NUM, "contributions": arr(CONTRIBUTION)},
                 {"top_source": obj({"source": STR, "subvalues": arr(LABELLED_VALUE)})})
SOURCE_TRACE = obj({"which": {"enum": ["in", "gate"]}, "source": STR, "by": STR, "total": NUM,
                    "subvalues": arr(LABELLED_VALUE)}, {"layer": NAT, "neuron": NAT})


def build() -> dict[str, dict]:
    """{command: schema} for every command with a --json output."""
    S = {}
    S["locate"] = _prompt(
        "locate", "The main job: layer significance, the exact top-K attention and FFN subvalues with their "
                  "vocabulary views, per-layer FFN counts and what activates the top FFN subvalue.",
        {"exhaustive": BOOL, "layers": arr(ref("layer_row")), "top_subvalues": arr(TOP_SUBVALUE),
         "ffn_scored": NAT, "attn_scored": NAT, "attn_neuron_scored": NAT},
        {"ffn_counts": arr(ref("ffn_counts_row")), "ffn_counts_note": STR, "activation_trace": arr(ACTIVATION),
         "prepend_bos": nullable(BOOL), "readout_log_prob": NUM,
         "bs_difference": obj({"target": ref("token"),
                               "versus": obj({"id": NAT, "token": STR, "chosen_by": {"enum": ["runner-up", "--versus"]}},
                                             {"piece": nullable(STR)}),
                               "start": NUM, "end": NUM, "layers": arr(obj({"layer": NAT, "attn": NUM, "ffn": NUM}))}),
         "figures": {"type": "object", "additionalProperties": STR},
         "figure_data": {"type": "object"}})
    S["predict"] = _prompt(
        "predict", "The next-token distribution at the analysed position (and a greedy continuation).",
        {"top": arr(obj({"rank": NAT, "id": NAT, "token": STR, "log_prob": NUM, "prob": PROB},
                        {"piece": nullable(STR)}))},
        {"generated": obj({"ids": arr(NAT), "tokens": STRS, "text": STR, "stop": STR})},
        readout=False)
    S["layers"] = _prompt("layers", "Log-probability and probability increase of every attention and FFN layer.",
                          {"layers": arr(ref("layer_row"))})
    entry = obj({"rank": NAT, "log_prob_increase": NUM, "prob_increase": NUM},
                {"neuron": NAT, "position": NAT, "head": NAT, "dim": NAT, "source_token": STR, "coefficient": NUM})
    S["subvalues"] = _prompt(
        "subvalues", "Subvalue significance of one layer, the K best first.",
        {"layer": NAT, "kind": {"enum": ["attn", "ffn"]}, "by": nullable({"enum": ["position", "head", "head_position",
                                                                                 "head_neuron_position"]}),
         "n_subvalues": NAT, "subvalues": arr(entry), "bias": INCREASE},
        {"summary": ref("ffn_counts_row")})
    S["vocab"] = _prompt(
        "vocab", "Vocabulary view of a vector: top and bottom tokens by bs-value, the target's rank.",
        {"layer": NAT, "vector": STR, "index": nullable(NAT), "top": arr(ref("bs_token")),
         "bottom": arr(ref("bs_token")), "target_rank": NAT, "target_bs": NUM},
        {"coefficient": NUM, "target_rank_in_fc2": NAT})
    S["additivity"] = _prompt(
        "additivity", "C(v1+...+vk) against C(v1)+...+C(vk) for a layer's helpful subvalues, k = 1, 2, ...",
        {"layer": NAT, "kind": {"enum": ["attn", "ffn"]},
         "steps": arr(obj({"k": NAT, "index": NAT, "sum_of_log_prob_increases": NUM, "log_prob_increase_of_sum": NUM,
                           "sum_of_prob_increases": NUM, "prob_increase_of_sum": NUM}))})
    S["subkey"] = _prompt(
        "subkey", "The exact decomposition of FFN pre-activations (Eq. 23): h = x@K/sigma - mu*lambda/sigma + B.",
        {"layer": NAT, "which": {"enum": ["in", "gate"]}, "mu": NUM, "sigma": NUM,
         "neurons": arr(obj({"neuron": NAT, "xK": NUM, "lambda": NUM, "B": NUM, "h": NUM}))},
        readout=False, target=False)
    S["trace"] = _prompt(
        "trace", "Activation tracing of one FFN neuron (Section 4.2): contributions to its pre-activation.",
        {"layer": NAT, "neuron": NAT, "subkeys": arr({"anyOf": [ACTIVATION, SOURCE_TRACE]})},
        readout=False, target=False)
    S["compare-tokens"] = _prompt(
        "compare-tokens", "bs-values of tokens at every residual state, and per-layer changes of the difference.",
        {"compared": arr(ref("token")),
         "trajectory": arr(obj({"state": STR, "bs": arr(ref("bs_token"))}))},
        {"difference": obj({"a": ref("token"), "b": ref("token"), "start": NUM, "end": NUM,
                            "layers": arr(obj({"layer": NAT, "attn": NUM, "ffn": NUM}))})},
        target=False)
    row = obj({"layer": NAT, "neuron": NAT, "log_prob_increase": NUM, "coef_x_norm": NUM, "coefficient": NUM,
               "fc2_norm": NUM, "target_rank": NAT})
    S["baseline"] = _prompt(
        "baseline", "Appendix E: top FFN subvalues by coefficient x norm (|m| x ||fc2|| as in Table 4, or signed) "
                    "and by log-probability increase.",
        {"score": {"enum": ["|m| * ||fc2||", "m * ||fc2||"]}, "by_log_prob_increase": arr(row),
         "by_coef_x_norm": arr(row)})
    S["dump"] = _prompt(
        "dump", "A dump file was written (docs/oracle.md).",
        {"out": STR, "n_tensors": NAT, "subvalue_scores": BOOL})
    S["compare"] = _file(
        "compare", "Two dumps compared tensor by tensor.",
        {"a": STR, "b": STR, "rtol": NUM, "atol": NUM, "ok": BOOL, "n_shared": NAT, "n_failed": NAT,
         "tensors": arr(obj({"name": STR, "ok": BOOL, "shape_a": arr(NAT), "shape_b": arr(NAT)},
                            {"max_abs": NUM, "max_rel": NUM, "problem": STR, "first_bad_index": arr(NAT),
                             "values_at_first_bad": arr(NUM)})),
         "only_in_a": STRS, "only_in_b": STRS})
    S["models"] = _file(
        "models", "The models shipped with the package.",
        {"models": arr(obj({"name": STR, "default": BOOL, "path": STR, "family": STR, "n_layers": NAT,
                            "d_model": NAT, "d_vocab": NAT}))})
    S["verify"] = _file(
        "verify", "A converted model re-hashed against the hashes recorded at conversion.",
        {"path": STR, "ok": BOOL, "problems": STRS})
    return S


def write_schemas(schemas: dict, directory: str) -> list[str]:
    """Write each schema as directory/<name>.json; the paths written."""
    os.makedirs(directory, exist_ok=True)
    out = []
    for name, s in schemas.items():
        path = os.path.join(directory, f"{name}.json")
        with open(path, "w", encoding="utf-8") as f:
            f.write(render(s))
        out.append(path)
    return out


def write(directory: str = SCHEMA_DIR) -> list[str]:
    return write_schemas(build(), directory)


def render(s: dict) -> str:
    return json.dumps(s, indent=1) + "\n"


if __name__ == "__main__":
    for p in write():
        print(p)
