"""The one output contract: every subcommand's --json validates against the schema shipped
in the package, carries the same header (model, prompt, ids, tokens, target, ...), holds
labelled entries rather than bare arrays of numbers, and is identical between two runs
outside `timing`. The schemas are checked to be real (they reject broken objects) and
open to the additions other parts of the project make (new keys, new subvalue kinds).
"""
import contextlib
import copy
import io
import json
import os
import shutil

import jsonschema
import numpy as np
import pytest
from tokenizers import Tokenizer

import refimpl
from refimpl import output, schema_defs
from refimpl.cli import build_parser, main
from refimpl.cli_common import COMMANDS
from refimpl.embedded import DATA, DEFAULT
from tests.helpers import random_model

PROMPT = "The capital of France is"
EMBEDDED = os.path.join(DATA, DEFAULT)
V = jsonschema.Draft202012Validator
# lists of plain numbers that are fine unlabelled: ids, shapes and indices, a [lo, hi] pair, figure series
NUMBER_LISTS = {"ids", "top_token_ids", "shape_a", "shape_b", "first_bad_index", "values_at_first_bad", "top10_share"}


def run_json(*argv) -> dict:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main([str(a) for a in argv] + ["--json"])
    assert rc == 0, f"{argv}: exit code {rc}"
    return json.loads(buf.getvalue())


def check_labelled(x, key=None, path="$"):
    """No bare arrays of numbers (outside the few named ones) and no nested arrays anywhere."""
    if key == "figure_data":
        return
    if isinstance(x, dict):
        for k, v in x.items():
            check_labelled(v, k, f"{path}.{k}")
    elif isinstance(x, list):
        assert not any(isinstance(v, list) for v in x), f"{path}: nested arrays"
        if any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x):
            assert key in NUMBER_LISTS, f"{path}: a bare array of numbers"
        for v in x:
            check_labelled(v, None, f"{path}[]")


def without_timing(obj: dict) -> dict:
    o = copy.deepcopy(obj)
    o.pop("timing")
    if "figures" in o:                     # paths of a fresh output directory
        o.pop("figures")
    return o


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    d = tmp_path_factory.mktemp("dumps")
    a, b = d / "a.safetensors", d / "b.safetensors"
    assert main(["dump", PROMPT, "--out", str(a)]) == 0
    shutil.copy(a, b)
    return a, b


def invocations(dumps):
    """(command, argv) for every command with --json, on the embedded model."""
    a, b = dumps
    return [
        ("locate", [PROMPT, "--top", "3"]),
        ("locate", [PROMPT, "--top", "2", "--target", "Berlin", "--readout", "raw", "--counts", "no"]),
        ("predict", [PROMPT, "--top", "3"]),
        ("predict", ["The capital of", "--top", "2", "--generate", "3", "--target", "Paris"]),
        ("layers", [PROMPT]),
        ("subvalues", [PROMPT, "--layer", "0", "--top", "4"]),
        ("subvalues", [PROMPT, "--layer", "1", "--kind", "attn", "--by", "head_position", "--top", "all"]),
        ("subvalues", [PROMPT, "--layer", "1", "--kind", "attn", "--by", "head"]),
        ("vocab", [PROMPT, "--layer", "0", "--vector", "ffn-neuron", "--index", "3", "--top", "3"]),
        ("vocab", [PROMPT, "--layer", "2", "--vector", "Lres"]),
        ("vocab", [PROMPT, "--layer", "1", "--vector", "attn-position", "--index", "3"]),
        ("additivity", [PROMPT, "--layer", "0", "--max", "4"]),
        ("subkey", [PROMPT, "--layer", "1"]),
        ("subkey", [PROMPT, "--layer", "1", "--neuron", "7"]),
        ("trace", [PROMPT, "--layer", "1", "--neuron", "7"]),
        ("trace", [PROMPT, "--layer", "1", "--neuron", "7", "--source", "attn.0", "--by", "head"]),
        ("compare-tokens", [PROMPT, "--tokens", "Paris,London,Berlin"]),
        ("baseline", [PROMPT, "--top", "3"]),
        ("dump", [PROMPT, "--out", str(a.parent / "c.safetensors")]),
        ("compare", [str(a), str(b)]),
        ("models", []),
        ("verify", [EMBEDDED]),
    ]


