"""Inputs are bounded before they are read or allocated (docs/safety.md).

Only regular files are read: a FIFO named config.json no longer hangs, /dev/zero is no longer
read until memory runs out. Each kind of file has a size cap, checked before reading. Nothing
is allocated in proportion to a number a file claims: the sinusoidal position table is
computed for the prompt's positions only, token ids are range-checked before conversion to
int64, and the fairseq configuration is converted in time linear in the pickle (shared
references memoised, depth and size capped).

Cases that hung or exhausted memory before this change run in a subprocess with a time and
an address-space limit, so that they fail instead of hanging the test run.
"""
from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from refimpl.synthetic import random_config, write_random_model
from tests.conftest import FIXTURES, ROOT
from tests.test_robustness import assert_one_error_line, cli, hashes, hf_gpt2_dir

LIMIT_BYTES = 3 << 30


def _limits():
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_BYTES, LIMIT_BYTES))


def run_cli(*argv, timeout=60):
    """`refimpl ARGV` in a fresh process under a time and memory limit: (exit code, stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT))}
    try:
        p = subprocess.run([sys.executable, "-m", "refimpl.cli", *map(str, argv)], capture_output=True,
                           text=True, timeout=timeout, env=env, preexec_fn=_limits, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"refimpl {' '.join(map(str, argv))}: still running after {timeout} s") from None
    return p.returncode, p.stdout, p.stderr


def expect_refused(argv, *needles, timeout=60):
    rc, out, err = run_cli(*argv, timeout=timeout)
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, (rc, err[-2000:])
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.fixture
def model(tmp_path):
    d = tmp_path / "m"
    write_random_model(str(d), random_config("gpt2", d_vocab=20, n_ctx=16, n_layers=1), seed=2)
    return d


# --------------------------------------------------------------------------- only regular files


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "model.safetensors"])
def test_fifo_in_a_model_folder_does_not_hang(model, name):
    (model / name).unlink()
    os.mkfifo(model / name)
    expect_refused(["layers", "--model", model, "--ids", "1,2,3"], name, "FIFO")


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_dev_zero_in_a_model_folder_is_not_read(model, name):
    (model / name).unlink()
    (model / name).symlink_to("/dev/zero")
    expect_refused(["layers", "--model", model, "--ids", "1,2,3"], name, "character device")


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_fifo_in_a_source_folder_does_not_hang(tmp_path, name):
    src = hf_gpt2_dir(tmp_path / "src")
    (src / name).unlink()
    os.mkfifo(src / name)
    expect_refused(["convert", src, tmp_path / "out"], name)
    assert not (tmp_path / "out").exists()


def test_fifo_as_the_checkpoint_or_tokenizer_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "model.bin")
    expect_refused(["convert", tmp_path / "model.bin", tmp_path / "out"], "model.bin")
    os.mkfifo(tmp_path / "tok.bin")
    expect_refused(["convert", FIXTURES / "stories260K" / "stories260K.bin", tmp_path / "out2",
                    "--tokenizer", tmp_path / "tok.bin"], "tok.bin")


def test_files_larger_than_their_cap_are_refused_unread(model):
    """A sparse 100 GB config.json / tokenizer.json is refused by its size, without reading it."""
    for name in ("config.json", "tokenizer.json"):
        d = model.parent / f"m-{name}"
        shutil.copytree(model, d)
        with open(d / name, "r+b") as f:
            f.truncate(100 << 30)
        expect_refused(["layers", "--model", d, "--ids", "1,2"], name, "too large", timeout=30)


# --------------------------------------------------------------------------- nothing sized by a claim


def test_sinusoidal_padding_idx_beyond_the_vocabulary_is_refused(tmp_path):
    """On main, padding_idx 1000000 built a table of a million rows for a 4-token prompt."""
    d = tmp_path / "f"
    write_random_model(str(d), random_config("fairseq_lm", d_vocab=40, d_model=16, n_layers=1), seed=1)
    cfg = json.loads((d / "config.json").read_text())
    cfg["padding_idx"] = 10**6
    (d / "config.json").write_text(json.dumps(cfg))
    expect_refused(["layers", "--model", d, "--ids", "2,5,6,7"], "padding_idx")


@pytest.mark.parametrize("d_model", [2, 3])
def test_sinusoidal_positions_of_width_below_4_are_refused(tmp_path, d_model):
    """On main, d_model 2 or 3 divided by zero (a traceback)."""
    d = tmp_path / "f"
    write_random_model(str(d), random_config("gpt2", d_vocab=20, n_ctx=8, n_layers=1), seed=1)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(positions="sinusoidal", padding_idx=1, d_model=d_model)
    (d / "config.json").write_text(json.dumps(cfg))
    rc, out, err = cli_in_process(["layers", "--model", d, "--ids", "2,5,6"])
    assert rc == 2 and err.startswith("error:") and "d_model" in err, err


def cli_in_process(argv):
    from refimpl.cli import main
    import io
    import contextlib
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def test_sinusoidal_rows_are_fairseqs_formula():
    """The rows computed for the prompt's positions only are fairseq's table rows (formula written out)."""
    from refimpl import nn
    for dim, pad in ((16, 1), (9, None), (4, 0)):
        pos = np.array([0, 2, 3, 7, 1000003]) if pad is None else np.array([pad, pad + 1, pad + 5, 2**40])
        half = dim // 2
        want = np.zeros((len(pos), dim))
        for r, p in enumerate(pos):
            for i in range(half):
                f = math.exp(i * -(math.log(10000) / (half - 1)))
                want[r, i], want[r, half + i] = math.sin(p * f), math.cos(p * f)
            if pad is not None and p == pad:
                want[r] = 0
        got = nn.sinusoidal_rows(pos, dim, pad)
        assert got.shape == (len(pos), dim)
        assert np.abs(got - want).max() <= 1e-9 * max(1.0, float(pos.max()) * 1e-4)


@pytest.mark.parametrize("ids", ["1,99999999999999999999", "-99999999999999999999,1", "1," + "9" * 30])
def test_huge_token_ids_are_one_error_line(capfd, model, ids):
    """On main `locate --ids 1,99999999999999999999` was a traceback (OverflowError)."""
    for cmd in ("locate", "layers", "predict"):
        rc, _, err = cli(capfd, cmd, "--model", model, f"--ids={ids}")
        assert_one_error_line(rc, err, "out of range")


# --------------------------------------------------------------------------- fairseq config conversion


def _fairseq_with_cfg(tmp_path, edit) -> Path:
    """The tiny fairseq fixture re-saved with its cfg turned into a plain dict and edited."""
    torch = pytest.importorskip("torch")
    from omegaconf import OmegaConf
    ck = torch.load(FIXTURES / "fairseq_tiny" / "new" / "model.pt", weights_only=False)
    ck["cfg"] = OmegaConf.to_container(ck["cfg"])
    edit(ck)
    d = tmp_path / "fs"
    d.mkdir()
    torch.save(ck, d / "model.pt")
    shutil.copy(FIXTURES / "fairseq_tiny" / "new" / "dict.txt", d / "dict.txt")
    return d


def _shared(depth):
    x = [1]
    for _ in range(depth):
        x = [x, x]                      # 2^depth leaves, depth + 1 distinct objects
    return x


def test_shared_references_in_the_fairseq_config_convert_in_linear_time(tmp_path, capfd):
    """On main a config holding x = [x, x] forty levels deep made convert run for ever."""
    src = _fairseq_with_cfg(tmp_path, lambda ck: ck["cfg"]["model"].update(notes=_shared(40)))
    assert os.path.getsize(src / "model.pt") < 1 << 20
    rc, out, err = run_cli("convert", src, tmp_path / "out", timeout=60)
    assert rc == 0, err
    ref = tmp_path / "ref"
    assert cli(capfd, "convert", FIXTURES / "fairseq_tiny" / "new", ref)[0] == 0
    assert hashes(tmp_path / "out" / "model.safetensors").popitem()[1] == \
        hashes(ref / "model.safetensors").popitem()[1]


def test_shared_references_where_a_value_belongs_are_refused_quickly(tmp_path):
    """A shared structure as an option's value must not be printed in full in the error."""
    src = _fairseq_with_cfg(tmp_path, lambda ck: ck["cfg"]["model"].update(decoder_embed_dim=_shared(40)))
    err = expect_refused(["convert", src, tmp_path / "out"], "decoder_embed_dim", timeout=60)
    assert len(err) < 500


