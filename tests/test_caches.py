"""Derived data is bound to the exact bytes it came from (docs/safety.md, "No stale answer").

`refimpl prepare` stores a compute-dtype copy of the weights and the per-model constants
of the counts' brackets. Whatever happens to the model or to those files afterwards (an ablation of the
weights, a doctored or zeroed cache file, a file of the wrong shape), the next analysis
gives exactly what the model on disk gives without any cache, and `refimpl verify`
reports the cache files that do not match. The oracle throughout is the same model copied
to a fresh folder with no cache/ at all.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from refimpl.embedded import DATA
from refimpl.synthetic import random_config, write_random_model
from tests.test_robustness import cli


def _locate_and_err(capfd, model, *extra):
    """`locate --json --top 3` on `model`: (the report without its timings, stderr)."""
    rc, out, err = cli(capfd, "locate", "--model", model, "--json", "--top", "3", *extra)
    assert rc == 0, err
    r = json.loads(out)
    r.pop("seconds", None)
    r.pop("timing", None)
    return r, err


def _locate(capfd, model, *extra):
    return _locate_and_err(capfd, model, *extra)[0]


def _same_model_report(a: dict, b: dict) -> bool:
    """Whether two reports of copies of one model agree (the model's name and path aside)."""
    return {k: v for k, v in a.items() if k != "model"} == {k: v for k, v in b.items() if k != "model"}


def _fresh_copy(model: Path, dst: Path) -> Path:
    """The model's own files (no cache/) in a new folder: what the truth is without any cache."""
    dst.mkdir()
    for f in model.iterdir():
        if f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


def _header(path: Path) -> tuple[dict, int]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), 8 + n


def _edit_tensor(path: Path, name_filter, fn) -> list[str]:
    """Rewrite tensors whose name passes `name_filter` in place (same size, new content)."""
    head, start = _header(path)
    data = bytearray(path.read_bytes())
    dt = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}
    done = []
    for name, info in head.items():
        if name == "__metadata__" or not name_filter(name):
            continue
        a, b = info["data_offsets"]
        arr = np.frombuffer(bytes(data[start + a:start + b]), dt[info["dtype"]])
        data[start + a:start + b] = np.ascontiguousarray(fn(arr), dt[info["dtype"]]).tobytes()
        done.append(name)
    path.write_bytes(bytes(data))
    assert done, "no tensor matched"
    return done


def _cache_files(model: Path, suffix: str) -> list[Path]:
    return sorted((model / "cache").glob(f"*{suffix}"))


@pytest.fixture
def llama(tmp_path):
    d = tmp_path / "m"
    write_random_model(str(d), random_config("llama", n_kv_heads=2, d_vocab=40, n_layers=3), seed=5, dtype="F16")
    return d


def test_ablation_after_prepare_is_seen_by_the_next_locate(tmp_path, capfd, llama):
    """The issue's case: prepare, then zero every mlp.W_out in model.safetensors; float64 locate
    must report the ablated model (on main it reported the unablated one from the stale copy)."""
    before = _locate(capfd, llama, "--ids", "1,5,9,3")
    assert cli(capfd, "prepare", "--model", llama)[0] == 0
    assert _locate(capfd, llama, "--ids", "1,5,9,3")["target"] == before["target"]     # the copy is exact
    _edit_tensor(llama / "model.safetensors", lambda n: n.endswith("mlp.W_out"), np.zeros_like)
    after = _locate(capfd, llama, "--ids", "1,5,9,3")
    truth = _locate(capfd, _fresh_copy(llama, tmp_path / "oracle"), "--ids", "1,5,9,3")
    assert after["target"] == truth["target"] and after["layers"] == truth["layers"]
    assert after["prediction"] == truth["prediction"]
    assert after["layers"] != before["layers"]                          # the ablation changed the answer
    assert all(L["ffn"]["log_prob_increase"] == truth["layers"][i]["ffn"]["log_prob_increase"]
               for i, L in enumerate(after["layers"]))


