"""Random mutations and truncations of valid small files, for every reader refimpl has.

The only outcomes allowed are a one-line `refimpl.errors.RefimplError` (FormatError for a
broken file) or a correct result that the rest of refimpl can use: never another
exception type, never a crash (a Rust panic or abort in `tokenizers` included), never a
leftover temporary directory. Where a reference reader exists it is the oracle: a
safetensors file we accept must be accepted by the `safetensors` library with identical
tensors. (torch files: tests/test_torch_pickle.py; the tokenizer parsers on their own:
tests/test_tokenizers.py. Here every tokenizer that a reader accepts must also load and
encode through `refimpl.model`, which is what a converted model will do.)

Budgets are bounded for 2 shared cores: REFIMPL_FUZZ_EXAMPLES (default 120) per test.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import converters
import refimpl
from refimpl.errors import RefimplError
from refimpl.safetensors_io import read_header, spec_of, write_safetensors
from refimpl.synthetic import random_config, write_random_model
from tests.conftest import ROOT, STORIES

N = int(os.environ.get("REFIMPL_FUZZ_EXAMPLES", "120"))
FUZZ = settings(max_examples=N, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


def one_line(e: BaseException) -> None:
    assert isinstance(e, RefimplError), f"{type(e).__name__}: {e}"
    assert str(e) and "\n" not in str(e), repr(str(e))


def mutate(data: bytes, edits, cut, head: int = 0) -> bytes:
    """Apply (where, value) byte edits (where in [0, 1); with `head`, edits with where < 0.5 land in
    the first `head` bytes), then keep a fraction `cut` of the result."""
    d = bytearray(data)
    for where, value in edits:
        if not d:
            break
        if head and where < 0.5:
            i = int(where * 2 * min(head, len(d)))
        else:
            i = int(where * len(d))
        d[min(i, len(d) - 1)] = value
    if cut is not None:
        d = d[:int(cut * len(d))]
    return bytes(d)


EDITS = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=0, max_size=5)
CUT = st.one_of(st.none(), st.floats(0, 1, exclude_max=True))


def _leftovers(folder) -> list[str]:
    return [n for n in os.listdir(folder) if ".tmp-" in n or ".old-" in n]


# --------------------------------------------------------------------------- safetensors

def small_safetensors() -> bytes:
    arrays = {"w": np.arange(6, dtype="<f4").reshape(2, 3) - 2.5, "h": np.array([1.5, -2, 65504, 0], "<f2"),
              "i": np.array([2**40, -7], "<i8"), "e": np.zeros((0, 3), "u1"), "s": np.array(3.25, "<f8")}
    path = "/tmp/refimpl-fuzz-small.safetensors"
    names = list(arrays)
    write_safetensors(path, [spec_of(n, arrays[n]) for n in names], ((n, arrays[n]) for n in names), {"k": "v"})
    data = Path(path).read_bytes()
    os.unlink(path)
    return data


SMALL_ST = small_safetensors()
ST_HEAD = 8 + struct.unpack("<Q", SMALL_ST[:8])[0]


def check_safetensors_against_library(path: str) -> None:
    try:
        tensors, meta = read_header(path)
        ours = {k: t.numpy() for k, t in tensors.items()}
        for a in ours.values():
            np.asarray(a).sum()                      # touch every byte of the map
    except RefimplError as e:
        one_line(e)
        return
    import safetensors.numpy as stn
    try:
        ref = stn.load_file(path)
    except Exception as e:                          # noqa: BLE001  we accepted what the reference refuses
        raise AssertionError(f"refimpl accepted a file safetensors refuses: {e}") from None
    assert set(ref) == set(ours)
    for k, a in ours.items():
        assert a.shape == ref[k].shape and np.asarray(a).tobytes() == ref[k].tobytes(), k


@FUZZ
@given(edits=EDITS, cut=CUT)
def test_safetensors_mutations(tmp_path, edits, cut):
    p = tmp_path / "m.safetensors"
    p.write_bytes(mutate(SMALL_ST, edits, cut, head=ST_HEAD))
    check_safetensors_against_library(str(p))


INTERESTING = st.sampled_from([0, 1, 2, 3, 4, 7, 8, 16, 24, -1, -8, 2**31, 2**32, 2**62, 2**63, 2**64, 10**30])
DIMS = st.one_of(st.integers(0, 5), INTERESTING, st.booleans(), st.just(2.0), st.just("2"), st.none())
DTYPE_NAMES = st.sampled_from(["F32", "F16", "F64", "I64", "U8", "BF16", "BOOL", "F8_E5M2", "f32", ""])


@st.composite
def headers(draw):
    n = draw(st.integers(0, 3))
    header = {}
    for i in range(n):
        entry = {"dtype": draw(DTYPE_NAMES), "shape": draw(st.lists(DIMS, max_size=3)),
                 "data_offsets": draw(st.lists(st.one_of(st.integers(0, 40), INTERESTING), min_size=1, max_size=3))}
        if draw(st.booleans()):
            entry["shape"] = [2]
            entry["data_offsets"] = [8 * i, 8 * i + 8]
            entry["dtype"] = draw(st.sampled_from(["F32", "I32", "U8", "F16"]))
        drop = draw(st.sampled_from([None, "dtype", "shape", "data_offsets"]))
        if drop:
            del entry[drop]
        header[draw(st.sampled_from(["a", "b", "c", "", "__metadata__"]))] = entry
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
                                                st.just([]), st.just({"k": 1}), st.none()))
    return header


@FUZZ
@given(header=headers(), data_len=st.sampled_from([0, 4, 8, 16, 24, 32, 40]), pad=st.integers(0, 9),
       n_delta=st.sampled_from([0, 0, 0, -1, 1, 8, -8, 2**40]))
def test_safetensors_crafted_headers(tmp_path, header, data_len, pad, n_delta):
    blob = json.dumps(header).encode() + b" " * pad
    n = max(0, len(blob) + n_delta) if n_delta != 2**40 else 2**40
    p = tmp_path / "c.safetensors"
    p.write_bytes(struct.pack("<Q", n) + blob + bytes(range(data_len)))
    check_safetensors_against_library(str(p))


# --------------------------------------------------------------------------- canonical model directories

@pytest.fixture(scope="module")
def canonical(tmp_path_factory):
    base = tmp_path_factory.mktemp("canon-fuzz")
    out = {}
    for fam in ("gpt2", "llama", "fairseq_lm"):
        d = write_random_model(str(base / fam), random_config(fam, n_layers=2, d_model=16, n_heads=2, d_ff=16,
                                                              d_vocab=24, n_ctx=12), seed=1)
        out[fam] = {f: Path(d, f).read_bytes() for f in os.listdir(d)}
    return base, out


def _json_mutation(text: bytes, key_pick: float, value) -> bytes:
    """Set one top-level (or one level down) key of a JSON object to `value`."""
    obj = json.loads(text)
    keys = sorted(obj)
    k = keys[int(key_pick * len(keys))]
    if isinstance(obj[k], dict) and obj[k] and key_pick * 10 % 1 < 0.5:
        sub = sorted(obj[k])
        obj[k][sub[int(key_pick * 100) % len(sub)]] = value
    else:
        obj[k] = value
    return json.dumps(obj).encode()


JSON_VALUES = st.one_of(st.integers(-3, 40), INTERESTING, st.booleans(), st.none(), st.floats(allow_nan=True),
                        st.text(max_size=4), st.lists(st.integers(-2, 30), max_size=3),
                        st.dictionaries(st.sampled_from(["cutoffs", "dims", "x"]), st.lists(st.integers(-1, 30), max_size=3),
                                        max_size=2))


def _use_model(path: str) -> None:
    """Everything a user does with a model: load, run ids and text, read out, decode (a clean
    RefimplError, e.g. a context of 1 token, is an allowed outcome)."""
    try:
        _use_model_raw(path)
    except RefimplError as e:
        one_line(e)


def _use_model_raw(path: str) -> None:
    m = refimpl.load(path)
    tr = refimpl.run(m, [min(2, m.cfg.d_vocab - 1)] * 3)
    tr.readout(-1).bs(tr.layers[-1].ffn[-1])
    tr = refimpl.run(m, "t1 t2 t3")
    m.token_str(int(np.argmax(np.nan_to_num(tr.log_probs[-1], nan=-np.inf))))
    m.decode(tr.ids)


@FUZZ
@given(fam=st.sampled_from(["gpt2", "llama", "fairseq_lm"]),
       target=st.sampled_from(["config.json", "config.json/value", "model.safetensors", "tokenizer.json"]),
       edits=EDITS, cut=CUT, key_pick=st.floats(0, 1, exclude_max=True), value=JSON_VALUES)
def test_canonical_dir_mutations(canonical, fam, target, edits, cut, key_pick, value):
    base, files = canonical
    d = base / f"mutant-{fam}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    for f, data in files[fam].items():
        (d / f).write_bytes(data)
    fname = target.split("/")[0]
    if target.endswith("/value"):
        (d / fname).write_bytes(_json_mutation(files[fam][fname], key_pick, value))
    else:
        head = 8 + struct.unpack("<Q", files[fam][fname][:8])[0] if fname.endswith(".safetensors") else 0
        (d / fname).write_bytes(mutate(files[fam][fname], edits, cut, head=head))
    before = {f: (d / f).read_bytes() for f in os.listdir(d)}
    _use_model(str(d))
    assert {f: (d / f).read_bytes() for f in os.listdir(d)} == before


# --------------------------------------------------------------------------- llama2.c model and tokenizer files

def tiny_llama2c(v1: bool, shared: bool = True, d=8, F=16, L=2, H=2, Hk=1, V=512, seq=16) -> bytes:
    rng = np.random.default_rng(5)
    hs = d // H
    kv = Hk * hs

    def w(*shape):
        return (0.3 * rng.standard_normal(shape)).astype("<f4").tobytes()

    att = w(L, d, d) + w(L, kv, d) + w(L, kv, d) + w(L, d, d)
    ffn = w(L, F, d) + w(L, d, F) + w(L, F, d)
    ones = lambda *s: np.ones(s, "<f4").tobytes()           # noqa: E731
    if v1:
        head = struct.pack("<Ii7iB", 0x616B3432, 1, d, F, L, H, Hk, V, seq, int(shared))
        body = ones(L, d) + ones(L, d) + ones(d) + w(V, d) + att + ffn
        head += b"\0" * (256 - len(head))
    else:
        head = struct.pack("<7i", d, F, L, H, Hk, V if shared else -V, seq)
        body = w(V, d) + ones(L, d) + att + ones(L, d) + ffn + ones(d) + w(seq, hs // 2) + w(seq, hs // 2)
    return head + body + (b"" if shared else w(V, d))


@pytest.fixture(scope="module")
def l2c_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("l2c-fuzz")
    shutil.copy(STORIES / "tok512.bin", d / "tok512.bin")
    for v1 in (False, True):           # both layouts convert as they are
        p = d / "ok.bin"
        p.write_bytes(tiny_llama2c(v1, shared=v1))
        out = converters.convert(str(p), str(d / "ok-out"), tokenizer=str(d / "tok512.bin"), force=True)
        _use_model(out)
    return d


@FUZZ
@given(v1=st.booleans(), shared=st.booleans(), edits=EDITS, cut=CUT)
def test_llama2c_model_mutations(l2c_dir, v1, shared, edits, cut):
    src = l2c_dir / "model.bin"
    src.write_bytes(mutate(tiny_llama2c(v1, shared), edits, cut, head=256 if v1 else 28))
    out = l2c_dir / "out" / "m"
    shutil.rmtree(out.parent, ignore_errors=True)
    out.parent.mkdir()
    try:
        converters.convert(str(src), str(out), tokenizer=str(l2c_dir / "tok512.bin"))
    except RefimplError as e:
        one_line(e)
        assert not out.exists() and _leftovers(out.parent) == []
        return
    _use_model(str(out))


TOK512 = (STORIES / "tok512.bin").read_bytes()


def _tokenizer_json_loads(text: str, where: Path) -> None:
    """A converted tokenizer.json must load and encode through refimpl.model."""
    from refimpl.model import _load_tokenizer
    p = where / "tokenizer.json"
    p.write_text(text, encoding="utf-8")
    tok = _load_tokenizer(str(p))
    tok.encode("Once upon a time \u2581 <s> \xff\u00e9 \U0001F600", add_special_tokens=False)


@FUZZ
@given(edits=EDITS, cut=CUT)
def test_llama2c_tokenizer_mutations(tmp_path, edits, cut):
    from converters.tokenizers import llama2c_tokenizer_json
    p = tmp_path / "tok.bin"
    p.write_bytes(mutate(TOK512, edits, cut, head=64))
    try:
        text, _ = llama2c_tokenizer_json(str(p), 512)
        _tokenizer_json_loads(text, tmp_path)
    except RefimplError as e:
        one_line(e)


# --------------------------------------------------------------------------- tokenizer.model, dict.txt

def _spm_bytes() -> bytes:
    from tests.test_tokenizers import synthetic_model
    return synthetic_model()


SPM = _spm_bytes()


@FUZZ
@given(edits=EDITS, cut=CUT)
def test_tokenizer_model_mutations(tmp_path, edits, cut):
    from converters.tokenizers import llama_tokenizer_json
    p = tmp_path / "tokenizer.model"
    p.write_bytes(mutate(SPM, edits, cut))
    try:
        text, specials = llama_tokenizer_json(str(p))
        _tokenizer_json_loads(text, tmp_path)
    except RefimplError as e:
        one_line(e)


DICT = (ROOT / "tests" / "fixtures" / "fairseq_tiny" / "dict.txt").read_bytes()


@FUZZ
@given(edits=EDITS, cut=CUT, extra=st.lists(st.text(max_size=12), max_size=3))
def test_fairseq_dict_mutations(tmp_path, edits, cut, extra):
    from converters.tokenizers import fairseq_dict_tokenizer_json
    p = tmp_path / "dict.txt"
    p.write_bytes(mutate(DICT, edits, cut) + "".join(x + "\n" for x in extra).encode("utf-8", "surrogatepass"))
    try:
        text, _ = fairseq_dict_tokenizer_json(str(p))
        _tokenizer_json_loads(text, tmp_path)
    except RefimplError as e:
        one_line(e)


# --------------------------------------------------------------------------- HF config.json

def _hf_sources(base: Path) -> dict:
    from tests.test_robustness import hf_gpt2_dir, hf_llama_dir
    return {"gpt2": hf_gpt2_dir(base / "gpt2"), "llama": hf_llama_dir(base / "llama")}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("hf-fuzz")
    return base, _hf_sources(base)


# converters/hf_gpt2.py and hf_llama.py build a set of every layer's tensor names before they
# check any tensor, so an absurd layer count exhausts memory (reported); keep those sane here
LAYER_KEYS = {"n_layer", "num_hidden_layers"}


@FUZZ
@given(fam=st.sampled_from(["gpt2", "llama"]), how=st.sampled_from(["value", "bytes"]), edits=EDITS, cut=CUT,
       key_pick=st.floats(0, 1, exclude_max=True), value=JSON_VALUES)
def test_hf_config_mutations(hf_dirs, fam, how, edits, cut, key_pick, value):
    base, srcs = hf_dirs
    src = srcs[fam]
    good = (src / "config.json").read_bytes()
    if how == "value":
        keys = sorted(json.loads(good))
        if keys[int(key_pick * len(keys))] in LAYER_KEYS and isinstance(value, int) and value > 64:
            value = 64
        data = _json_mutation(good, key_pick, value)
    else:
        data = mutate(good, edits, cut)
        try:
            layers = json.loads(data).get("n_layer" if fam == "gpt2" else "num_hidden_layers")
            if isinstance(layers, int) and layers > 64:
                return
        except Exception:        # noqa: BLE001  not JSON: the converter must say so
            pass
    out = base / "out" / "m"
    shutil.rmtree(out.parent, ignore_errors=True)
    out.parent.mkdir()
    (src / "config.json").write_bytes(data)
    try:
        converters.convert(str(src), str(out))
    except RefimplError as e:
        one_line(e)
        assert not out.exists() and _leftovers(out.parent) == []
        return
    finally:
        (src / "config.json").write_bytes(good)
    _use_model(str(out))
