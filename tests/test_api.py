"""The notebook API: refimpl.load / models / locate, the LocateResult, short reprs, and the
README's Library section (run verbatim with doctest)."""
import doctest
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import refimpl
from refimpl import output
from refimpl.embedded import DATA, DEFAULT
from refimpl.errors import RefimplError
from tests.conftest import ROOT
from tests.helpers import random_model

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def result():
    return refimpl.locate(PROMPT)


def test_locate_short_report(result):
    s = repr(result)
    assert len(s) < 2000 and str(result) == s
    assert len(s.splitlines()) <= 10
    assert "Paris" in s and PROMPT in s and "strongest layer: FFN 0" in s
    d = result.to_dict()
    json.dumps(d)
    output.validate(d)
    # the repr's numbers are the record's
    assert f"p={d['prediction']['prob']:.4f}" in s
    best = max(((k, L) for L in d["layers"] for k in ("attn", "ffn")), key=lambda x: x[1][x[0]]["log_prob_increase"])
    assert f"{best[1][best[0]]['log_prob_increase']:+.4f}" in s


def test_locate_options_match_the_cli_function(result):
    """target as a string or an id, a Model or a name, all give the same record as locate.locate."""
    from refimpl.locate import locate as run_locate
    model = refimpl.load(DEFAULT)
    ref = run_locate(model, PROMPT, target="Berlin", top=4)
    for kw in (dict(target="Berlin"), dict(target=ref["target"]["id"]), dict(target="Berlin", model=model),
               dict(target="Berlin", model=DEFAULT), dict(target="Berlin", model=os.path.join(DATA, DEFAULT))):
        r = refimpl.locate(PROMPT, top=4, **kw).to_dict()
        assert r["target"]["token"] == "Berlin"
        r.pop("timing")
        assert r == {k: v for k, v in ref.items() if k != "timing"}
    with pytest.raises(RefimplError, match="top"):
        refimpl.locate(PROMPT, top=0)
    with pytest.raises(RefimplError, match="no-such-model"):
        refimpl.locate(PROMPT, model="no-such-model")


def test_to_dict_is_a_copy(result):
    d = result.to_dict()
    d["target"]["token"] = "changed"
    assert result["target"]["token"] == "Paris"


def test_to_frame(result):
    pd = pytest.importorskip("pandas")
    d = result.to_dict()
    f = result.to_frame("layers")
    assert list(f.index) == [L["layer"] for L in d["layers"]]
    assert np.array_equal(f["ffn_log_prob_increase"].to_numpy(), [L["ffn"]["log_prob_increase"] for L in d["layers"]])
    s = result.to_frame("subvalues")
    assert len(s) == len(d["top_subvalues"]) and list(s["log_prob_increase"]) == [x["log_prob_increase"]
                                                                                   for x in d["top_subvalues"]]
    assert list(result.to_frame("tokens")["token"]) == d["tokens"]
    assert list(result.to_frame("counts")["helpful"]) == [c["helpful"] for c in d["ffn_counts"]]
    a = result.to_frame("activation")
    assert np.isclose(a["value"].sum(), sum(x["pre_activation"] for x in d["activation_trace"]), rtol=1e-12)
    assert isinstance(f, pd.DataFrame)
    with pytest.raises(ValueError, match="layers"):
        result.to_frame("nonsense")


def test_to_frame_without_pandas(result, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)          # import pandas -> ImportError
    with pytest.raises(ImportError, match="pip install pandas"):
        result.to_frame("layers")


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    r = refimpl.locate(PROMPT, top=2)
    paths = r.plot(tmp_path / "figs")
    assert paths and all(p.startswith(str(tmp_path / "figs")) and os.path.getsize(p) > 1000 for p in paths.values())
    assert r.to_dict()["figures"] == paths
    output.validate(r.to_dict())


def test_load_and_models():
    assert DEFAULT in refimpl.models()
    m = refimpl.load(DEFAULT, dtype="float32")
    assert m.dtype == np.float32 and os.path.samefile(m.path, os.path.join(DATA, DEFAULT))
    assert refimpl.load().path == m.path
    with pytest.raises(RefimplError, match="nothing-here"):
        refimpl.load("nothing-here")


def test_short_reprs():
    m = refimpl.load(DEFAULT)
    tr = refimpl.run(m, PROMPT)
    for obj, needles in ((m, ["capitals-gpt2", "n_layers=4", "d_model=128", "float64"]),
                         (tr, ["capitals-gpt2", "4 layers", "5 tokens", "The capital of France is"]),
                         (tr.layers[0], ["T=5", "d_model=128"]),
                         (tr.readout(-1), ["frozen", "layernorm"]), (tr.readout(-1, "raw"), ["raw"])):
        s = repr(obj)
        assert len(s) < 300, s
        for n in needles:
            assert n in s, (n, s)
    long = random_model("gpt2", seed=1, n_ctx=64, d_vocab=40)
    s = repr(refimpl.run(long, list(range(1, 40))))
    assert len(s) < 300 and "(39 tokens)" in s


def test_locate_name_survives_submodule_imports():
    """`refimpl.locate` stays the function whatever imports the submodule refimpl.locate first."""
    code = ("import refimpl.locate, importlib; from refimpl.locate import locate as L; "
            "import refimpl; importlib.import_module('refimpl.locate'); "
            "assert callable(refimpl.locate) and refimpl.locate is refimpl.api.locate, refimpl.locate; "
            "assert L.__module__ == 'refimpl.locate'; print('ok')")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# --- the README's Library section runs as written --------------------------------------------------

def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, f"README has no section {title!r}"
    return m.group(1)


def test_readme_library_section_runs(tmp_path, monkeypatch):
    pytest.importorskip("pandas")
    pytest.importorskip("matplotlib")
    section = readme_section("Library")
    blocks = re.findall(r"^```python\n(.*?)^```", section, re.S | re.M)
    assert blocks, "no python block in the Library section"
    for b in blocks:
        assert b.startswith(">>> ") and b.endswith("\n\n"), "Library blocks are doctests ending in a blank line"
    monkeypatch.chdir(tmp_path)                        # a fresh directory: nothing but the package
    parser = doctest.DocTestParser()
    test = parser.get_doctest("".join(blocks), {}, "README.md#Library", str(ROOT / "README.md"), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    res = runner.summarize(verbose=False)
    assert res.failed == 0, f"{res.failed} of {res.attempted} README examples failed (see output above)"
    assert res.attempted >= 10


def test_readme_python_blocks_are_all_doctests():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for b in re.findall(r"^```python\n(.*?)^```", text, re.S | re.M):
        assert b.startswith(">>> "), f"a README python block that the tests do not run: {b[:60]!r}"
