"""The command line as a well-kept Unix tool: help and default for every option, --version,
tokens shown unambiguously, tables with token labels, options without effect refused,
`compare --summary`, and unconverted checkpoints named with the command that converts them."""
import argparse
import collections
import contextlib
import io
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer

import refimpl
from refimpl import display
from refimpl.cli import build_parser, main
from tests.conftest import FIXTURES, ROOT, STORIES

PROMPT = "The capital of France is"


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def subparsers():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


# --- help, defaults, version ----------------------------------------------------------------------

def test_every_option_has_help_and_shows_its_default():
    parser, subs = subparsers()
    assert set(subs) >= {"locate", "predict", "layers", "subvalues", "vocab", "additivity", "subkey", "trace",
                         "compare-tokens", "baseline", "dump", "compare", "convert", "verify", "models", "prepare"}
    for name, p in [("refimpl", parser)] + sorted(subs.items()):
        text = p.format_help()
        assert p.description, name
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            what = f"{name} {'/'.join(a.option_strings) or a.dest}"
            assert a.help and a.help.strip() and a.help != argparse.SUPPRESS, f"{what}: no help text"
            if a.default not in (None, False) and a.nargs != 0 and not isinstance(a, argparse._VersionAction):
                shown = f"(default: {a.default})"
                assert shown in " ".join(text.split()), f"{what}: default {a.default!r} not shown in --help"


def test_version():
    import tomllib
    want = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    rc, out, _ = run("--version")
    assert rc == 0 and out.strip() == f"refimpl {want}"
    assert refimpl.__version__ == want


# --- tokens read unambiguously ------------------------------------------------------------------

def test_show_by_definition():
    assert display.show(" Paris") == "␣Paris" and display.show("Paris") == "Paris"
    assert display.show("Paris", "▁Paris") == "␣Paris"                  # SentencePiece: decode drops the space
    assert display.show("  ", "▁▁▁") == "␣␣␣"                           # one of three stripped by the decoder
    assert display.show("\n", "<0x0A>") == "<0x0A>"
    assert display.show("A", "<0x41>") != display.show("A", "A")
    assert display.show("\ufffd", "âĢ") == "\\xe2\\x80"                 # GPT-2 bytes E2 80: incomplete UTF-8
    assert display.show("a\tb\\c") == "a\\tb\\\\c"
    assert display.show("\u00a0") == "\\u00a0" and display.show("\u200b") == "\\u200b"
    assert display.show("␣") == "\\u2423" and display.show("") == '""'


def _tokenizers():
    from converters.tokenizers.fairseq_dict import fairseq_dict_tokenizer_json
    from converters.tokenizers.gpt2 import gpt2_tokenizer_json
    from converters.tokenizers.llama2c import llama2c_tokenizer_json
    from converters.tokenizers.spm import llama_tokenizer_json
    tok = FIXTURES / "tokenizers"
    return {
        "gpt2": lambda: gpt2_tokenizer_json(str(tok / "gpt2" / "encoder.json"), str(tok / "gpt2" / "vocab.bpe"))[0],
        "llama": lambda: llama_tokenizer_json(str(tok / "llama" / "tokenizer.model"))[0],
        "llama2c": lambda: llama2c_tokenizer_json(str(STORIES / "tok512.bin"), 512)[0],
        "fairseq": lambda: fairseq_dict_tokenizer_json(str(tok / "wiki103" / "dict.txt"))[0],
        "embedded": lambda: (ROOT / "refimpl" / "data" / "models" / "capitals-gpt2" / "tokenizer.json").read_text(),
    }


@pytest.mark.parametrize("family", sorted(_tokenizers()))
def test_no_two_tokens_look_alike(family):
    """Over each real vocabulary, the displayed forms are pairwise distinct (decoded strings
    alone are not: SentencePiece's 'Paris' and '▁Paris' both decode to 'Paris')."""
    t = Tokenizer.from_str(_tokenizers()[family]())
    n = t.get_vocab_size()
    decoded = [t.decode([i], skip_special_tokens=False) for i in range(n)]
    shown = [display.show(s, t.id_to_token(i)) for i, s in enumerate(decoded)]
    dup = [s for s, k in collections.Counter(shown).items() if k > 1]
    assert not dup, f"{len(dup)} displayed forms shared by several tokens, e.g. {dup[:5]}"
    assert all(s and not any(c.isspace() for c in s) for s in shown), "a displayed token with whitespace"
    if family in ("llama", "llama2c"):
        assert len(set(decoded)) < n                # the ambiguity this display removes