def test_a_very_deep_fairseq_config_is_refused(tmp_path):
    def deep(ck):
        x = 1
        for _ in range(260):
            x = [x]
        ck["cfg"]["model"]["notes"] = x
    src = _fairseq_with_cfg(tmp_path, deep)
    expect_refused(["convert", src, tmp_path / "out"], "model.pt", timeout=60)


@pytest.mark.parametrize("kind,name", [("meta", "params.json"), ("meta", "tokenizer.model"),
                                       ("hf", "tokenizer.model"), ("fairseq", "dict.txt")])
def test_fifo_among_any_source_files_does_not_hang(tmp_path, kind, name):
    from tests.test_robustness import hf_llama_dir, meta_dir
    if kind == "meta":
        src = meta_dir(tmp_path / "src")
    elif kind == "hf":
        src = hf_llama_dir(tmp_path / "src")
    else:
        src = tmp_path / "src"
        shutil.copytree(FIXTURES / "fairseq_tiny" / "new", src)
    (src / name).unlink()
    os.mkfifo(src / name)
    fmt = ["--format", "meta-llama"] if kind == "meta" else []     # a FIFO params.json is no Meta folder to detection
    expect_refused(["convert", src, tmp_path / "out", *fmt], name)
    assert not (tmp_path / "out").exists()
