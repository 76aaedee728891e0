"""Hostile and broken inputs: nothing executes, nothing is lost, every error is clear.

The malicious pickle corpus (code execution attempts) is tests/test_torch_pickle.py; the
tokenizer readers' own corruption tests are in tests/test_tokenizers.py; random fuzzing of
every reader is tests/test_fuzz_readers.py. This file checks, through the `refimpl` CLI:

- a truncated or corrupted input of every supported format gives exactly one stderr line
  `error: ...` naming the file, exit code 2, no output directory and no temporary
  directory left behind, and the input files byte-identical afterwards;
- hostile tensor metadata (safetensors headers, llama2.c headers, config.json sizes) is
  refused before anything is allocated or mapped;
- bad requests (prompt, target, layer, neuron, position, readout, ids, paths) of every
  analysis subcommand give one clear error line;
- weights with NaN/Inf are refused at conversion naming the tensor; `refimpl verify`
  catches edited, truncated, missing and unrecorded files; float16-stored weights are
  computed in float32/float64 and never overflow.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import resource
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import converters
import refimpl
from refimpl.cli import main as cli_main
from refimpl.errors import FormatError, RefimplError
from refimpl.safetensors_io import read_header, spec_of, write_safetensors
from refimpl.synthetic import random_config, word_tokenizer_json, write_random_model
from tests.conftest import ROOT, STORIES

BIN = STORIES / "stories260K.bin"
TOK = STORIES / "tok512.bin"


# --------------------------------------------------------------------------- helpers

def cli(capfd, *argv):
    """Run the CLI in-process; (exit code, stdout, stderr) as seen on the file descriptors."""
    rc = cli_main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return rc, out, err


def assert_one_error_line(rc, err, *needles):
    assert rc == 2, f"exit code {rc}, stderr {err!r}"
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, repr(err)
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"


def hashes(*paths) -> dict:
    """sha256 of every file under the given files/directories."""
    out = {}
    for p in map(Path, paths):
        files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def leftovers(folder) -> list[str]:
    return [n for n in os.listdir(folder) if ".tmp-" in n or ".old-" in n or n.endswith(".tmp")]


def damage(path, how):
    """Apply one damage to a file: ("cut", n) keep n bytes (negative: drop -n), ("set", offset, bytes),
    ("text", str) replace the content."""
    p = Path(path)
    data = bytearray(p.read_bytes())
    if how[0] == "cut":
        n = how[1]
        data = data[:n] if n >= 0 else data[:len(data) + n]
    elif how[0] == "set":
        off = how[1] if how[1] >= 0 else len(data) + how[1]
        data[off:off + len(how[2])] = how[2]
    elif how[0] == "text":
        data = bytearray(how[1].encode("utf-8"))
    p.write_bytes(bytes(data))


def st_header_len(path) -> int:
    return struct.unpack("<Q", Path(path).read_bytes()[:8])[0]


def expect_convert_refused(capfd, tmp_path, src, *needles, tokenizer=None, fmt=None):
    """`refimpl convert` fails cleanly: one line, exit 2, no output, no temp dirs, inputs intact."""
    inputs = [src] + ([tokenizer] if tokenizer else [])
    before = hashes(*inputs)
    out_parent = tmp_path / "outputs"
    out_parent.mkdir(exist_ok=True)
    dst = out_parent / "model"
    argv = ["convert", src, dst] + (["--tokenizer", tokenizer] if tokenizer else []) + (["--format", fmt] if fmt else [])
    rc, _, err = cli(capfd, *argv)
    assert_one_error_line(rc, err, *needles)
    assert not dst.exists(), "a partial output directory was left"
    assert leftovers(out_parent) == [], leftovers(out_parent)
    assert hashes(*inputs) == before, "an input file was modified"
    return err


# --------------------------------------------------------------------------- tiny source checkpoints
# Built with numpy (safetensors) or torch.save (.bin/.pth, only to write fixtures).

def _rand(shape, rng):
    return (0.3 * rng.standard_normal(shape)).astype(np.float32)


def _write_st(path, arrays: dict):
    names = list(arrays)
    write_safetensors(str(path), [spec_of(n, arrays[n]) for n in names], ((n, arrays[n]) for n in names))


def _torch_save(path, arrays: dict, zip_format: bool = True):
    torch = pytest.importorskip("torch")
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, str(path),
               _use_new_zipfile_serialization=zip_format)


def hf_gpt2_dir(path, weights="safetensors", poison=None, V=16, d=8, L=1, H=2, P=8):
    """A tiny HF GPT-2 directory: config.json, weights, tokenizer.json. `poison`: (tensor, value)."""
    path = Path(path)
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shapes = {"wte.weight": (V, d), "wpe.weight": (P, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(L):
        h = f"h.{i}."
        shapes.update({h + "ln_1.weight": (d,), h + "ln_1.bias": (d,), h + "attn.c_attn.weight": (d, 3 * d),
                       h + "attn.c_attn.bias": (3 * d,), h + "attn.c_proj.weight": (d, d),
                       h + "attn.c_proj.bias": (d,), h + "ln_2.weight": (d,), h + "ln_2.bias": (d,),
                       h + "mlp.c_fc.weight": (d, 4 * d), h + "mlp.c_fc.bias": (4 * d,),
                       h + "mlp.c_proj.weight": (4 * d, d), h + "mlp.c_proj.bias": (d,)})
    arrays = {k: _rand(s, rng) for k, s in shapes.items()}
    if poison:
        name, value = poison
        arrays[name].reshape(-1)[3] = value
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": d, "n_layer": L, "n_head": H,
                                                  "vocab_size": V, "n_positions": P}))
    (path / "tokenizer.json").write_text(word_tokenizer_json([f"w{i}" for i in range(V)]))
    if weights == "safetensors":
        _write_st(path / "model.safetensors", arrays)
    else:
        _torch_save(path / "pytorch_model.bin", arrays, zip_format=(weights == "bin-zip"))
    return path


def spm_model_bytes() -> bytes:
    from tests.test_tokenizers import synthetic_model
    return synthetic_model()


def hf_llama_dir(path, d=8, L=1, H=2, F=16):
    """A tiny HF Llama directory whose tokenizer is a SentencePiece tokenizer.model."""
    from converters.tokenizers import parse_model_proto
    path = Path(path)
    path.mkdir(parents=True)
    tm = spm_model_bytes()
    V = len(parse_model_proto(tm).pieces)
    rng = np.random.default_rng(1)
    shapes = {"model.embed_tokens.weight": (V, d), "model.norm.weight": (d,), "lm_head.weight": (V, d)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (d, d),
                       p + "self_attn.v_proj.weight": (d, d), p + "self_attn.o_proj.weight": (d, d),
                       p + "mlp.gate_proj.weight": (F, d), p + "mlp.up_proj.weight": (F, d),
                       p + "mlp.down_proj.weight": (d, F)})
    _write_st(path / "model.safetensors", {k: _rand(s, rng) for k, s in shapes.items()})
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": d, "num_attention_heads": H, "num_hidden_layers": L,
        "intermediate_size": F, "vocab_size": V, "max_position_embeddings": 32, "rms_norm_eps": 1e-5}))
    (path / "tokenizer.model").write_bytes(tm)
    return path


def meta_dir(path, d=8, L=1, H=2, poison=None):
    """A tiny Meta LLaMA directory: params.json, consolidated.00.pth, tokenizer.model."""
    from converters.meta_llama import ffn_hidden_dim
    from converters.tokenizers import parse_model_proto
    path = Path(path)
    path.mkdir(parents=True)
    tm = spm_model_bytes()
    V = len(parse_model_proto(tm).pieces)
    F = ffn_hidden_dim(d, 16, None)
    rng = np.random.default_rng(2)
    shapes = {"tok_embeddings.weight": (V, d), "norm.weight": (d,), "output.weight": (V, d)}
    for i in range(L):
        p = f"layers.{i}."
        shapes.update({p + "attention.wq.weight": (d, d), p + "attention.wk.weight": (d, d),
                       p + "attention.wv.weight": (d, d), p + "attention.wo.weight": (d, d),
                       p + "feed_forward.w1.weight": (F, d), p + "feed_forward.w2.weight": (d, F),
                       p + "feed_forward.w3.weight": (F, d), p + "attention_norm.weight": (d,),
                       p + "ffn_norm.weight": (d,)})
    arrays = {k: _rand(s, rng) for k, s in shapes.items()}
    if poison:
        arrays[poison[0]].reshape(-1)[5] = poison[1]
    _torch_save(path / "consolidated.00.pth", arrays)
    (path / "params.json").write_text(json.dumps({"dim": d, "n_layers": L, "n_heads": H, "multiple_of": 16,
                                                  "norm_eps": 1e-5, "vocab_size": -1}))
    (path / "tokenizer.model").write_bytes(tm)
    return path


def llama2c_files(tmp_path):
    d = tmp_path / "l2c"
    d.mkdir()
    shutil.copy(BIN, d / "model.bin")
    shutil.copy(TOK, d / "tok512.bin")
    return d / "model.bin", d / "tok512.bin"


def test_fixture_sources_convert(tmp_path, capfd):
    """The tiny sources used below are valid: every damage below is the only thing wrong."""
    srcs = [hf_gpt2_dir(tmp_path / "g"), hf_llama_dir(tmp_path / "l")]
    srcs += [hf_gpt2_dir(tmp_path / "gz", "bin-zip"), hf_gpt2_dir(tmp_path / "gl", "bin-legacy"),
             meta_dir(tmp_path / "m")]
    for i, src in enumerate(srcs):
        rc, out, err = cli(capfd, "convert", src, tmp_path / f"o{i}")
        assert rc == 0 and err == "", err
        refimpl.run(refimpl.load(str(tmp_path / f"o{i}")), [1, 2, 3])
    b, t = llama2c_files(tmp_path)
    assert cli(capfd, "convert", b, tmp_path / "o-l2c", "--tokenizer", t)[0] == 0


# --------------------------------------------------------------------------- corrupted sources, every format

HUGE_L2C = struct.pack("<7i", (1 << 20) - 2, (1 << 20) - 1, (1 << 20) - 1, 1, 1, (1 << 20) - 1, (1 << 20) - 1)

LLAMA2C_CASES = {
    "empty": ("cut", 0), "header-cut": ("cut", 20), "truncated": ("cut", 1000), "last-byte": ("cut", -1),
    "trailing": None, "negative-dim": ("set", 0, struct.pack("<i", -64)),
    "negative-layers": ("set", 8, struct.pack("<i", -5)), "zero-heads": ("set", 12, struct.pack("<i", 0)),
    "int-max-hidden": ("set", 4, struct.pack("<i", 2**31 - 1)), "huge-dims": ("set", 0, HUGE_L2C),
    "v2-magic": ("set", 0, struct.pack("<Ii", 0x616B3432, 2)),
    "v1-magic-short": ("set", 0, struct.pack("<Ii", 0x616B3432, 1)),
}


@pytest.mark.parametrize("case", sorted(LLAMA2C_CASES))
@pytest.mark.parametrize("fmt", [None, "llama2c"])
def test_llama2c_model_corruption(tmp_path, capfd, case, fmt):
    model, tok = llama2c_files(tmp_path)
    how = LLAMA2C_CASES[case]
    if how is None:
        model.write_bytes(model.read_bytes() + b"\0\0\0\0")
    else:
        damage(model, how)
    if case == "v1-magic-short":
        damage(model, ("cut", 30))
    expect_convert_refused(capfd, tmp_path, model, "model.bin", tokenizer=tok, fmt=fmt)


@pytest.mark.parametrize("how", [("cut", 0), ("cut", 3), ("cut", 100), ("cut", -1), ("set", 0, b"\xff\xff\xff\xff"),
                                 ("set", 8, struct.pack("<i", 1 << 30))], ids=str)
def test_llama2c_tokenizer_corruption(tmp_path, capfd, how):
    model, tok = llama2c_files(tmp_path)
    damage(tok, how)
    expect_convert_refused(capfd, tmp_path, model, "tok512.bin", tokenizer=tok)


def test_llama2c_huge_header_is_checked_before_allocation(tmp_path):
    """Sizes whose product needs 60+ bits are compared with the file size; nothing is mapped."""
    from converters.llama2c import read_llama2c
    model, _ = llama2c_files(tmp_path)
    damage(model, ("set", 0, HUGE_L2C))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (max(4 << 30, _vm_bytes() + (1 << 30)), hard))
        with pytest.raises(FormatError, match="header implies"):
            read_llama2c(str(model))
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _vm_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


SAFETENSORS_CASES = {
    "header-length-cut": ("cut", 4),
    "header-cut": "mid-header",
    "data-cut": ("cut", -1),
    "header-length-huge": ("set", 0, struct.pack("<Q", 1 << 62)),
    "header-length-beyond-file": ("set", 0, struct.pack("<Q", 1 << 20)),
    "header-not-json": ("set", 8, b"\xff\xfe"),
    "header-not-object": "list-header",
}


def _st_case(path, case):
    how = SAFETENSORS_CASES[case]
    if how == "mid-header":
        damage(path, ("cut", 8 + st_header_len(path) // 2))
    elif how == "list-header":
        data = Path(path).read_bytes()
        n = st_header_len(path)
        Path(path).write_bytes(struct.pack("<Q", n) + b"[" + b" " * (n - 2) + b"]" + data[8 + n:])
    else:
        damage(path, how)


@pytest.mark.parametrize("case", sorted(SAFETENSORS_CASES))
def test_hf_safetensors_corruption(tmp_path, capfd, case):
    src = hf_gpt2_dir(tmp_path / "src")
    _st_case(src / "model.safetensors", case)
    expect_convert_refused(capfd, tmp_path, src, "model.safetensors")


TORCH_CASES = {
    "zip-directory-cut": ("bin-zip", ("cut", -30)),            # end of central directory gone
    "zip-directory-garbage": ("bin-zip", ("set", -60, b"\xa5" * 40)),
    "zip-half": ("bin-zip", "half"),
    "legacy-pickle-cut": ("bin-legacy", ("cut", 40)),
    "legacy-half": ("bin-legacy", "half"),
    "legacy-last-byte": ("bin-legacy", ("cut", -1)),
    "legacy-magic": ("bin-legacy", ("set", 2, b"\x00" * 8)),
}


@pytest.mark.parametrize("case", sorted(TORCH_CASES))
def test_hf_torch_bin_corruption(tmp_path, capfd, case):
    weights, how = TORCH_CASES[case]
    src = hf_gpt2_dir(tmp_path / "src", weights)
    f = src / "pytorch_model.bin"
    damage(f, ("cut", f.stat().st_size // 2) if how == "half" else how)
    expect_convert_refused(capfd, tmp_path, src, "pytorch_model.bin")


HF_CONFIG_CASES = {
    "truncated": ('{"model_type": "gpt2", "n_embd": ', None),
    "empty": ("", None),
    "not-object": ("[1, 2]", None),
    "not-utf8": (None, b"\xff\xfe{}"),
    "deep": ("[" * 100000 + "]" * 100000, None),
    "negative-size": (None, {"n_embd": -8}),
    "zero-heads": (None, {"n_head": 0}),
    "string-vocab": (None, {"vocab_size": "16"}),
    "bool-layers": (None, {"n_layer": True}),
    "float-eps": (None, {"layer_norm_epsilon": "tiny"}),
    "huge-layers": (None, {"n_layer": 10**9}),
    "huge-vocab": (None, {"vocab_size": 10**15}),
}


@pytest.mark.parametrize("case", sorted(HF_CONFIG_CASES))
def test_hf_config_json_corruption(tmp_path, capfd, case):
    src = hf_gpt2_dir(tmp_path / "src")
    text, patch = HF_CONFIG_CASES[case]
    cfg = src / "config.json"
    if isinstance(patch, bytes):
        cfg.write_bytes(patch)
    elif patch is not None:
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), **patch}))
    else:
        cfg.write_text(text)
    # an impossible size is either refused from config.json or found not to match the weights
    needle = "config.json"                     # huge-vocab: refused by the size cap before any shape check
    expect_convert_refused(capfd, tmp_path, src, needle, fmt="hf-gpt2" if case == "deep" else None)


def _bad_charsmap_tokenizer_json(vocab) -> str:
    tj = json.loads(word_tokenizer_json(vocab))
    tj["normalizer"] = {"type": "Precompiled",
                        "precompiled_charsmap": base64.b64encode(b"\x08\x00\x00\x00" + b"\xff" * 8 + b"ab").decode()}
    return json.dumps(tj)


@pytest.mark.parametrize("case", ["truncated", "not-json", "wrong-model", "not-utf8"])
def test_hf_tokenizer_json_corruption(tmp_path, capfd, case):
    src = hf_gpt2_dir(tmp_path / "src")
    tj = src / "tokenizer.json"
    if case == "truncated":
        damage(tj, ("cut", 50))
    elif case == "not-json":
        tj.write_text("hello")
    elif case == "wrong-model":
        tj.write_text(json.dumps({**json.loads(tj.read_text()), "model": {"type": "Bogus"}}))
    else:
        tj.write_bytes(b"\xff" * 10)
    expect_convert_refused(capfd, tmp_path, src, "tokenizer.json")


def test_hf_tokenizer_json_that_panics_tokenizers(tmp_path, capfd):
    src = hf_gpt2_dir(tmp_path / "src")
    (src / "tokenizer.json").write_text(_bad_charsmap_tokenizer_json([f"w{i}" for i in range(16)]))
    expect_convert_refused(capfd, tmp_path, src, "tokenizer.json")


@pytest.mark.parametrize("how", [("cut", 0), ("cut", 11), ("cut", -3), ("set", 0, b"\xff" * 12)], ids=str)
def test_hf_llama_tokenizer_model_corruption(tmp_path, capfd, how):
    src = hf_llama_dir(tmp_path / "src")
    damage(src / "tokenizer.model", how)
    expect_convert_refused(capfd, tmp_path, src, "tokenizer.model")


@pytest.mark.parametrize("case", ["truncated", "not-object", "negative-dim", "string-heads", "inconsistent",
                                  "shard-cut", "tokenizer-cut"])
def test_meta_corruption(tmp_path, capfd, case):
    src = meta_dir(tmp_path / "src")
    p = src / "params.json"
    good = json.loads(p.read_text())
    needle = "params.json"
    if case == "truncated":
        damage(p, ("cut", 10))
    elif case == "not-object":
        p.write_text('"dim"')
    elif case == "negative-dim":
        p.write_text(json.dumps({**good, "dim": -8}))
    elif case == "string-heads":
        p.write_text(json.dumps({**good, "n_heads": "2"}))
    elif case == "inconsistent":
        p.write_text(json.dumps({**good, "n_heads": 3}))
    elif case == "shard-cut":
        damage(src / "consolidated.00.pth", ("cut", -40))
        needle = "consolidated.00.pth"
    else:
        damage(src / "tokenizer.model", ("cut", 20))
        needle = "tokenizer.model"
    expect_convert_refused(capfd, tmp_path, src, needle)


FAIRSEQ = ROOT / "tests" / "fixtures" / "fairseq_tiny" / "new"


@pytest.mark.parametrize("how", [("text", "a 1\nb\n"), ("text", "x 1.5\n"), ("set", 0, b"\xff\xfe"), ("cut", 0)], ids=str)
def test_fairseq_dict_corruption(tmp_path, capfd, how):
    pytest.importorskip("converters.fairseq_lm")
    src = tmp_path / "src"
    shutil.copytree(FAIRSEQ, src)
    damage(src / "dict.txt", how)
    expect_convert_refused(capfd, tmp_path, src, "dict.txt", fmt="fairseq")


# --------------------------------------------------------------------------- NaN / Inf at conversion

@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_llama2c_nan_inf_refused_naming_the_tensor(tmp_path, capfd, value):
    model, tok = llama2c_files(tmp_path)
    hdr = struct.unpack("<7i", BIN.read_bytes()[:28])
    dim, vocab = hdr[0], hdr[5]
    # legacy layout: token embedding [V, d], then rms_att [L, d]; poison rms_att of layer 1
    off = 28 + 4 * (vocab * dim + dim + 3)
    damage(model, ("set", off, np.float32(value).tobytes()))
    expect_convert_refused(capfd, tmp_path, model, "blocks.1.ln1.w", "NaN or Inf", tokenizer=tok)


@pytest.mark.parametrize("weights", ["safetensors", "bin-zip"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_hf_nan_inf_refused_naming_the_tensor(tmp_path, capfd, weights, value):
    src = hf_gpt2_dir(tmp_path / "src", weights, poison=("h.0.mlp.c_fc.weight", value))
    expect_convert_refused(capfd, tmp_path, src, "blocks.0.mlp.W_in", "NaN or Inf")


def test_meta_nan_refused_naming_the_tensor(tmp_path, capfd):
    src = meta_dir(tmp_path / "src", poison=("layers.0.feed_forward.w2.weight", np.nan))
    expect_convert_refused(capfd, tmp_path, src, "blocks.0.mlp.W_out", "NaN or Inf")


def test_bf16_nan_refused(tmp_path, capfd):
    """BF16 is written as raw bits: the exponent check catches NaN/Inf there too."""
    src = hf_gpt2_dir(tmp_path / "src")
    t, _ = read_header(str(src / "model.safetensors"))
    arrays = {k: np.asarray(v.numpy()) for k, v in t.items()}
    bits = {k: (a.view(np.uint32) >> 16).astype(np.uint16) for k, a in arrays.items()}
    bits["ln_f.weight"][2] = 0x7FC0                                           # bf16 NaN
    names = list(bits)
    write_safetensors(str(src / "model.safetensors"), [spec_of(n, bits[n], bf16=True) for n in names],
                      ((n, bits[n]) for n in names))
    expect_convert_refused(capfd, tmp_path, src, "ln_final.w", "NaN or Inf")


# --------------------------------------------------------------------------- the output directory

def test_non_empty_destination_is_left_alone(tmp_path, capfd):
    model, tok = llama2c_files(tmp_path)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "notes.txt").write_text("precious")
    rc, _, err = cli(capfd, "convert", model, dst, "--tokenizer", tok)
    assert_one_error_line(rc, err, str(dst), "--force")
    assert os.listdir(dst) == ["notes.txt"] and (dst / "notes.txt").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    rc, _, err = cli(capfd, "convert", model, tmp_path / "file", "--tokenizer", tok)
    assert_one_error_line(rc, err, "not a directory")


def test_failed_force_conversion_keeps_the_old_model(tmp_path, capfd):
    """--force onto an existing model with a broken source: the old model survives intact."""
    model, tok = llama2c_files(tmp_path)
    dst = tmp_path / "dst"
    assert cli(capfd, "convert", model, dst, "--tokenizer", tok)[0] == 0
    before = hashes(dst)
    damage(tok, ("cut", 100))
    rc, _, err = cli(capfd, "convert", model, dst, "--tokenizer", tok, "--force")
    assert_one_error_line(rc, err, "tok512.bin")
    assert hashes(dst) == before and leftovers(tmp_path) == []
    assert cli(capfd, "verify", dst)[0] == 0


def test_failure_while_writing_cleans_up(tmp_path, capfd, monkeypatch):
    """An error in the middle of writing tensors (here: the 5th tensor) removes the temp directory."""
    from refimpl import writer as canonical
    model, tok = llama2c_files(tmp_path)
    calls = {"n": 0}
    real = canonical._checked

    def failing(p):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RefimplError(f"tensor {p.name}: simulated failure")
        return real(p)

    monkeypatch.setattr(canonical, "_checked", failing)
    out = tmp_path / "outputs"
    out.mkdir()
    rc, _, err = cli(capfd, "convert", model, out / "m", "--tokenizer", tok)
    assert_one_error_line(rc, err, "simulated failure")
    assert os.listdir(out) == []


# --------------------------------------------------------------------------- corrupted canonical models

@pytest.fixture(scope="module")
def canonical_src(tmp_path_factory):
    d = tmp_path_factory.mktemp("canon")
    return write_random_model(str(d / "m"), random_config("gpt2", d_vocab=20, n_ctx=16), seed=3)


def _padding_bomb(tj: str) -> str:
    t = json.loads(tj)
    t["padding"] = {"strategy": {"Fixed": 10**12}, "direction": "Right", "pad_to_multiple_of": None,
                    "pad_id": 0, "pad_type_id": 0, "pad_token": "t0"}
    return json.dumps(t)


def _truncation(tj: str) -> str:
    t = json.loads(tj)
    t["truncation"] = {"max_length": 1, "stride": 0, "strategy": "LongestFirst", "direction": "Right"}
    return json.dumps(t)


def _no_unk(tj: str) -> str:
    t = json.loads(tj)
    t["model"]["unk_token"] = "<missing>"
    return json.dumps(t)


CANONICAL_CASES = {
    "config-truncated": ("config.json", ("cut", 40)),
    "config-not-object": ("config.json", ("text", "[]")),
    "config-not-utf8": ("config.json", ("set", 0, b"\xff")),
    "config-negative-layers": ("config.json", {"n_layers": -1}),
    "config-huge-layers": ("config.json", {"n_layers": 10**8}),
    "config-huge-vocab": ("config.json", {"d_vocab": 10**12}),
    "config-huge-head": ("config.json", {"d_head": 10**12}),
    "config-bad-norm": ("config.json", {"norm": "batchnorm"}),
    "config-string-theta": ("config.json", {"rope_theta": "big"}),
    "config-bad-prepend": ("config.json", {"prepend_ids": [10**6]}),
    "config-other-format": ("config.json", {"format": "something-else"}),
    "config-gated-without-gate": ("config.json", {"gated_ffn": True}),
    "config-missing-field": ("config.json", "drop-d_model"),
    "config-no-format": ("config.json", "drop-format"),
    "config-no-format-version": ("config.json", "drop-format_version"),
    "config-missing": ("config.json", "delete"),
    "weights-header-cut": ("model.safetensors", "mid-header"),
    "weights-data-cut": ("model.safetensors", ("cut", -4)),
    "weights-huge-header": ("model.safetensors", ("set", 0, struct.pack("<Q", 1 << 62))),
    "weights-missing": ("model.safetensors", "delete"),
    "weights-wrong-shape": ("model.safetensors", "reshape"),
    "tokenizer-truncated": ("tokenizer.json", ("cut", 30)),
    "tokenizer-not-utf8": ("tokenizer.json", ("set", 0, b"\xff\xfe")),
    "tokenizer-missing": ("tokenizer.json", "delete"),
    "tokenizer-panics": ("tokenizer.json", _bad_charsmap_tokenizer_json),
    "tokenizer-padding-bomb": ("tokenizer.json", _padding_bomb),
    "tokenizer-truncation": ("tokenizer.json", _truncation),
    "tokenizer-no-unk": ("tokenizer.json", _no_unk),
}


def _damage_canonical(d: Path, fname: str, how):
    f = d / fname
    if how == "delete":
        f.unlink()
    elif how == "mid-header":
        damage(f, ("cut", 8 + st_header_len(f) // 2))
    elif how.startswith("drop-") if isinstance(how, str) else False:
        c = json.loads(f.read_text())
        del c[how[len("drop-"):]]
        f.write_text(json.dumps(c))
    elif how == "reshape":
        t, _ = read_header(str(f))
        arrays = {k: np.array(v.numpy()) for k, v in t.items()}
        arrays["blocks.0.attn.b_Q"] = arrays["blocks.0.attn.b_Q"].reshape(-1)          # [H, dh] -> [H*dh]
        _write_st(f, arrays)
    elif isinstance(how, dict):
        f.write_text(json.dumps({**json.loads(f.read_text()), **how}))
    elif callable(how):
        f.write_text(how(word_tokenizer_json([f"t{i}" for i in range(20)])))
    else:
        damage(f, how)


@pytest.mark.parametrize("case", sorted(CANONICAL_CASES))
def test_corrupted_canonical_model(tmp_path, capfd, canonical_src, case):
    d = tmp_path / "m"
    shutil.copytree(canonical_src, d)
    fname, how = CANONICAL_CASES[case]
    _damage_canonical(d, fname, how)
    before = hashes(d)
    rc, _, err = cli(capfd, "layers", "t1 t2 t3", "--model", d)
    if case in NEUTRALISED:                   # tokenizer padding/truncation settings are switched off,
        # and the run says the tokenizer is not the one recorded at conversion
        assert rc == 0 and err.count("\n") == 1 and err.startswith("warning: ") and \
            "not the tokenizer recorded at conversion" in err, err
    else:
        assert_one_error_line(rc, err, "config.json" if fname == "config.json" else
                              "blocks.0.attn.b_Q" if how == "reshape" else fname)
    assert hashes(d) == before
    rc, _, err = cli(capfd, "verify", d)
    # verify re-hashes the weights and the tokenizer, and checks config.json against the digest
    # recorded in it: every damage is found
    assert_one_error_line(rc, err)


NEUTRALISED = {"tokenizer-padding-bomb", "tokenizer-truncation"}


# --------------------------------------------------------------------------- bad requests

SUBCOMMANDS = {
    "layers": [], "subvalues": ["--layer", "0"], "vocab": ["--layer", "0"], "additivity": ["--layer", "0"],
    "subkey": ["--layer", "0"], "trace": ["--layer", "0", "--neuron", "0"], "compare-tokens": ["--tokens", "a,b"],
    "baseline": [], "locate": ["--counts", "no", "--top", "2"], "dump": ["--out", "{tmp}/dump.safetensors"],
}
TARGETED = [c for c in SUBCOMMANDS if c not in ("subkey", "trace", "compare-tokens")]

REQUESTS = {
    "empty-prompt": (["", ], "empty prompt"),
    "blank-prompt": (["  \n\t"], "empty prompt"),
    "too-long": (["Once " * 600], "context"),
    "no-prompt": ([], "no prompt"),
    "prompt-and-ids": (["Once", "--ids", "1,2"], "not both"),
    "ids-garbage": (["--ids", "1,two,3"], "--ids"),
    "ids-empty": (["--ids", ","], "--ids"),
    "ids-empty-item": (["--ids", "5,,9"], "empty item"),
    "ids-trailing-comma": (["--ids", "5,9,"], "empty item"),
    "ids-other-digits": (["--ids", "\u0665,\u0669"], "--ids"),
    "ids-decimal": (["--ids", "5,9.0"], "--ids"),
    "ids-out-of-vocab": (["--ids", "1,512"], "out of range"),
    "ids-negative": (["--ids", "1,-3"], "out of range"),
    "ids-too-long": (["--ids", ",".join(["1"] * 513)], "context"),
    "position-too-big": (["Once upon", "--position", "9"], "position"),
    "position-too-small": (["Once upon", "--position", "-9"], "position"),
    "position-garbage": (["Once upon", "--position", "x"], "--position"),
    "bad-readout": (["Once upon", "--readout", "logit"], "--readout"),
    "bad-dtype": (["Once upon", "--dtype", "float16"], "--dtype"),
    "unknown-model": (["Once upon", "--model", "{tmp}/no/such/model"], "no/such/model"),
    "model-not-converted": (["Once upon", "--model", str(STORIES)], "refimpl convert"),
    "unknown-option": (["Once upon", "--frobnicate"], "--frobnicate"),
}
TARGET_REQUESTS = {
    "target-two-tokens": (["Once upon", "--target", "upon a time"], "not a single token"),
    "target-empty": (["Once upon", "--target", ""], "empty target"),
    "target-id-too-big": (["Once upon", "--target-id", "512"], "out of range"),
    "target-id-negative": (["Once upon", "--target-id", "-1"], "out of range"),
}
LAYER_REQUESTS = {"layer-too-big": "5", "layer-negative": "-1", "layer-huge": "99999999999999999999"}


def _argv(cmd, model, tmp, extra):
    base = [cmd, "--model", model] + [a.replace("{tmp}", str(tmp)) for a in SUBCOMMANDS[cmd]]
    return base + [a.replace("{tmp}", str(tmp)) for a in extra]


@pytest.fixture(scope="module")
def stories_hashes(stories_dir):
    before = hashes(stories_dir)
    yield
    assert hashes(stories_dir) == before, "a bad request modified the model directory"


@pytest.mark.parametrize("cmd", sorted(SUBCOMMANDS))
def test_bad_requests(stories_dir, stories_hashes, tmp_path, capfd, cmd):
    cases = dict(REQUESTS)
    if cmd in TARGETED:
        cases.update(TARGET_REQUESTS)
    for name, (extra, needle) in cases.items():
        argv = _argv(cmd, stories_dir, tmp_path, extra)
        if name == "unknown-model" or name == "model-not-converted":
            argv = [cmd] + [a.replace("{tmp}", str(tmp_path)) for a in extra + SUBCOMMANDS[cmd]]
        rc, _, err = cli(capfd, *argv)
        assert_one_error_line(rc, err, needle)
    if "--layer" in SUBCOMMANDS[cmd]:
        for name, layer in LAYER_REQUESTS.items():
            argv = [cmd, "--model", stories_dir, "Once upon", "--layer", layer] + \
                   (["--neuron", "0"] if cmd == "trace" else [])
            rc, _, err = cli(capfd, *argv)
            assert_one_error_line(rc, err, "layer")
    assert not (tmp_path / "dump.safetensors").exists()


@pytest.mark.parametrize("argv,needle", [
    (["trace", "Once", "--layer", "0", "--neuron", "172"], "neuron 172"),
    (["trace", "Once", "--layer", "0", "--neuron", "-1"], "neuron -1"),
    (["subkey", "Once", "--layer", "0", "--neuron", "999"], "neuron 999"),
    (["vocab", "Once", "--layer", "0", "--vector", "ffn-neuron", "--index", "172"], "neuron 172"),
    (["vocab", "Once", "--layer", "0", "--vector", "ffn-neuron"], "needs --index"),
    (["vocab", "Once", "--layer", "0", "--vector", "ffn", "--index", "3"], "--index has no effect"),
    (["subvalues", "Once", "--layer", "0", "--by", "head"], "--by has no effect"),
    (["trace", "Once", "--layer", "0", "--neuron", "1", "--by", "head"], "--by has no effect"),
    (["trace", "Once", "--layer", "0", "--neuron", "1", "--source", "ffn.0", "--by", "head"], "--by has no effect"),
    (["vocab", "Once", "--layer", "0", "--vector", "attn-head", "--index", "8"], "--index 8"),
    (["vocab", "Once", "--layer", "0", "--vector", "attn-position", "--index", "-1"], "--index -1"),
    (["vocab", "Once"], "--layer"),
    (["trace", "Once", "--layer", "0", "--neuron", "1", "--source", "bogus"], "bogus"),
    (["trace", "Once", "--layer", "0", "--neuron", "1", "--source", "attn.9"], "layer 9"),
    (["trace", "Once", "--layer", "0", "--neuron", "1", "--source", "ffn.3"], "ffn.3"),
    (["compare-tokens", "Once", "--tokens", ","], "--tokens"),
    (["compare-tokens", "Once", "--tokens", "upon a time"], "not a single token"),
    (["compare-tokens", "Once", "--tokens", "1,999", "--token-ids"], "out of range"),
    (["locate", "Once", "--top", "0"], "--top"),
    (["predict", ""], "empty prompt"),
    (["predict", "--ids", "1,x"], "--ids"),
    (["dump", "Once", "--out", "{tmp}/missing-folder/x.safetensors"], "missing-folder"),
    (["dump", "Once", "--out", "{tmp}"], "{tmp}"),
    (["compare", "{tmp}/a.safetensors", "{tmp}/b.safetensors"], "a.safetensors"),
    (["verify", "{tmp}/nothing-here"], "nothing-here"),
    (["convert", "{tmp}/nothing-here", "{tmp}/out"], "nothing-here"),
    (["convert", str(BIN), "{tmp}/out", "--tokenizer", "{tmp}/nothing-here"], "nothing-here"),
    (["convert", str(BIN), "{tmp}/out", "--format", "onnx"], "onnx"),
    (["no-such-command"], "no-such-command"),
])
def test_more_bad_requests(stories_dir, stories_hashes, tmp_path, capfd, argv, needle):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] not in ("compare", "verify", "convert", "no-such-command"):
        argv += ["--model", stories_dir]
    rc, _, err = cli(capfd, *argv)
    assert_one_error_line(rc, err, needle.replace("{tmp}", str(tmp_path)))
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_compare_tokens_token_ids_garbage(stories_dir, capfd):
    rc, _, err = cli(capfd, "compare-tokens", "Once", "--tokens", "1,x", "--token-ids", "--model", stories_dir)
    assert_one_error_line(rc, err, "x")


@pytest.mark.parametrize("argv", [["subvalues", "--layer", "0", "--top", "-1"], ["baseline", "--top", "0"],
                                  ["additivity", "--layer", "0", "--max", "-3"], ["predict", "--top", "-5"]])
def test_negative_counts(stories_dir, capfd, argv):
    rc, _, err = cli(capfd, *argv, "Once", "--model", stories_dir)
    assert_one_error_line(rc, err)


# --------------------------------------------------------------------------- verify

@pytest.fixture
def fresh_model(tmp_path, stories_dir):
    d = tmp_path / "m"
    shutil.copytree(stories_dir, d)
    return d


def _verify(capfd, d):
    rc, out, err = cli(capfd, "verify", d)
    return rc, out, err


def test_verify_clean_model(capfd, fresh_model):
    rc, out, err = _verify(capfd, fresh_model)
    assert rc == 0 and "all files match" in out and err == ""


@pytest.mark.parametrize("case", ["modified-byte", "truncated", "missing", "extra-safetensors", "extra-json",
                                  "tokenizer-edited", "nan-written"])
def test_verify_reports_tampering(capfd, fresh_model, case):
    d = fresh_model
    st = d / "model.safetensors"
    expect = "model.safetensors"
    if case == "modified-byte":
        damage(st, ("set", st.stat().st_size // 2, bytes([st.read_bytes()[st.stat().st_size // 2] ^ 1])))
    elif case == "truncated":
        damage(st, ("cut", -1))
    elif case == "missing":
        st.unlink()
    elif case == "extra-safetensors":
        shutil.copy(st, d / "model-extra.safetensors")
        expect = "model-extra.safetensors"
    elif case == "extra-json":
        (d / "model.safetensors.index.json").write_text('{"weight_map": {}}')
        expect = "model.safetensors.index.json"
    elif case == "tokenizer-edited":
        (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text() + " ")
        expect = "tokenizer.json"
    else:                                   # a NaN written over a weight, header and size unchanged
        t, _ = read_header(str(st))
        damage(st, ("set", t["blocks.2.mlp.W_out"].offset + 40, np.float32(np.nan).tobytes()))
    rc, out, err = _verify(capfd, d)
    assert_one_error_line(rc, err, "failed verification")
    assert expect in out and out.count("\n") == 1, out


@pytest.mark.parametrize("record", [None, [], {"../config.json": "0" * 64}, {"model.safetensors": 5}])
def test_verify_bad_record(capfd, fresh_model, record):
    cfg = json.loads((fresh_model / "config.json").read_text())
    if record is None:
        del cfg["files"]
    else:
        cfg["files"] = record
    (fresh_model / "config.json").write_text(json.dumps(cfg))
    rc, out, err = _verify(capfd, fresh_model)
    assert_one_error_line(rc, err)


def test_verify_broken_config(capfd, fresh_model):
    damage(fresh_model / "config.json", ("cut", 10))
    rc, _, err = _verify(capfd, fresh_model)
    assert_one_error_line(rc, err, "config.json")


def test_analysis_refuses_nan_weights(capfd, fresh_model):
    st = fresh_model / "model.safetensors"
    t, _ = read_header(str(st))
    damage(st, ("set", t["blocks.2.mlp.W_out"].offset + 40, np.float32(np.nan).tobytes()))
    rc, _, err = cli(capfd, "layers", "Once upon a time", "--model", fresh_model)
    assert_one_error_line(rc, err, "blocks.2.mlp.W_out")


def test_analysis_on_nan_weights_does_not_crash(capfd, fresh_model):
    """Every command that runs the model refuses NaN weights with one line naming the tensor."""
    st = fresh_model / "model.safetensors"
    t, _ = read_header(str(st))
    damage(st, ("set", t["blocks.2.mlp.W_out"].offset + 40, np.float32(np.nan).tobytes()))
    for argv in (["layers"], ["locate", "--counts", "no"], ["subvalues", "--layer", "2"], ["predict"]):
        rc, _, err = cli(capfd, *argv, "Once upon a time", "--model", fresh_model)
        assert_one_error_line(rc, err, "blocks.2.mlp.W_out")


# --------------------------------------------------------------------------- float16 storage never overflows

def _big_plan(cfg, scale, seed=0):
    from refimpl.synthetic import tensor_shapes
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in tensor_shapes(cfg).items():
        a = rng.standard_normal(shape)
        if name.endswith((".w", ".b")) or ".b_" in name:
            a = scale * (1 + 0.1 * a)               # norm gains ~scale: normalised activations ~scale
        else:
            a = scale * a
        out[name] = a.astype(np.float16)            # exactly representable values, stored as F16
    return out


# silu(x) = x / (1 + exp(-x)) overflows exp() for very negative x and correctly gives -0
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_float16_weights_do_not_overflow(tmp_path, family):
    from converters.canonical import Planned, write_canonical
    cfg = random_config(family, d_vocab=30, n_ctx=8, d_model=16, n_heads=2, d_ff=32, n_layers=2)
    arrays = _big_plan(cfg, scale=300.0)
    # the products the forward pass forms are far beyond float16's range (max 65504)
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.float16(300.0) * np.float16(300.0))
    models = {}
    for store, dt in (("F16", np.float16), ("F64", np.float64)):
        plan = [Planned(n, a.shape, store, lambda a=a, dt=dt: a.astype(dt)) for n, a in arrays.items()]
        d = write_canonical(str(tmp_path / store), cfg.to_dict(), plan,
                            word_tokenizer_json([f"t{i}" for i in range(30)]), sources=[], source_format="synthetic")
        models[store] = d
    ids = [1, 5, 7, 2, 9]
    ref = refimpl.run(refimpl.load(models["F64"], dtype="float64"), ids)
    for dtype in ("float64", "float32"):
        tr = refimpl.run(refimpl.load(models["F16"], dtype=dtype), ids)
        assert np.isfinite(tr.log_probs).all() and np.isfinite(tr.layers[-1].lout).all()
        assert max(np.abs(L.pre).max() for L in tr.layers) > 65504          # overflow territory for float16
        if dtype == "float64":
            np.testing.assert_array_equal(tr.log_probs, ref.log_probs)
        else:
            np.testing.assert_allclose(tr.log_probs, ref.log_probs, rtol=1e-3, atol=1e-3 * np.abs(ref.log_probs).max())
        R = tr.readout(-1)
        sv = tr.ffn_subvalues(1, -1)
        assert np.isfinite(R.bs(sv)).all()


def test_float16_model_analyses_finite(tmp_path, capfd):
    from converters.canonical import Planned, write_canonical
    cfg = random_config("gpt2", d_vocab=30, n_ctx=8, d_model=16, n_heads=2, d_ff=32, n_layers=2)
    arrays = _big_plan(cfg, scale=300.0, seed=4)
    plan = [Planned(n, a.shape, "F16", lambda a=a: a) for n, a in arrays.items()]
    d = write_canonical(str(tmp_path / "m"), cfg.to_dict(), plan, word_tokenizer_json([f"t{i}" for i in range(30)]),
                        sources=[], source_format="synthetic")
    rc, out, err = cli(capfd, "locate", "t1 t2 t3 t4", "--model", d, "--json", "--dtype", "float32")
    assert rc == 0, err
    r = json.loads(out)
    assert np.isfinite([x["log_prob_increase"] for x in r["top_subvalues"]]).all()
    assert np.isfinite([L["ffn"]["log_prob_increase"] for L in r["layers"]]).all()


# --------------------------------------------------------------------------- safetensors metadata, hand-crafted

def _st_bytes(header, data: bytes = b"", raw: bytes | None = None, n: int | None = None) -> bytes:
    blob = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if n is None else n) + blob + data


def _t(dtype="F32", shape=(2,), off=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(off)}


HOSTILE_HEADERS = {
    "short-file": b"\x01\x02",
    "length-huge": struct.pack("<Q", 1 << 63) + b"{}",
    "length-beyond-file": struct.pack("<Q", 1000) + b"{}",
    "length-zero": struct.pack("<Q", 0),
    "not-utf8": _st_bytes(None, raw=b"\xff\xfe\xfd\xfc"),
    "not-json": _st_bytes(None, raw=b"{not json}"),
    "list": _st_bytes(None, raw=b"[]"),
    "string": _st_bytes(None, raw=b'"abc"'),
    "deep-nesting": _st_bytes(None, raw=b"[" * 100000 + b"]" * 100000),
    "huge-integer": _st_bytes(None, raw=b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,0]}}'),
    "duplicate-name": _st_bytes(None, b"\0" * 8, raw=b'{"a":' + json.dumps(_t()).encode() + b',"a":'
                                + json.dumps(_t()).encode() + b"}"),
    "entry-not-object": _st_bytes({"a": [1, 2]}),
    "entry-missing-field": _st_bytes({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8),
    "unknown-dtype": _st_bytes({"a": _t(dtype="F8_E4M3")}, b"\0" * 8),
    "dtype-not-string": _st_bytes({"a": _t(dtype=["F32"])}, b"\0" * 8),
    "negative-dim": _st_bytes({"a": _t(shape=(-2,))}, b"\0" * 8),
    "bool-dim": _st_bytes({"a": _t(shape=(True, 2))}, b"\0" * 8),
    "float-dim": _st_bytes({"a": _t(shape=(2.0,))}, b"\0" * 8),
    "shape-string": _st_bytes({"a": {**_t(), "shape": "22"}}, b"\0" * 8),
    "huge-empty-shape": _st_bytes({"a": _t(shape=(2**62, 2**62, 0), off=(0, 0))}),
    "dim-beyond-int64": _st_bytes({"a": _t(shape=(2**64, 0), off=(0, 0))}),
    "shape-overflow-product": _st_bytes({"a": _t(shape=(2**32, 2**32, 2**32), off=(0, 8))}, b"\0" * 8),
    "too-many-dims": _st_bytes({"a": _t(shape=(1,) * 100, off=(0, 4))}, b"\0" * 4),
    "offsets-beyond-file": _st_bytes({"a": _t(shape=(4,), off=(0, 16))}, b"\0" * 8),
    "offsets-negative": _st_bytes({"a": _t(off=(-8, 0))}, b"\0" * 8),
    "offsets-reversed": _st_bytes({"a": _t(off=(8, 0))}, b"\0" * 8),
    "offsets-three": _st_bytes({"a": _t(off=(0, 8, 8))}, b"\0" * 8),
    "offsets-float": _st_bytes({"a": _t(off=(0.0, 8))}, b"\0" * 8),
    "shape-size-mismatch": _st_bytes({"a": _t(shape=(3,))}, b"\0" * 8),
    "overlapping": _st_bytes({"a": _t(), "b": _t(off=(4, 12))}, b"\0" * 12),
    "aliased": _st_bytes({"a": _t(), "b": _t()}, b"\0" * 8),
    "hole": _st_bytes({"a": _t(shape=(1,), off=(4, 8))}, b"\0" * 8),
    "trailing-bytes": _st_bytes({"a": _t()}, b"\0" * 12),
    "metadata-list": _st_bytes({"__metadata__": [], "a": _t()}, b"\0" * 8),
    "metadata-not-strings": _st_bytes({"__metadata__": {"k": 1}, "a": _t()}, b"\0" * 8),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_HEADERS))
def test_hostile_safetensors_headers(tmp_path, case):
    p = tmp_path / "x.safetensors"
    p.write_bytes(HOSTILE_HEADERS[case])
    with pytest.raises(FormatError) as e:
        tensors, _ = read_header(str(p))
        for t in tensors.values():
            t.numpy()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("x.safetensors:"), msg
    if case == "duplicate-name":
        return                                # the reference library lets the last entry win
    # the reference implementation refuses these files too
    st = pytest.importorskip("safetensors.numpy")
    with pytest.raises(Exception):
        st.load_file(str(p))


def test_valid_edge_cases_still_read(tmp_path):
    """Scalars, empty tensors, empty names, padding spaces and unknown entry fields are valid."""
    p = tmp_path / "ok.safetensors"
    header = {"": _t(shape=(), off=(0, 4)), "e": _t(shape=(0, 5), off=(4, 4)), "b": {**_t(off=(4, 12)), "x": 1},
              "__metadata__": {"format": "np"}}
    blob = json.dumps(header).encode() + b"   "
    p.write_bytes(struct.pack("<Q", len(blob)) + blob + np.arange(3, dtype="<f4").tobytes())
    tensors, meta = read_header(str(p))
    assert meta == {"format": "np"}
    assert float(tensors[""].numpy()) == 0.0 and tensors["e"].numpy().shape == (0, 5)
    np.testing.assert_array_equal(tensors["b"].numpy(), [1.0, 2.0])
    import safetensors.numpy as stn
    assert set(stn.load_file(str(p))) == {"", "e", "b"}


def test_header_checks_happen_before_any_allocation(tmp_path):
    """A header describing a 2**40-element tensor in a tiny file is refused from its metadata
    alone, under an address-space limit far below what that tensor would need."""
    p = tmp_path / "big.safetensors"
    p.write_bytes(_st_bytes({"a": _t(shape=(2**20, 2**20), off=(0, 4 * 2**40))}, b"\0" * 64))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (_vm_bytes() + (1 << 30), hard))
        with pytest.raises(FormatError, match="outside the file"):
            read_header(str(p))
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_verify_reports_an_edited_config(tmp_path, capfd):
    """config.json carries its own digest: a valid-but-changed config is reported."""
    import json
    from refimpl.synthetic import random_config, write_random_model
    d = tmp_path / "m"
    write_random_model(str(d), random_config("gpt2"), seed=0)
    assert refimpl.cli.main(["verify", str(d)]) == 0
    cfg = json.loads((d / "config.json").read_text())
    cfg["norm_eps"] = 1e-3
    (d / "config.json").write_text(json.dumps(cfg))
    capfd.readouterr()
    assert refimpl.cli.main(["verify", str(d)]) == 2
    out, err = capfd.readouterr()
    assert "config.json: content differs" in out and err.startswith("error:")
