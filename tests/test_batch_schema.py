"""The batch schemas ship current, real records and summaries validate, broken ones do not."""
import copy
import json
import os

import jsonschema
import pytest

from refimpl import batch_schema, output
from tests.test_batch import records, serial  # noqa: F401  (the module fixture: one real batch run)

V = jsonschema.Draft202012Validator


def test_shipped_batch_schemas_are_the_built_ones():
    for name, s in batch_schema.build().items():
        path = os.path.join(batch_schema.DIR, f"{name}.json")
        with open(path, encoding="utf-8") as f:
            from refimpl.schema_defs import render
            assert f.read() == render(s), f"{path} is stale: run python -m refimpl.batch_schema"
        V.check_schema(s)


def test_real_records_and_summary_validate(serial):  # noqa: F811
    recs = records(serial["out"])
    assert {r["command"] for r in recs} == {"locate", "batch-error"}
    for r in recs:
        output.validate(r, "batch/record")
    with open(os.path.join(serial["out"], "summary.json"), encoding="utf-8") as f:
        output.validate(json.load(f), "batch/summary")


@pytest.mark.parametrize("break_it", [
    lambda r: r.pop("key"),
    lambda r: r.update(key="xyz"),
    lambda r: r.update(id=1.5),
    lambda r: r.pop("layers"),
    lambda r: r.update(command="batch-error"),
])
def test_broken_records_are_rejected(serial, break_it):  # noqa: F811
    r = copy.deepcopy(next(r for r in records(serial["out"]) if r["command"] == "locate"))
    break_it(r)
    with pytest.raises(jsonschema.ValidationError):
        output.validate(r, "batch/record")


def test_broken_summary_is_rejected(serial):  # noqa: F811
    with open(os.path.join(serial["out"], "summary.json"), encoding="utf-8") as f:
        s = json.load(f)
    s["overall"]["recurring"].append({"kind": "ffn", "layer": 0, "index": 1, "count": 2})   # no prompts, no mean
    with pytest.raises(jsonschema.ValidationError):
        output.validate(s, "batch/summary")
