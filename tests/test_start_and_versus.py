"""`--prepend-bos` (library `prepend_bos=`) and `locate --versus` (the bs-value difference of
Fig. 10-11 against a chosen token, named in the report).

References: the tokenizer's own encoding and the model's config for the start ids; the slow
readout of tests/test_analyses.py (stored weights, never refimpl's readout) for the
bs-value differences."""
import json

import numpy as np
import pytest

import refimpl
from refimpl import display
from refimpl.cli import main as cli_main
from refimpl.embedded import resolve_model
from refimpl.errors import RefimplError
from refimpl.locate import format_report, locate
from tests.helpers import random_model
from tests.test_analyses import IDS, Slow, near

PROMPT = "t7 t3 t15 t29"


def plain_ids(model, text):
    return model.tokenizer.encode(text, add_special_tokens=False).ids


def test_prepend_bos_per_family():
    gpt2 = random_model("gpt2", seed=3, n_layers=1, d_vocab=40)
    llama = random_model("llama", seed=3, n_layers=1, d_vocab=40)
    fairseq = random_model("fairseq_lm", seed=3, n_layers=1, d_vocab=40, cutoffs=[10, 25])
    for model, default in ((gpt2, []), (llama, [1]), (fairseq, [2])):
        body = plain_ids(model, PROMPT)
        assert body == [7, 3, 15, 29]
        assert list(refimpl.run(model, PROMPT).ids) == default + body                   # the family's convention
        assert list(refimpl.run(model, PROMPT, prepend_bos=False).ids) == body
        if default:
            assert list(refimpl.run(model, PROMPT, prepend_bos=True).ids) == default + body
        with pytest.raises(RefimplError, match="verbatim"):                              # ids are never changed
            refimpl.run(model, [5, 6], prepend_bos=True)
    with pytest.raises(RefimplError, match="no start"):                                  # no BOS to prepend
        refimpl.run(gpt2, PROMPT, prepend_bos=True)
    # GPT-2 with a BOS in its tokenizer (the embedded model: <|endoftext|>, id 0)
    emb = refimpl.load(resolve_model(None))
    body = plain_ids(emb, "The capital of France is")
    assert list(refimpl.run(emb, "The capital of France is").ids) == body
    with_bos = refimpl.run(emb, "The capital of France is", prepend_bos=True)
    assert list(with_bos.ids) == [emb.cfg.special_tokens["bos"]] + body and with_bos.tokens[0] == "<|endoftext|>"
    r = locate(emb, "The capital of France is", prepend_bos=True, top=1)
    assert r["ids"] == list(with_bos.ids) and r["prepend_bos"] is True and r["position"] == len(body)


def test_prepend_bos_cli(capsys):
    emb = resolve_model(None)
    assert cli_main(["locate", "The capital of France is", "--prepend-bos", "--top", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["tokens"][0] == "<|endoftext|>" and r["tokens"][1:] == ["The", "capital", "of", "France", "is"]
    assert cli_main(["layers", "--model", emb, "The capital of France is", "--no-prepend-bos", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"][0] == "The"
    assert cli_main(["predict", "--model", emb, "The capital of France is", "--prepend-bos", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["ids"][0] == 0 and r["tokens"][:2] == ["<|endoftext|>", "The"] and r["position"] == 5
    for argv in (["locate", "--ids", "5,9", "--prepend-bos"], ["subvalues", "--ids", "5,9", "--layer", "0",
                                                               "--no-prepend-bos"], ["predict", "--ids", "5", "--prepend-bos"]):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error:") and "verbatim" in err


def slow_difference(model, tr, t, a, b, kind="frozen"):
    S = Slow(model, tr.final[t], kind)
    layers = [(S.bs(L.attn[t])[a] - S.bs(L.attn[t])[b], S.bs(L.ffn[t])[a] - S.bs(L.ffn[t])[b]) for L in tr.layers]
    start, end = S.scores(tr.Lin0[t]), S.scores(tr.final[t])
    return start[a] - start[b], end[a] - end[b], layers


@pytest.mark.parametrize("family", ["gpt2", "llama", "fairseq_lm"])
def test_versus(family):
    sizes = dict(n_layers=2, d_model=16, n_heads=2, d_ff=24, d_vocab=40)
    if family == "fairseq_lm":
        sizes["cutoffs"] = [10, 25]
    model = random_model(family, seed=5, **sizes)
    tr = refimpl.run(model, IDS)
    t = tr.T - 1
    order = [int(x) for x in np.argsort(-tr.log_probs[t], kind="stable")]
    cases = [(dict(), order[0], order[1], "runner-up"),                               # default: the runner-up
             (dict(target_id=order[3]), order[3], order[0], "runner-up"),             # target not top-1: the top-1
             (dict(versus="t9"), order[0], 9, "--versus"),
             (dict(target_id=5, versus_id=17, readout="raw"), 5, 17, "--versus")]
    for kw, a, b, how in cases:
        r = locate(model, IDS, top=2, **kw)
        d = r["bs_difference"]
        assert (d["target"]["id"], d["versus"]["id"], d["versus"]["chosen_by"]) == (a, b, how)
        assert d["versus"]["token"] == model.token_str(b)
        start, end, layers = slow_difference(model, tr, t, a, b, kw.get("readout", "frozen"))
        near([d["start"], d["end"]], [start, end], "bs difference ends")
        near([[x["attn"], x["ffn"]] for x in d["layers"]], layers, "bs difference per layer")
        text = format_report(r)
        assert f"bs-value difference {display.token(model, a)} - {display.token(model, b)} (" in text
        assert ("runner-up" in text) == (how == "runner-up")
    with pytest.raises(RefimplError, match="target itself"):
        locate(model, IDS, versus_id=order[0])


def test_versus_cli_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert cli_main(["locate", "The capital of France is", "--versus", "Lyon", "--top", "1", "--json",
                     "--plots", str(tmp_path / "figs")]) == 0
    r = json.loads(capsys.readouterr().out)
    v = r["bs_difference"]["versus"]
    assert (v["id"], v["token"], v["chosen_by"]) == (r["figure_data"]["bs_difference"]["b"], "Lyon", "--versus")
    assert r["figure_data"]["bs_difference"]["tokens"] == ["Paris", "Lyon"]
    assert r["figure_data"]["bs_trajectory"]["tokens"][:2] == ["Paris", "Lyon"]
    near(r["figure_data"]["bs_difference"]["end"], r["bs_difference"]["end"], "plot and report agree")
    for argv in (["locate", "The capital of France is", "--versus", "Paris"],            # the target itself
                 ["locate", "The capital of France is", "--versus", "no such words"],    # not one token
                 ["locate", "The capital of France is", "--versus", "Lyon", "--versus-id", "3"]):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error:")