def test_tables_have_token_labels_not_tuples_or_dicts():
    for argv in (["subvalues", PROMPT, "--layer", "0"], ["subvalues", PROMPT, "--layer", "1", "--kind", "attn"],
                 ["subvalues", PROMPT, "--layer", "1", "--kind", "attn", "--by", "head_position", "--top", "3"],
                 ["vocab", PROMPT, "--layer", "0"], ["compare-tokens", PROMPT, "--tokens", "Paris,London"],
                 ["predict", PROMPT], ["locate", PROMPT, "--top", "3"], ["additivity", PROMPT, "--layer", "0"]):
        rc, out, err = run(*argv)
        assert rc == 0, err
        assert not re.search(r"\(\d+,\)|\(\d+, \d+\)|\{'|\"[a-z_]+\": ", out), f"{argv}: a tuple or dict in\n{out}"
    rc, out, _ = run("subvalues", PROMPT, "--layer", "1", "--kind", "attn")
    assert re.search(r"pos 3 France\s", out)


def test_options_without_effect_are_refused():
    for argv, needle in ((["subvalues", PROMPT, "--layer", "0", "--by", "head"], "--by has no effect"),
                         (["vocab", PROMPT, "--layer", "0", "--vector", "ffn-neuron"], "needs --index NEURON"),
                         (["vocab", PROMPT, "--layer", "0", "--vector", "Lres", "--index", "2"], "--index has no effect"),
                         (["trace", PROMPT, "--layer", "1", "--neuron", "0", "--by", "head"], "--by has no effect"),
                         (["predict", PROMPT, "--position", "2", "--generate", "3"], "--position"),
                         (["subkey", PROMPT, "--layer", "0", "--readout", "raw"], "--readout"),
                         (["compare", "a", "b", "--summary", "--json"], "--summary has no effect"),
                         (["locate", PROMPT, "--target", "Paris", "--target-id", "3"], "not both"),
                         (["layers", PROMPT, "--convert"], "--convert has no effect"),
                         (["layers", PROMPT, "--convert", "--model", "capitals-gpt2"], "--convert has no effect")):
        rc, out, err = run(*argv)
        assert rc == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
        assert needle in err, (needle, err)


# --- compare --summary ----------------------------------------------------------------------------

def test_compare_summary(tmp_path):
    from refimpl.safetensors_io import read_header, spec_of, write_safetensors
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert run("dump", PROMPT, "--out", a)[0] == 0
    tensors, meta = read_header(str(a))
    arrays = {n: np.array(t.numpy()) for n, t in tensors.items()}
    bad = ["blocks.1.hook_resid_mid", "blocks.2.mlp.hook_post"]
    for n in bad:
        arrays[n] = arrays[n] + 1e-6
    write_safetensors(str(b), [spec_of(n, arrays[n]) for n in sorted(arrays)], ((n, arrays[n]) for n in sorted(arrays)),
                      meta)
    rc, out, _ = run("compare", a, b, "--summary")
    lines = out.strip().splitlines()
    assert rc == 1
    assert lines[0].split()[0] == "tensor" and len(lines) == 2 + len(bad), out
    assert [ln.split()[0] for ln in lines[1:-1]] == sorted(bad) and all("FAIL" in ln for ln in lines[1:-1])
    assert lines[-1].startswith(f"{len(arrays) - 2}/{len(arrays)} shared tensors") and "2 failed" in lines[-1]
    rc, out, _ = run("compare", a, a, "--summary")
    assert rc == 0 and out.strip().splitlines() == [f"{len(arrays)}/{len(arrays)} shared tensors within "
                                                    f"rtol=1e-10 atol=1e-12"]
    rc, full, _ = run("compare", a, b)
    assert rc == 1 and len(full.strip().splitlines()) == len(arrays) + 2


