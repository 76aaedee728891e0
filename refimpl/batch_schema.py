"""JSON Schemas of `refimpl batch`'s files, written as Python data (the source of truth).

    python -m refimpl.batch_schema      # writes refimpl/data/schemas/batch/{record,summary}.json

- batch/record.json: one line of OUT/results.jsonl. Either the `refimpl locate --json` object
  (the locate schema) plus `id`, `group` and `key`, or an error record
  (`command` "batch-error": the prompt, the target asked for and the message).
- batch/summary.json: OUT/summary.json (refimpl/batch_summary.py).

They live in a folder of their own: refimpl/data/schemas/<command>.json are the schemas of the
commands' `--json` outputs (refimpl.schema_defs); `refimpl.output.validate(obj, "batch/record")`
checks a record. tests/test_batch_schema.py checks the files are current and validates real output.
"""
from __future__ import annotations

import copy
import os

from .output import SCHEMA_DIR, SCHEMA_VERSION
from .schema_defs import BOOL, INT, NAT, NUM, STR, STRS, arr, nullable, obj
from .schema_defs import build as build_commands

DIR = os.path.join(SCHEMA_DIR, "batch")
ID = {"anyOf": [STR, INT]}
KEY = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
BATCH_KEYS = {"id": ID, "group": nullable(STR), "key": KEY}


def record_schema() -> dict:
    loc = copy.deepcopy(build_commands()["locate"])
    located = {"type": "object", "required": ["id", "group", "key"] + loc["required"],
               "properties": {**BATCH_KEYS, **loc["properties"]}}
    error = obj({"schema_version": {"const": SCHEMA_VERSION}, "refimpl_version": STR,
                 "command": {"const": "batch-error"}, **BATCH_KEYS, "prompt": STR,
                 "target_requested": nullable(STR), "error": STR})
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "https://refimpl/schemas/batch/record.json",
            "title": "a line of refimpl batch's results.jsonl",
            "description": "The refimpl locate --json object of one prompt plus id, group and key (the sha256 of the "
                           "prompt, target, options and model digest), or an error record.",
            "oneOf": [located, error], "$defs": loc["$defs"]}


STATS = obj({"n": NAT}, {"mean": NUM, "std": NUM, "min": NUM, "q05": NUM, "q25": NUM, "median": NUM,
                         "q75": NUM, "q95": NUM, "max": NUM})
RECURRING = obj({"kind": {"enum": ["attn", "ffn", "attn_neuron"]}, "layer": NAT, "index": NAT, "count": NAT,
                 "share": NUM, "prompts": arr(ID), "mean_log_prob_increase": NUM, "top_tokens": STRS},
                {"mean_prob_increase": NUM, "max_target_rank": NAT, "mean_coefficient": NUM})
PART = obj({"log_prob_increase": STATS, "prob_increase": STATS})
GROUP = obj({"group": nullable(STR), "n_prompts": NAT, "n_analysed": NAT, "n_errors": NAT,
             "top1": obj({"count": NAT, "rate": nullable(NUM), "target_prob": STATS}),
             "layers": arr(obj({"layer": NAT, "attn": PART, "ffn": PART})),
             "ffn_counts": obj({"n": NAT, "layers": arr(obj({"layer": NAT, "n": NAT}))}),
             "recurring": arr(RECURRING),
             "errors": arr(obj({"id": ID, "error": STR}))})


def summary_schema() -> dict:
    body = obj({"schema_version": {"const": SCHEMA_VERSION}, "refimpl_version": STR,
                "command": {"const": "batch-summary"},
                "model": nullable(obj({"name": STR, "path": STR, "family": STR})),
                "options": nullable(obj({"top": NAT, "readout": STR, "dtype": STR, "exhaustive": BOOL})),
                "n_prompts": NAT, "n_errors": NAT, "groups": arr(GROUP), "overall": GROUP},
               {"figures": {"type": "object", "additionalProperties": STR}, "refimpl_versions": STRS})
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "https://refimpl/schemas/batch/summary.json",
            "title": "refimpl batch's summary.json",
            "description": "Per group and overall: top-1 rate, layer-level increases over cases, averaged FFN "
                           "counts, recurring subvalues.", **body}


def build() -> dict[str, dict]:
    return {"record": record_schema(), "summary": summary_schema()}


def write(directory: str = DIR) -> list[str]:
    from .schema_defs import write_schemas
    return write_schemas(build(), directory)


if __name__ == "__main__":
    for p in write():
        print(p)