def test_every_command_with_json_is_covered(dumps):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "cmd")
    with_json = {name for name, p in sub.choices.items() if any("--json" in a.option_strings for a in p._actions)}
    covered = {c for c, _ in invocations(dumps)}
    assert with_json == covered, f"--json without a test: {with_json - covered}; tested without --json: {covered - with_json}"
    assert set(output.schema_names()) == with_json, "one schema file per command with --json"
    assert "predict" in with_json
    assert set(COMMANDS) - with_json <= {"convert", "prepare", "batch"}     # batch writes files: schemas/batch/, test_batch_schema.py


def test_shipped_schemas_are_the_built_ones():
    """refimpl/data/schemas/*.json are what refimpl.schema_defs builds (regenerate with
    `python -m refimpl.schema_defs`), and each is a valid JSON Schema (draft 2020-12)."""
    built = schema_defs.build()
    assert sorted(built) == output.schema_names()
    for name, s in built.items():
        with open(os.path.join(output.SCHEMA_DIR, f"{name}.json"), encoding="utf-8") as f:
            assert f.read() == schema_defs.render(s), f"{name}.json is stale"
        V.check_schema(s)


def test_every_output_validates_and_keeps_the_contract(dumps):
    enc = Tokenizer.from_file(os.path.join(EMBEDDED, "tokenizer.json"))
    targets = {}
    for cmd, argv in invocations(dumps):
        obj = run_json(cmd, *argv)
        output.validate(obj, cmd)
        check_labelled(obj)
        assert obj["command"] == cmd and obj["schema_version"] == output.SCHEMA_VERSION
        assert obj["refimpl_version"] == refimpl.__version__
        assert list(obj)[-1] == "timing" and obj["timing"]["seconds"] >= 0
        if "model" not in obj:
            continue
        # the header, checked against the tokenizer library directly
        prompt = argv[0]
        assert obj["prompt"] == prompt
        assert obj["ids"] == enc.encode(prompt, add_special_tokens=False).ids
        assert obj["tokens"] == [enc.decode([i], skip_special_tokens=False) for i in obj["ids"]]
        assert obj["pieces"] == [enc.id_to_token(i) for i in obj["ids"]]
        assert obj["model"]["name"] == DEFAULT and obj["model"]["path"] == EMBEDDED
        with open(os.path.join(EMBEDDED, "config.json")) as f:
            assert obj["model"]["config_digest"] == json.load(f)["config_sha256"]   # what convert recorded
        t = obj["target"]
        if t is not None:
            assert t["token"] == enc.decode([t["id"]]) and abs(t["prob"] - np.exp(t["log_prob"])) <= 1e-15
            targets.setdefault((prompt, "--target" in argv and argv[argv.index("--target") + 1]), []).append(t)
    # the same target object wherever the same prompt and target were asked for
    for key, ts in targets.items():
        assert all(x == ts[0] for x in ts), key
    assert len(targets[(PROMPT, False)]) >= 8


def test_identical_between_runs_outside_timing(dumps):
    for cmd, argv in invocations(dumps):
        if cmd == "dump":
            continue
        a, b = run_json(cmd, *argv), run_json(cmd, *argv)
        assert without_timing(a) == without_timing(b), cmd


def test_api_to_dict_is_the_cli_object():
    cli = run_json("locate", PROMPT, "--top", "4")
    api = refimpl.locate(PROMPT, top=4).to_dict()
    output.validate(api)
    assert without_timing(api) == without_timing(cli)


def test_other_families(tmp_path):
    """Gated (Llama: two subkeys) and adaptive-softmax (fairseq) models through the same schemas."""
    for fam, sizes in (("llama", dict(n_kv_heads=2)), ("fairseq_lm", dict(d_model=16, cutoffs=[10, 25]))):
        m = random_model(fam, seed=3, d_vocab=40, **sizes)
        ids = "2,7,3,15,29"
        for cmd, extra in (("locate", ["--top", "2"]), ("predict", []), ("trace", ["--layer", "1", "--neuron", "2"]),
                           ("subvalues", ["--layer", "0", "--kind", "attn"]), ("subkey", ["--layer", "0"]),
                           ("compare-tokens", ["--tokens", "3,4", "--token-ids"]), ("layers", ["--position", "2"])):
            obj = run_json(cmd, "--ids", ids, "--model", m.path, *extra)
            output.validate(obj, cmd)
            check_labelled(obj)
            assert obj["prompt"] is None and obj["ids"] == [2, 7, 3, 15, 29]
        if fam == "llama":
            assert [s["which"] for s in obj_trace(m, ids)] == ["gate", "in"]


def obj_trace(m, ids):
    return run_json("trace", "--ids", ids, "--model", m.path, "--layer", "1", "--neuron", "2")["subkeys"]


