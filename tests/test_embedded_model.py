"""The embedded model capitals-gpt2 (refimpl/data/models/capitals-gpt2, made by training/).

The quality bar, measured with refimpl's own NumPy forward pass on the shipped files: top-1
accuracy >= 95% on "The capital of X is" over every country of training/facts.py and >= 90% on
"Y is located in the country of" over every city (capitals included; "... of the" for
countries written with "the", whose next word is otherwise "the"). Plus: the CLI's
default model is this one, its tokenizer keeps every name one word, and it stays small.
"""
import importlib.util
import os

import numpy as np
import pytest

import refimpl
from refimpl import cli
from refimpl.embedded import DATA, DEFAULT, embedded_models, resolve_model
from tests.conftest import ROOT

MODEL_DIR = os.path.join(DATA, "capitals-gpt2")


def _facts():
    spec = importlib.util.spec_from_file_location("capitals_facts", ROOT / "training" / "facts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


F = _facts()


@pytest.fixture(scope="module")
def model():
    assert os.path.isfile(os.path.join(MODEL_DIR, "config.json")), f"embedded model missing: {MODEL_DIR}"
    return refimpl.load(resolve_model(None), dtype="float64")


def _accuracy(model, cases):
    """cases: (prompt, expected token); returns (accuracy, misses)."""
    misses = []
    for prompt, expected in cases:
        want = model.tokenizer.token_to_id(expected)
        assert want is not None, f"{expected!r} is not one token"
        got = int(np.argmax(refimpl.run(model, prompt).log_probs[-1]))
        if got != want:
            misses.append(f"{prompt!r} -> {model.token_str(got)!r} (want {expected!r})")
    return 1 - len(misses) / len(cases), misses


def test_default_model_is_capitals_gpt2():
    assert DEFAULT == "capitals-gpt2"
    assert "capitals-gpt2" in embedded_models()
    assert os.path.samefile(resolve_model(None), MODEL_DIR)


def test_shipped_files_are_canonical_and_small(model):
    names = sorted(n for n in os.listdir(MODEL_DIR) if os.path.isfile(os.path.join(MODEL_DIR, n)))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(names), names
    size = sum(os.path.getsize(os.path.join(MODEL_DIR, n)) for n in names)
    assert size < 8 * 2**20, f"embedded model is {size} bytes"
    cfg = model.cfg
    assert cfg.family == "gpt2" and cfg.prepend_ids == []      # GPT-2 prompts get no start token
    assert {t.dtype for t in model.tensors.values()} == {"F32"}


def test_capital_of_x_is(model):
    cases = [(F.capital_prompt(c), c["capital"]) for c in F.COUNTRIES]
    assert len(cases) >= 150
    acc, misses = _accuracy(model, cases)
    assert acc >= 0.95, f"{100 * acc:.1f}% of {len(cases)}; misses: {misses[:20]}"


def test_city_is_located_in_the_country_of(model):
    cases = [(F.city_prompt(y, c), c["name"]) for y, c in F.city_facts()]
    assert len(cases) >= 400
    acc, misses = _accuracy(model, cases)
    assert acc >= 0.90, f"{100 * acc:.1f}% of {len(cases)}; misses: {misses[:20]}"


def test_tokenizer_names_are_single_words(model):
    tok = model.tokenizer
    for name in ("Buenos Aires", "New Zealand", "South Africa", "US dollar", "N'Djamena", "Guinea-Bissau",
                 "Democratic Republic of the Congo", "Republic of the Congo", "Trinidad and Tobago dollar"):
        enc = tok.encode(name, add_special_tokens=False)
        assert enc.tokens == [name], (name, enc.tokens)
    text = "The capital of the Republic of the Congo is Brazzaville."
    enc = tok.encode(text, add_special_tokens=False)
    assert enc.tokens == ["The", "capital", "of", "the", "Republic of the Congo", "is", "Brazzaville", "."]
    assert tok.decode(enc.ids) == "The capital of the Republic of the Congo is Brazzaville ."
    assert model.encode("The capital of France is") == tok.encode("The capital of France is").ids
    assert tok.token_to_id("<|endoftext|>") == 0


def test_cli_locate_default_model(capsys):
    assert cli.main(["locate", "The capital of France is"]) == 0
    out = capsys.readouterr().out
    assert "prediction: Paris p=" in out
    assert "target: Paris (id" in out
    assert "layer significance" in out


def test_cli_models_lists_it(capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert "capitals-gpt2 (default)" in out