def test_doctored_weight_copy_is_not_used_and_verify_reports_it(tmp_path, capfd, llama):
    """On main a doctored cache/ file changed the prediction and `verify` said all files match."""
    assert cli(capfd, "prepare", "--model", llama)[0] == 0
    parts = [p for p in _cache_files(llama, ".safetensors") if "unembed.W_U" in _header(p)[0]]
    assert len(parts) == 1
    _edit_tensor(parts[0], lambda n: n == "unembed.W_U", lambda a: -3 * a)
    got = _locate(capfd, llama, "--ids", "1,5,9,3")
    truth = _locate(capfd, _fresh_copy(llama, tmp_path / "oracle"), "--ids", "1,5,9,3")
    assert got["prediction"] == truth["prediction"] and got["layers"] == truth["layers"]
    rc, out, err = cli(capfd, "verify", llama)
    assert rc == 2 and parts[0].name in out, out


def test_doctored_weight_copy_with_its_record_rewritten_is_caught_by_verify(capfd, llama):
    """An edit that also rewrites the cache's own record passes the cheap checks, but `verify`
    compares the copy with the model value by value."""
    from refimpl import cache
    assert cli(capfd, "prepare", "--model", llama)[0] == 0
    man = llama / "cache" / "weights-float64.json"
    m = json.loads(man.read_text())
    part = next(p for p in _cache_files(llama, ".safetensors") if "unembed.W_U" in _header(p)[0])
    _edit_tensor(part, lambda n: n == "unembed.W_U", lambda a: a + 1e-3)
    for r in m["payloads"]:
        if r["name"] == part.name:
            r.update(cache.identity(str(part)), sha256=cache.sha256_file(str(part)))
    man.write_text(json.dumps(m))
    rc, out, err = cli(capfd, "verify", llama)
    assert rc == 2 and "differs from the model's weights" in out and part.name in out, out


def test_doctored_weight_copy_with_its_record_rewritten_is_not_used(tmp_path, capfd, llama):
    """The same doctoring (every value of a tensor changed, the record rewritten to match)
    passes the stat and hash checks, but the spot check of every tensor on each use sees it:
    the copy is not used (a warning) and the answer is the model's own."""
    from refimpl import cache
    assert cli(capfd, "prepare", "--model", llama)[0] == 0
    man = llama / "cache" / "weights-float64.json"
    m = json.loads(man.read_text())
    part = next(p for p in _cache_files(llama, ".safetensors") if "unembed.W_U" in _header(p)[0])
    _edit_tensor(part, lambda n: n == "unembed.W_U", lambda a: np.zeros_like(a))
    for r in m["payloads"]:
        if r["name"] == part.name:
            r.update(cache.identity(str(part)), sha256=cache.sha256_file(str(part)))
    man.write_text(json.dumps(m))
    rc, out, err = cli(capfd, "locate", "--model", llama, "--ids", "1,5,9,3", "--json")
    assert rc == 0 and "a spot check" in err and "unembed.W_U" in err, err
    got = json.loads(out)
    truth = _locate(capfd, _fresh_copy(llama, tmp_path / "oracle"), "--ids", "1,5,9,3")
    assert got["prediction"] == truth["prediction"] and got["layers"] == truth["layers"]


@pytest.fixture
def embedded_copy(tmp_path):
    """The shipped model in a writable folder, so its cache/ sits beside it."""
    d = tmp_path / "capitals"
    shutil.copytree(os.path.join(DATA, "capitals-gpt2"), d)
    return d


def _counts(capfd, model, *extra):
    """The per-layer counts with certified share brackets (the brackets that use every stored
    constant, the Gram matrix's lambda included)."""
    return _locate(capfd, model, "The capital of France is", "--counts", "yes", "--share", "bound",
                   *extra)["ffn_counts"]


