"""Never a silent substitution, never a traceback, never raw file content on the terminal.

- A target that is not one vocabulary token is an error showing how it tokenizes and the
  nearest single-token forms (on main `--target Qwertyuiop` silently became `<|unk|>`).
- A target whose form with (or without) a leading space is a different token gets a note.
- Prompt words that become the unknown token give a visible warning (report, stderr) and a
  `warnings` list in locate's JSON (on main "The capital of Narnia is" analysed `<|unk|>`
  and said nothing).
- Names that come from files (tensor names in `compare`, record names in `verify`, paths
  in errors) are printed with control characters escaped, one line each.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from refimpl.safetensors_io import spec_of, write_safetensors
from refimpl.synthetic import random_config, write_random_model
from tests.conftest import FIXTURES
from tests.test_robustness import assert_one_error_line, cli


# --------------------------------------------------------------------------- targets (the shipped model: words)


@pytest.mark.parametrize("target", ["Qwertyuiop", "Narnia", "<nope>"])
def test_out_of_vocabulary_target_is_an_error(capfd, target):
    rc, out, err = cli(capfd, "locate", "The capital of France is", "--target", target)
    assert_one_error_line(rc, err, repr(target), "not in the vocabulary", "unknown token", "<|unk|>")
    assert out == ""


def test_target_error_shows_the_nearest_single_token_forms(capfd):
    rc, _, err = cli(capfd, "locate", "The capital of France is", "--target", "paris")
    assert_one_error_line(rc, err, "'Paris' (id 381)")
    rc, _, err = cli(capfd, "layers", "The capital of France is", "--target", "Paris of")
    assert_one_error_line(rc, err, "not a single token", "'Paris'(381)", "'of'(4)")


def test_the_unknown_token_itself_can_still_be_the_target(capfd):
    rc, out, _ = cli(capfd, "locate", "The capital of France is", "--target", "<|unk|>", "--json")
    assert rc == 0 and json.loads(out)["target"]["id"] == 1


# --------------------------------------------------------------------------- unknown prompt words


def test_unknown_prompt_words_are_reported(capfd):
    rc, out, err = cli(capfd, "locate", "The capital of Narnia is")
    assert rc == 0
    for text in (out, err):             # in the report, and on stderr like every warning
        assert text.count("warning: prompt word 'Narnia' is not in the vocabulary") == 1 and "position 3" in text
    rc, out, err = cli(capfd, "locate", "The capital of Narnia is", "--json")
    r = json.loads(out)
    assert rc == 0 and isinstance(r["warnings"], list) and len(r["warnings"]) == 1
    assert "'Narnia'" in r["warnings"][0] and r["ids"][3] == 1
    rc, out, err = cli(capfd, "locate", "The capital of France is", "--json")
    assert json.loads(out)["warnings"] == []
    rc, out, err = cli(capfd, "layers", "The capital of Zembla and Narnia is")
    assert rc == 0 and err.count("warning: prompt word") == 2 and "'Zembla'" in err and "'Narnia'" in err


def test_ids_are_taken_as_given(capfd):
    rc, out, _ = cli(capfd, "locate", "--ids", "5,9,4,1,3", "--json")
    assert rc == 0 and json.loads(out)["warnings"] == []


# --------------------------------------------------------------------------- a byte-level BPE model (GPT-2's tokenizer)


@pytest.fixture(scope="module")
def gpt2_tok_model(tmp_path_factory):
    from converters.tokenizers import gpt2_tokenizer_json
    tj, _ = gpt2_tokenizer_json(str(FIXTURES / "tokenizers" / "gpt2" / "encoder.json"),
                                str(FIXTURES / "tokenizers" / "gpt2" / "vocab.bpe"))
    d = tmp_path_factory.mktemp("g2") / "m"
    write_random_model(str(d), random_config("gpt2", d_vocab=50257, d_model=8, n_heads=2, d_ff=8, n_layers=1,
                                             n_ctx=16), seed=1, tokenizer_json=tj)
    return d


def test_leading_space_forms_get_a_note(capfd, gpt2_tok_model):
    """GPT-2's 'Paris' (40313) and ' Paris' (6342) are different tokens: say so, do not guess."""
    for target, tid, other in (("Paris", 40313, 6342), (" Paris", 6342, 40313)):
        rc, out, err = cli(capfd, "locate", "--model", gpt2_tok_model, "The capital of France is",
                           "--target", target, "--json", "--top", "1")
        r = json.loads(out)
        assert rc == 0 and r["target"]["id"] == tid
        notes = [w for w in r["warnings"] if "leading space" in w]
        assert len(notes) == 1 and f"id {other}" in notes[0], r["warnings"]
    rc, out, err = cli(capfd, "layers", "--model", gpt2_tok_model, "The capital of France is", "--target", "Paris")
    assert rc == 0 and err.startswith("warning: target 'Paris'") and "6342" in err


def test_multi_token_target_shows_its_pieces_and_forms(capfd, gpt2_tok_model):
    rc, _, err = cli(capfd, "locate", "--model", gpt2_tok_model, "The capital", "--target", "paris")
    assert_one_error_line(rc, err, "not a single token", "'par'(1845)", "'Paris' (id 40313)", "' Paris' (id 6342)")


def test_raw_vocabulary_pieces_are_accepted(capfd, gpt2_tok_model):
    rc, out, _ = cli(capfd, "locate", "--model", gpt2_tok_model, "The capital", "--target", "\u0120Paris", "--json",
                     "--top", "1")
    assert rc == 0 and json.loads(out)["target"]["id"] == 6342


# --------------------------------------------------------------------------- terminal-safe output

EVIL = "x\x1b[2J\x1b[31mred\nsecond line\r"


def _st(path, names):
    arrs = {n: np.arange(3.0) + k for k, n in enumerate(names)}
    write_safetensors(str(path), [spec_of(n, a) for n, a in arrs.items()], arrs.items())


def test_compare_escapes_tensor_names(tmp_path, capfd):
    _st(tmp_path / "a.safetensors", [EVIL, "ok"])
    _st(tmp_path / "b.safetensors", [EVIL, "ok", "only\x07b"])
    rc, out, err = cli(capfd, "compare", tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert rc == 0, err
    assert "\x1b" not in out and "\r" not in out and "\x07" not in out
    assert "\\x1b[2J" in out and "only\\x07b" in out
    assert len(out.splitlines()) == 5           # header, two rows, one "only in b" line, the total


def test_verify_escapes_record_names(tmp_path, capfd):
    d = tmp_path / "m"
    write_random_model(str(d), random_config("gpt2", d_vocab=20, n_ctx=8, n_layers=1), seed=1)
    c = json.loads((d / "config.json").read_text())
    c["files"][EVIL] = "0" * 64
    (d / "config.json").write_text(json.dumps(c))
    rc, out, err = cli(capfd, "verify", d)
    assert rc == 2 and "\x1b" not in out + err and "\r" not in out + err
    assert any(line.startswith("x\\x1b[2J") for line in out.splitlines())


def test_error_lines_never_carry_control_characters(tmp_path, capfd):
    rc, out, err = cli(capfd, "layers", "--model", tmp_path / "no\x1b[31msuch\nmodel", "--ids", "1")
    assert_one_error_line(rc, err, "no\\x1b[31msuch\\nmodel")