# --- unconverted checkpoints ------------------------------------------------------------------------

def _one_error(rc, out, err):
    assert rc == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_unconverted_checkpoints_are_named_with_the_command(tmp_path):
    hf = tmp_path / "gpt2-small"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 8}))
    (hf / "model.safetensors").write_bytes(b"")
    meta = tmp_path / "llama-2-7b"
    meta.mkdir()
    (meta / "params.json").write_text("{}")
    (meta / "consolidated.00.pth").write_bytes(b"")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    fairseq = ROOT / "tests" / "fixtures" / "fairseq_tiny" / "new"
    cases = [(hf, "a Hugging Face GPT-2 checkpoint", f"refimpl convert {hf} models/gpt2-small`"),
             (meta, "a Meta LLaMA checkpoint", f"refimpl convert {meta} models/llama-2-7b`"),
             (STORIES / "stories260K.bin", "a llama2.c checkpoint",
              f"refimpl convert {STORIES / 'stories260K.bin'} models/stories260K`"),
             (bert, "a Hugging Face 'bert' checkpoint", "refimpl converts GPT-2 and Llama")]
    if fairseq.exists():
        cases.append((fairseq, "a fairseq language-model checkpoint", f"refimpl convert {fairseq} models/new`"))
    for path, what, command in cases:
        for argv in (["layers", "Once", "--model", path], ["predict", "Once", "--model", path]):
            err = _one_error(*run(*argv))
            assert what in err and command in err and "__init__" not in err, err
        if path.is_dir():
            err = _one_error(*run("verify", path))
            assert what in err, err
        with pytest.raises(refimpl.RefimplError, match=re.escape(what)):
            refimpl.load(str(path))


def test_config_missing_fields_named_not_a_constructor(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(ROOT / "refimpl" / "data" / "models" / "capitals-gpt2", d)
    cfg = json.loads((d / "config.json").read_text())
    for k in ("d_model", "n_heads"):
        cfg.pop(k)
    (d / "config.json").write_text(json.dumps(cfg))
    err = _one_error(*run("layers", "x", "--model", d))
    assert "missing fields d_model, n_heads" in err and "positional" not in err


def test_convert_into_the_cache(tmp_path, monkeypatch):
    """--convert converts a llama2.c checkpoint once, reuses it, and converts again when the
    checkpoint changes; the result is what `refimpl convert` writes."""
    monkeypatch.setenv("REFIMPL_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(STORIES / "stories260K.bin", src)
    shutil.copy(STORIES / "tok512.bin", src)
    model = src / "stories260K.bin"
    rc, out1, err = run("predict", "Once upon a time", "--model", model, "--convert", "--json")
    assert rc == 0 and "converting" in err, err
    cached = [p for p in (tmp_path / "cache" / "converted").iterdir()]
    assert len(cached) == 1
    rc, out2, err = run("predict", "Once upon a time", "--model", model, "--convert", "--json")
    assert rc == 0 and "using" in err and "converting" not in err
    assert [p for p in (tmp_path / "cache" / "converted").iterdir()] == cached
    # the same as converting by hand
    assert run("convert", model, tmp_path / "by-hand")[0] == 0
    rc, out3, _ = run("predict", "Once upon a time", "--model", tmp_path / "by-hand", "--json")
    a, b = json.loads(out1), json.loads(out3)
    assert a["top"] == b["top"] and a["ids"] == b["ids"]
    # a changed checkpoint is converted again, into a new folder
    os.utime(model, ns=(1, 1))
    rc, _, err = run("predict", "Once upon a time", "--model", model, "--convert")
    assert rc == 0 and "converting" in err
    assert len(list((tmp_path / "cache" / "converted").iterdir())) == 2
    m = refimpl.load(str(model), convert=True)
    assert os.path.dirname(m.path) == str(tmp_path / "cache" / "converted")