def _rewrite_record(model: Path, payload: Path) -> None:
    """Make the manifest describe the payload as it is now (a doctoring that covers its tracks)."""
    from refimpl import cache
    man = payload.with_suffix(".json")
    m = json.loads(man.read_text())
    for r in m["payloads"]:
        if r["name"] == payload.name:
            r.update(cache.identity(str(payload)), sha256=cache.sha256_file(str(payload)))
    man.write_text(json.dumps(m))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_prepared_constants_give_the_same_report(tmp_path, capfd, embedded_copy, dtype):
    """The constants prepare stores are the floats each run computes: the whole report after
    prepare equals the report of a copy that never had a cache, to the last bit."""
    truth = _locate(capfd, _fresh_copy(embedded_copy, tmp_path / "oracle"), "The capital of France is",
                    "--share", "bound", "--dtype", dtype)
    assert cli(capfd, "prepare", "--model", embedded_copy, "--dtype", dtype)[0] == 0
    assert (embedded_copy / "cache" / f"constants-{dtype}.values").exists()
    got, err = _locate_and_err(capfd, embedded_copy, "The capital of France is", "--share", "bound",
                               "--dtype", dtype)
    assert err == "", err
    assert _same_model_report(got, truth) and got["ffn_counts"]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_prepared_constants_of_an_fp16_llama_pass_their_spot_check(tmp_path, capfd, llama, dtype):
    """RMSNorm (no centring), fp16 weights widened block by block: honest stored constants pass
    the spot check (no warning) and the report equals that of a copy without any cache."""
    args = ("--ids", "1,5,9,3", "--counts", "yes", "--share", "bound", "--dtype", dtype)
    truth = _locate(capfd, _fresh_copy(llama, tmp_path / "oracle"), *args)
    assert cli(capfd, "prepare", "--model", llama, "--dtype", dtype)[0] == 0
    got, err = _locate_and_err(capfd, llama, *args)
    assert err == "", err
    assert _same_model_report(got, truth) and got["ffn_counts"]


def test_edited_constants_file_is_not_used_and_verify_reports_it(tmp_path, capfd, embedded_copy):
    """Constants made 100 times smaller (brackets far too narrow) after prepare: not used (a
    warning), the counts are the model's own, and verify names the file."""
    truth = _counts(capfd, _fresh_copy(embedded_copy, tmp_path / "oracle"))
    assert cli(capfd, "prepare", "--model", embedded_copy)[0] == 0
    (vals,) = _cache_files(embedded_copy, ".values")
    v = json.loads(vals.read_text())
    v["lambda"] = {k: x / 100 for k, x in v["lambda"].items()}
    v["readout"] = {k: [x[0] / 100, x[1]] for k, x in v["readout"].items()}
    vals.write_text(json.dumps(v))
    rc, out, err = cli(capfd, "locate", "--model", embedded_copy, "The capital of France is", "--json",
                       "--top", "3", "--counts", "yes", "--share", "bound")
    assert rc == 0 and "warning:" in err and "changed after it was written" in err, err
    assert json.loads(out)["ffn_counts"] == truth
    rc, out, _ = cli(capfd, "verify", embedded_copy)
    assert rc == 2 and vals.name in out
    assert cli(capfd, "prepare", "--model", embedded_copy)[0] == 0  # prepare rebuilds the entry
    assert cli(capfd, "verify", embedded_copy)[0] == 0


@pytest.mark.parametrize("edit", ["lambda / 100", "lambda * 1e300", "B2 / 100", "B2 * 1e300", "W * 0.999",
                                  "W * 1e200"])
def test_edited_constants_with_their_record_rewritten_are_caught(tmp_path, capfd, embedded_copy, edit):
    """Constants edited with the manifest rewritten to match pass the hash checks; the check on
    each use sees them (a warning, the constants are computed: no traceback, no overflow) and
    verify recomputes them. Too small would make the brackets too narrow (wrong counts), too
    large would only widen them (different share brackets)."""
    truth = _locate(capfd, _fresh_copy(embedded_copy, tmp_path / "oracle"), "The capital of France is",
                    "--counts", "yes", "--share", "bound")
    assert cli(capfd, "prepare", "--model", embedded_copy)[0] == 0
    (vals,) = _cache_files(embedded_copy, ".values")
    v = json.loads(vals.read_text())
    what, op, x = edit.split()
    f = (lambda a: a / float(x)) if op == "/" else (lambda a: a * float(x))
    if what == "lambda":
        v["lambda"] = {k: f(a) for k, a in v["lambda"].items()}
    else:
        i = 0 if what == "B2" else 1
        v["readout"] = {k: [f(a) if j == i else a for j, a in enumerate(pair)] for k, pair in v["readout"].items()}
    vals.write_text(json.dumps(v))
    _rewrite_record(embedded_copy, vals)
    got, err = _locate_and_err(capfd, embedded_copy, "The capital of France is", "--counts", "yes", "--share", "bound")
    assert err.count("\n") == 1 and "do not match a check" in err and f"({what[0]}" in err, err
    assert len(got.pop("warnings")) == 1 and not truth.pop("warnings")
    assert _same_model_report(got, truth)
    rc, out, _ = cli(capfd, "verify", embedded_copy)
    assert rc == 2 and vals.name in out and "recomputed" in out, out