# --- the schemas are strict where it matters and open to additions ----------------------------------

@pytest.fixture(scope="module")
def located():
    return refimpl.locate(PROMPT, top=3).to_dict()


BROKEN = {
    "target missing": lambda o: o.pop("target"),
    "target id a string": lambda o: o["target"].__setitem__("id", "381"),
    "probability above 1": lambda o: o["target"].__setitem__("prob", 1.5),
    "ids not integers": lambda o: o.__setitem__("ids", [1.5]),
    "bare array of layer scores": lambda o: o.__setitem__("layers", [1.0, 2.0]),
    "subvalue without kind": lambda o: o["top_subvalues"][0].pop("kind"),
    "unknown subvalue kind": lambda o: o["top_subvalues"][0].__setitem__("kind", "mystery"),
    "ffn subvalue without coefficient": lambda o: next(s for s in o["top_subvalues"] if s["kind"] == "ffn").pop("coefficient"),
    "unknown readout": lambda o: o.__setitem__("readout", "logit"),
    "timing missing": lambda o: o.pop("timing"),
    "warnings not strings": lambda o: o.__setitem__("warnings", [{"message": "x"}]),
    "config digest not sha256": lambda o: o["model"].__setitem__("config_digest", "abc"),
    "wrong schema version": lambda o: o.__setitem__("schema_version", 999),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_schema_rejects(located, case):
    o = copy.deepcopy(located)
    BROKEN[case](o)
    with pytest.raises(jsonschema.ValidationError):
        output.validate(o, "locate")


def test_schema_accepts_the_announced_additions(located):
    """Counts with thresholds and shares, attention-neuron subvalues, the bias-free frozen
    readout, a versus token and warnings are additions, not breaking changes."""
    o = copy.deepcopy(located)
    o["readout"] = "frozen-nobias"
    o["warnings"] = ["'Pariss' is not in the vocabulary: it maps to <|unk|>"]
    o["versus"] = {"id": 280, "token": "Berlin", "piece": "Berlin", "bs_difference": 3.2}
    o["ffn_counts"] = [{"layer": 0, "activated": 192, "helpful": 300, "unhelpful": 100, "negligible": 112,
                        "threshold": 1e-6, "top10_share": 0.4, "top10_share_unhelpful": [0.2, 0.3], "share": "bound",
                        "helpful_share": 0.7, "unhelpful_share": 0.3,
                        "something_new": [1, 2]}]
    o["top_subvalues"].append({"kind": "attn_neuron", "layer": 1, "head": 2, "dim": 5, "position": 3,
                               "log_prob_increase": 0.01, "prob_increase": 0.001, "target_rank": 4,
                               "top_tokens": ["Paris"], "top_token_ids": [381]})
    o["a_key_from_the_future"] = {"x": 1}
    output.validate(o, "locate")
    bad = copy.deepcopy(o)
    bad["top_subvalues"][-1].pop("head")
    with pytest.raises(jsonschema.ValidationError):
        output.validate(bad, "locate")


# --- warnings reach the output object (and stderr, once) ----------------------------------------------

MSG = "target 'Pariss' is not in the vocabulary"


@pytest.fixture
def warning_target(monkeypatch):
    import importlib
    import warnings

    L = importlib.import_module("refimpl.locate")        # the module; refimpl.locate is the function
    original = L.resolve_target

    def resolve_target(*a, **kw):
        warnings.warn(MSG)
        return original(*a, **kw)
    monkeypatch.setattr(L, "resolve_target", resolve_target)


def test_warnings_are_listed(warning_target, capsys):
    for _ in range(2):                                   # every run, not once per place
        with pytest.warns(UserWarning, match="Pariss"):
            r = refimpl.locate(PROMPT, top=2)
        assert r["warnings"] == [MSG]
        output.validate(r.to_dict())
    for cmd, extra in (("locate", ["--top", "2"]), ("layers", [])):
        capsys.readouterr()
        rc = main([cmd, PROMPT, "--json", *extra])
        out, err = capsys.readouterr()
        assert rc == 0 and json.loads(out)["warnings"] == [MSG]
        assert err.splitlines() == [f"warning: {MSG}"]
        rc = main([cmd, PROMPT, *extra])
        out, err = capsys.readouterr()
        assert err.splitlines() == [f"warning: {MSG}"]
        # stderr, and the locate report carries its warnings too (a report saved to a file keeps them)
        assert out.count(MSG) == (1 if cmd == "locate" else 0)
