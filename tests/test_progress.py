"""Progress of convert and prepare on stderr, and prepare's resumption (docs/safety.md).

On a terminal each stage is a tqdm bar with an ETA; otherwise one line per stage; `--quiet`
silences it; quick commands (under `progress.DELAY` seconds) print nothing. `prepare` says
how much disk space it needs before writing (and refuses when it is not there), checkpoints
each layer, and an interrupted run (Ctrl-C) resumes where it stopped with results identical
to an uninterrupted run.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from refimpl import progress
from refimpl.synthetic import random_config, write_random_model
from tests.conftest import ROOT
from tests.test_robustness import assert_one_error_line, cli, llama2c_files


@pytest.fixture
def no_delay(monkeypatch):
    monkeypatch.setattr(progress, "DELAY", 0.0)


def _stderr_lines(err, prefix):
    lines = err.splitlines()
    assert lines and all(x.startswith(prefix) for x in lines), err
    return lines


def test_convert_reports_one_line_per_stage(tmp_path, capfd, no_delay):
    model, tok = llama2c_files(tmp_path)
    rc, out, err = cli(capfd, "convert", model, tmp_path / "m", "--tokenizer", tok)
    assert rc == 0 and out.startswith("wrote ")
    lines = _stderr_lines(err, "convert: ")
    assert lines[0].startswith("convert: reading model.bin (llama2c)")
    assert any(x.startswith("convert: writing 47 tensors") for x in lines)        # 5 layers x 9 + 2
    assert any(x.startswith("convert: hashing 2 source and 2 output files") for x in lines)
    assert lines[-1].startswith("convert: done (") and lines[-1].endswith(" s)")
    rc, out, err = cli(capfd, "convert", model, tmp_path / "m2", "--tokenizer", tok, "--quiet")
    assert rc == 0 and err == ""


def test_quick_work_prints_no_progress(tmp_path, capfd):
    model, tok = llama2c_files(tmp_path)
    rc, out, err = cli(capfd, "convert", model, tmp_path / "m", "--tokenizer", tok)
    assert rc == 0 and err == ""                       # well under progress.DELAY


def test_a_stage_still_running_after_the_delay_is_announced():
    buf = io.StringIO()
    p = progress.Progress("prepare", stream=buf, bar=False, delay=0.2)
    p.stage("first")
    p.stage("second")
    assert buf.getvalue() == ""                        # nothing within the delay
    time.sleep(0.5)
    assert buf.getvalue() == "prepare: second\n"       # the stage running when the delay ran out
    p.stage("third")                                   # later stages at once
    p.done()
    lines = buf.getvalue().splitlines()
    assert lines[1] == "prepare: third" and lines[2].startswith("prepare: done (")


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_bar_with_an_eta():
    term = _Terminal()
    p = progress.Progress("convert", stream=term, delay=0.0)
    assert p.bar
    p.stage("writing 3 tensors", total=3 << 20, unit="B")
    for _ in range(3):
        time.sleep(0.05)
        p.update(1 << 20)
    p.done()
    text = term.getvalue()
    assert "convert: writing 3 tensors" in text and "%|" in text
    assert re.search(r"\d\d:\d\d<\d\d:\d\d, [\d.]+[kMG]?B/s", text), text    # elapsed<remaining (the ETA), rate
    quiet = _Terminal()
    q = progress.Progress("convert", stream=quiet, quiet=True)
    q.stage("x", total=10)
    q.update(10)
    q.done()
    assert quiet.getvalue() == ""


# --------------------------------------------------------------------------- prepare


@pytest.fixture
def model(tmp_path):
    d = tmp_path / "m"
    write_random_model(str(d), random_config("llama", n_layers=4, d_vocab=40, d_ff=48), seed=3, dtype="F16")
    return d


def test_prepare_states_the_disk_space_before_writing(capfd, model, no_delay):
    rc, out, err = cli(capfd, "prepare", "--model", model)
    assert rc == 0
    lines = _stderr_lines(err, "prepare: ")
    space = [k for k, x in enumerate(lines) if x.startswith("prepare: will write ")]
    writing = [k for k, x in enumerate(lines) if x.startswith("prepare: writing the weights")]
    assert space and writing and space[0] < writing[0], lines
    need = sum(int(np.prod(s)) for s in _shapes(model).values()) * 8
    assert f"will write {need / 1e9:.2f} GB to {model / 'cache'}" in lines[space[0]]


def _shapes(model):
    from refimpl.safetensors_io import read_header
    return {n: t.shape for n, t in read_header(str(model / "model.safetensors"))[0].items()}


def test_prepare_refuses_when_the_disk_is_too_small(capfd, model, monkeypatch):
    from refimpl import cache
    monkeypatch.setattr(cache, "free_bytes", lambda folder: 1000)
    rc, out, err = cli(capfd, "prepare", "--model", model)
    assert_one_error_line(rc, err, "needs", "free", "nothing was written")
    assert not (model / "cache").exists() or os.listdir(model / "cache") == []


def _cache_bytes(model):
    return {f: (model / "cache" / f).read_bytes() for f in sorted(os.listdir(model / "cache"))
            if f.endswith((".safetensors", ".values"))}


def test_interrupted_prepare_resumes(tmp_path, capfd, model, monkeypatch, no_delay):
    """Ctrl-C in the weight copy (twice, at different parts), then in the constants: each rerun
    continues, and the result is byte for byte what one uninterrupted prepare writes."""
    from refimpl import bounds, cache
    reference = tmp_path / "ref"
    shutil.copytree(model, reference)
    assert cli(capfd, "prepare", "--model", reference)[0] == 0
    want = _cache_bytes(reference)
    assert any(f.endswith(".values") for f in want) and any(f.endswith(".safetensors") for f in want)

    real_write = cache._atomic_write

    def stop_at(part):
        def write(folder, name, fn):
            if name.endswith(part):
                raise KeyboardInterrupt
            return real_write(folder, name, fn)
        return write
    monkeypatch.setattr(cache, "_atomic_write", stop_at("-L0001.safetensors"))
    rc, out, err = cli(capfd, "prepare", "--model", model)
    assert rc == 130 and err.splitlines()[-1].startswith("error: interrupted") and "resume" in err
    monkeypatch.setattr(cache, "_atomic_write", stop_at("-L0003.safetensors"))
    rc, out, err = cli(capfd, "prepare", "--model", model)
    assert rc == 130 and "resuming: 1 of 5 parts of the weight copy are already written" in err
    monkeypatch.setattr(cache, "_atomic_write", real_write)

    real_constants = bounds.prepare_constants

    def stop(model):
        raise KeyboardInterrupt
    monkeypatch.setattr(bounds, "prepare_constants", stop)
    rc, out, err = cli(capfd, "prepare", "--model", model)
    assert rc == 130 and "resuming: 3 of 5 parts of the weight copy are already written" in err
    assert not (model / "cache" / "constants-float64.json").exists()
    monkeypatch.setattr(bounds, "prepare_constants", real_constants)

    rc, out, err = cli(capfd, "prepare", "--model", model)
    assert rc == 0 and "bracket constants" in out
    assert _cache_bytes(model) == want
    assert cli(capfd, "verify", model)[0] == 0


def test_ctrl_c_in_a_real_process(tmp_path, capfd, model, no_delay):
    """SIGINT to a running `refimpl prepare` (slowed down per part of the weight copy): exit 130,
    and the next run resumes."""
    script = ("import sys, time\nfrom refimpl import cache\nreal = cache._atomic_write\n"
              "def slow(folder, name, write):\n    time.sleep(0.4)\n    return real(folder, name, write)\n"
              "cache._atomic_write = slow\nfrom refimpl import progress\nprogress.DELAY = 0\n"
              "from refimpl.cli import main\n"
              f"sys.exit(main(['prepare', '--model', {str(model)!r}]))\n")
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT))}
    p = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, env=env,
                         preexec_fn=_sigint_default)
    t0 = time.time()
    manifest = model / "cache" / "weights-float64.json"
    while not manifest.exists():
        assert p.poll() is None and time.time() - t0 < 60, p.stderr.read()
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    assert p.wait(60) == 130
    err = p.stderr.read()
    assert err.splitlines()[-1].startswith("error: interrupted") and "resume" in err
    rc, out, err = cli(capfd, "prepare", "--model", model)
    assert rc == 0 and "resuming" in err
    assert cli(capfd, "verify", model)[0] == 0


def _sigint_default():
    """In the child before exec: SIGINT as in a terminal. A shell starts background jobs with
    SIGINT ignored, which the child would inherit (Python then never raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