def test_constants_made_with_other_numerics_are_not_used(tmp_path, capfd, embedded_copy, monkeypatch):
    """lambda's last bits depend on the BLAS kernel: constants stored by another numpy/BLAS/CPU
    (here: blas.identity() says so) are not used (a warning) and verify only notes them."""
    from refimpl import blas
    truth = _locate(capfd, _fresh_copy(embedded_copy, tmp_path / "oracle"), "The capital of France is",
                    "--counts", "yes", "--share", "bound")
    real = blas.identity
    monkeypatch.setattr(blas, "identity", lambda: "numpy 0.0; another BLAS; another CPU")
    assert cli(capfd, "prepare", "--model", embedded_copy)[0] == 0
    monkeypatch.setattr(blas, "identity", real)
    got, err = _locate_and_err(capfd, embedded_copy, "The capital of France is", "--counts", "yes", "--share", "bound")
    assert "constants-float64: built for other settings" in err, err
    assert len(got.pop("warnings")) == 1 and not truth.pop("warnings")
    assert _same_model_report(got, truth)
    assert cli(capfd, "verify", embedded_copy)[0] == 0


@pytest.mark.parametrize("unembedding", ["zero", "nan"])
def test_prepare_on_a_degenerate_unembedding(tmp_path, capfd, unembedding):
    """An all-zero unembedding has constants (W = 0); one with a NaN is one error line."""
    from tests.test_robustness import assert_one_error_line
    d = tmp_path / "m"
    write_random_model(str(d), random_config("gpt2", d_vocab=60, n_layers=2), seed=1)
    fn = np.zeros_like if unembedding == "zero" else (lambda a: np.where(np.arange(a.size) == 3, np.nan, a))
    _edit_tensor(d / "model.safetensors", lambda n: n in ("embed.W_E", "unembed.W_U"), fn)
    rc, out, err = cli(capfd, "prepare", "--model", d, "--quiet")
    if unembedding == "nan":
        assert_one_error_line(rc, err, "non-finite", "unembed.W_U")
        return
    assert rc == 0 and err == "", err
    rc, out, err = cli(capfd, "locate", "--model", d, "--ids", "1,5,9", "--counts", "yes", "--share", "bound")
    assert rc == 0 and err == "", err


@pytest.mark.parametrize("payload", ['[1, 2]', '{"readout": {}, "lambda": {}}', '{"readout": {"vocab": [1.0, -1.0]}, '
                                     '"lambda": {"vocab|norm": 1.0, "vocab|raw": 1.0}}', 'not json', ''])
def test_malformed_constants_are_no_traceback(tmp_path, capfd, embedded_copy, payload):
    """A constants file that is not what prepare writes (its record rewritten to match): not
    used (one warning), the counts are the model's own."""
    truth = _counts(capfd, _fresh_copy(embedded_copy, tmp_path / "oracle"))
    assert cli(capfd, "prepare", "--model", embedded_copy)[0] == 0
    (vals,) = _cache_files(embedded_copy, ".values")
    vals.write_text(payload)
    _rewrite_record(embedded_copy, vals)
    rc, out, err = cli(capfd, "locate", "--model", embedded_copy, "The capital of France is", "--json",
                       "--top", "3", "--counts", "yes", "--share", "bound")
    assert rc == 0 and err.startswith("warning:") and "Traceback" not in err, err
    assert json.loads(out)["ffn_counts"] == truth


def test_ablation_after_prepare_changes_the_counts_too(tmp_path, capfd, embedded_copy):
    """The constants depend on the weights: an edit after prepare must not reuse them."""
    assert cli(capfd, "prepare", "--model", embedded_copy)[0] == 0
    _edit_tensor(embedded_copy / "model.safetensors", lambda n: n in ("unembed.W_U", "embed.W_E"), lambda a: 5 * a)
    truth = _counts(capfd, _fresh_copy(embedded_copy, tmp_path / "oracle"))
    assert _counts(capfd, embedded_copy) == truth


def test_verify_checks_the_cache(capfd, llama):
    assert cli(capfd, "prepare", "--model", llama)[0] == 0
    assert cli(capfd, "verify", llama)[0] == 0                      # a fresh cache matches
    (llama / "cache" / "planted.npz").write_bytes(b"PK\x05\x06" + bytes(18))
    rc, out, _ = cli(capfd, "verify", llama)
    assert rc == 2 and "planted.npz" in out
    (llama / "cache" / "planted.npz").unlink()
    _edit_tensor(llama / "model.safetensors", lambda n: n == "blocks.1.mlp.W_in", lambda a: a * 0.5)
    rc, out, _ = cli(capfd, "verify", llama)
    assert rc == 2 and "model.safetensors: sha256 mismatch" in out and "stale" in out, out


def test_stale_cache_warns_and_prepare_rebuilds_it(capfd, llama):
    assert cli(capfd, "prepare", "--model", llama)[0] == 0
    os.utime(llama / "model.safetensors", ns=(1, 1))                  # even a bare timestamp change
    rc, out, err = cli(capfd, "locate", "--model", llama, "--ids", "1,5,9")
    lines = err.splitlines()
    assert rc == 0 and lines and all(x.startswith("warning:") and "stale" in x for x in lines), err
    assert any("weights-float64" in x for x in lines)
    assert cli(capfd, "prepare", "--model", llama)[0] == 0
    rc, out, err = cli(capfd, "locate", "--model", llama, "--ids", "1,5,9")
    assert rc == 0 and err == "", err


def test_prepare_never_writes_or_removes_through_a_linked_cache_folder(tmp_path, capfd, embedded_copy):
    """cache/ a symbolic link to a folder of the user's: prepare refuses (one error line) and
    neither replaces nor adds a file there."""
    from tests.test_robustness import assert_one_error_line
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "ranges-frozen-float64.npz").write_text("mine")
    (theirs / "notes.txt").write_text("mine too")
    shutil.rmtree(embedded_copy / "cache", ignore_errors=True)
    os.symlink(theirs, embedded_copy / "cache")
    rc, out, err = cli(capfd, "prepare", "--model", embedded_copy, "--quiet")
    assert_one_error_line(rc, err, "symbolic link")
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt", "ranges-frozen-float64.npz"]
    assert (theirs / "ranges-frozen-float64.npz").read_text() == "mine"
    assert (theirs / "notes.txt").read_text() == "mine too"


@pytest.mark.parametrize("edit", ["norm_eps", "act", "tokenizer-swap"])
def test_an_edited_config_or_tokenizer_is_said_on_every_load(tmp_path, capfd, embedded_copy, edit):
    """config.json is checked against the config_sha256 recorded in it and tokenizer.json against
    its recorded sha256 on every load: the run goes on (an edit may be an experiment) but says so."""
    if edit == "tokenizer-swap":
        p = embedded_copy / "tokenizer.json"
        t = json.loads(p.read_text())
        v = t["model"]["vocab"]
        v["Paris"], v["London"] = v["London"], v["Paris"]
        p.write_text(json.dumps(t))
        needle = "tokenizer.json: not the tokenizer recorded at conversion"
    else:
        p = embedded_copy / "config.json"
        c = json.loads(p.read_text())
        c[edit] = 0.5 if edit == "norm_eps" else "relu"
        p.write_text(json.dumps(c))
        needle = "config.json: edited since conversion"
    rc, out, err = cli(capfd, "locate", "The capital of France is", "--model", embedded_copy)
    assert rc == 0 and err.count("warning: ") == 1 and needle in err, err
    rc, out, err = cli(capfd, "locate", "The capital of France is", "--model", embedded_copy, "--json")
    assert rc == 0 and any(needle in w for w in json.loads(out)["warnings"]), out
