"""Writers never destroy what they did not create (docs/safety.md, "Nothing is lost").

`refimpl convert`: DST that is, contains or lies inside a source is refused (symbolic links
resolved); --force replaces only a refimpl model holding nothing else; anything that
appears at DST during a conversion is refused and left alone; one conversion per DST (a
lock); SIGINT/SIGTERM/SIGHUP remove the temporary folder and a killed run's leftovers are
removed by the next run; permissions follow the umask; messages name DST, not internals.
`locate --plots` and `dump --out`: new files only (or --force), atomic, never through a
symbolic link.
"""
from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from refimpl.synthetic import random_config, write_random_model
from tests.conftest import ROOT
from tests.test_robustness import assert_one_error_line, cli, hashes, hf_gpt2_dir, leftovers, llama2c_files


def tree(p) -> dict:
    """Every entry under p (files with their sha256, folders, links with their targets)."""
    p = Path(p)
    out = {}
    for x in sorted(p.rglob("*")):
        if x.is_symlink():
            out[str(x)] = "-> " + os.readlink(x)
        elif x.is_dir():
            out[str(x)] = "dir"
        else:
            out[str(x)] = hashes(x)[str(x)]
    return out


# --------------------------------------------------------------------------- DST against SRC


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_dst_equal_to_a_source_file_is_refused(tmp_path, capfd, force):
    model, tok = llama2c_files(tmp_path)
    before = tree(tmp_path)
    rc, _, err = cli(capfd, "convert", model, model, "--tokenizer", tok, *force)
    assert_one_error_line(rc, err, str(model))
    assert tree(tmp_path) == before


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_dst_equal_to_the_source_folder_is_refused(tmp_path, capfd, force):
    src = hf_gpt2_dir(tmp_path / "src")
    before = tree(tmp_path)
    rc, _, err = cli(capfd, "convert", src, src, *force)
    assert_one_error_line(rc, err, "source")
    assert tree(tmp_path) == before


def test_dst_ancestor_of_the_source_is_refused_with_force(tmp_path, capfd):
    """On main, `convert SRC PARENT --force` deleted SRC and every other file under PARENT."""
    parent = tmp_path / "work"
    src = hf_gpt2_dir(parent / "models" / "src")
    (parent / "notes.txt").write_text("other work")
    before = tree(tmp_path)
    rc, _, err = cli(capfd, "convert", src, parent, "--force")
    assert_one_error_line(rc, err, "contains the source")
    assert tree(tmp_path) == before


def test_dst_inside_the_source_folder_is_refused(tmp_path, capfd):
    src = hf_gpt2_dir(tmp_path / "src")
    before = tree(tmp_path)
    rc, _, err = cli(capfd, "convert", src, src / "converted")
    assert_one_error_line(rc, err, "inside the source")
    assert tree(tmp_path) == before


def test_dst_reaching_the_source_through_a_symlink_is_refused(tmp_path, capfd):
    src = hf_gpt2_dir(tmp_path / "src")
    (tmp_path / "link").symlink_to(tmp_path)                       # link/src is src
    before = tree(tmp_path)
    rc, _, err = cli(capfd, "convert", src, tmp_path / "link" / "src", "--force")
    assert_one_error_line(rc, err, "is the source")
    rc, _, err = cli(capfd, "convert", src, tmp_path / "link", "--force")
    assert_one_error_line(rc, err, "contains the source")
    assert tree(tmp_path) == before


def test_tokenizer_file_inside_dst_is_refused(tmp_path, capfd):
    model, tok = llama2c_files(tmp_path)
    before = tree(tmp_path)
    rc, _, err = cli(capfd, "convert", model, tmp_path / "l2c", "--tokenizer", tok, "--force")
    assert_one_error_line(rc, err, "contains the source")
    assert tree(tmp_path) == before


# --------------------------------------------------------------------------- what --force may replace


def test_force_replaces_only_a_refimpl_model(tmp_path, capfd):
    model, tok = llama2c_files(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    before = tree(out)
    rc, _, err = cli(capfd, "convert", model, out, "--tokenizer", tok, "--force")
    assert_one_error_line(rc, err, "not a refimpl model folder")
    assert tree(out) == before
    # a refimpl model holding something refimpl did not write is not replaced either
    dst = tmp_path / "m"
    assert cli(capfd, "convert", model, dst, "--tokenizer", tok)[0] == 0
    (dst / "my-notes.txt").write_text("keep me")
    before = tree(dst)
    rc, _, err = cli(capfd, "convert", model, dst, "--tokenizer", tok, "--force")
    assert_one_error_line(rc, err, "my-notes.txt")
    assert tree(dst) == before
    # a plain refimpl model (with its cache/) is replaced, atomically and completely
    (dst / "my-notes.txt").unlink()
    assert cli(capfd, "prepare", "--model", dst, "--dtype", "float32")[0] == 0
    assert (dst / "cache").is_dir()
    assert cli(capfd, "convert", model, dst, "--tokenizer", tok, "--force")[0] == 0
    assert sorted(os.listdir(dst)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert leftovers(tmp_path) == [] and cli(capfd, "verify", dst)[0] == 0


def test_symlink_dst_is_refused(tmp_path, capfd):
    model, tok = llama2c_files(tmp_path)
    victim = tmp_path / "victim"
    victim.mkdir()
    (tmp_path / "dst").symlink_to(victim)
    rc, _, err = cli(capfd, "convert", model, tmp_path / "dst", "--tokenizer", tok)
    assert_one_error_line(rc, err, "symbolic link")
    assert os.listdir(victim) == []


# --------------------------------------------------------------------------- the final move


def _writer_module():
    """The canonical writer (refimpl.writer; converters.canonical before it moved)."""
    try:
        from refimpl import writer
    except ImportError:                 # the code before this change, so these tests can run against it
        from converters import canonical as writer
    return writer


def _slow_write(monkeypatch, at: int, action):
    """Run `action()` when the writer reaches tensor number `at` (as a slow disk would let a user)."""
    writer = _writer_module()
    real, n = writer._checked, {"k": 0}

    def hooked(p):
        n["k"] += 1
        if n["k"] == at:
            action()
        return real(p)
    monkeypatch.setattr(writer, "_checked", hooked)


@pytest.mark.parametrize("what", ["file", "folder-with-file", "empty-folder", "symlink"])
def test_something_appearing_at_dst_meanwhile_is_left_alone(tmp_path, capfd, monkeypatch, what):
    """On main the final step renamed away and deleted whatever had appeared at DST."""
    model, tok = llama2c_files(tmp_path)
    dst = tmp_path / "out"

    def appear():
        if what == "file":
            dst.write_text("mine")
        elif what == "folder-with-file":
            dst.mkdir()
            (dst / "data.csv").write_text("1,2,3")
        elif what == "empty-folder":
            dst.mkdir()
        else:
            (tmp_path / "target").write_text("linked")
            dst.symlink_to(tmp_path / "target")
    _slow_write(monkeypatch, 5, appear)
    rc, _, err = cli(capfd, "convert", model, dst, "--tokenizer", tok)
    snap = tree(tmp_path)
    if what == "empty-folder":             # an empty folder is a valid DST: it is filled, nothing is lost
        assert rc == 0 and (dst / "config.json").exists()
    else:
        assert_one_error_line(rc, err, "created there during the conversion")
        assert leftovers(tmp_path) == []
        if what == "file":
            assert dst.read_text() == "mine"
        elif what == "folder-with-file":
            assert os.listdir(dst) == ["data.csv"] and (dst / "data.csv").read_text() == "1,2,3"
        else:
            assert dst.is_symlink() and (tmp_path / "target").read_text() == "linked"
        assert snap == tree(tmp_path)


def test_a_file_put_into_a_replaced_model_meanwhile_is_not_deleted(tmp_path, capfd, monkeypatch):
    model, tok = llama2c_files(tmp_path)
    dst = tmp_path / "m"
    assert cli(capfd, "convert", model, dst, "--tokenizer", tok)[0] == 0
    _slow_write(monkeypatch, 5, lambda: (dst / "results.json").write_text("{}"))
    rc, _, err = cli(capfd, "convert", model, dst, "--tokenizer", tok, "--force")
    assert_one_error_line(rc, err, "results.json")
    assert (dst / "results.json").read_text() == "{}" and (dst / "config.json").exists()
    assert leftovers(tmp_path) == []


def test_two_conversions_into_one_dst(tmp_path, capfd, monkeypatch):
    """On main both reported success and one silently replaced the other."""
    from refimpl.writer import DestinationLock
    model, tok = llama2c_files(tmp_path)
    dst = tmp_path / "out"
    with DestinationLock(str(dst)):                    # another conversion holds DST
        rc, _, err = cli(capfd, "convert", model, dst, "--tokenizer", tok)
        assert_one_error_line(rc, err, "another conversion")
    assert not dst.exists() and os.listdir(tmp_path) == ["l2c"]
    assert cli(capfd, "convert", model, dst, "--tokenizer", tok)[0] == 0


def test_two_conversion_processes(tmp_path):
    """Two real processes into one DST: exactly one wins, the other says why; one model results."""
    model, tok = llama2c_files(tmp_path)
    dst = tmp_path / "out"
    script = ("import sys, time\ntry:\n    from refimpl import writer\nexcept ImportError:\n"
              "    from converters import canonical as writer\nreal = writer._checked\n"
              "def slow(p):\n    time.sleep(0.05)\n    return real(p)\nwriter._checked = slow\n"
              "from refimpl.cli import main\n"
              f"sys.exit(main(['convert', {str(model)!r}, {str(dst)!r}, '--tokenizer', {str(tok)!r}]))\n")
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT))}
    procs = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [(p.wait(120), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "another conversion" in loser or "output directory is not empty" in loser or \
        "created there during the conversion" in loser, loser
    assert sorted(os.listdir(dst)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(os.listdir(tmp_path)) == ["l2c", "out"]


# --------------------------------------------------------------------------- signals and killed runs


def _convert_process(tmp_path, model, tok, dst, delay=0.2):
    script = ("import sys, time\ntry:\n    from refimpl import writer\nexcept ImportError:\n"
              "    from converters import canonical as writer\nreal = writer._checked\n"
              f"def slow(p):\n    time.sleep({delay})\n    return real(p)\nwriter._checked = slow\n"
              "from refimpl.cli import main\n"
              f"sys.exit(main(['convert', {str(model)!r}, {str(dst)!r}, '--tokenizer', {str(tok)!r}]))\n")
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT))}
    return subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=_sigint_default)


def _wait_for_tmp(folder, proc, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        found = [n for n in os.listdir(folder) if ".tmp-" in n]
        if found and any(Path(folder, found[0]).glob("*.safetensors")):
            return found[0]
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    raise AssertionError("the conversion never started writing")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_during_convert_removes_the_temporary_folder(tmp_path, sig):
    """On main SIGTERM left a hidden `.out.tmp-*` folder for ever."""
    model, tok = llama2c_files(tmp_path)
    out = tmp_path / "outputs"
    out.mkdir()
    p = _convert_process(tmp_path, model, tok, out / "m")
    _wait_for_tmp(out, p)
    p.send_signal(sig)
    rc = p.wait(60)
    err = p.stderr.read()
    assert rc == 128 + sig, (rc, err)
    assert err.startswith("error: interrupted") and err.count("\n") == 1, err
    assert os.listdir(out) == [], os.listdir(out)


def test_a_killed_conversion_is_cleaned_up_by_the_next(tmp_path, capfd):
    model, tok = llama2c_files(tmp_path)
    out = tmp_path / "outputs"
    out.mkdir()
    p = _convert_process(tmp_path, model, tok, out / "m")
    stale = _wait_for_tmp(out, p)
    p.send_signal(signal.SIGKILL)
    p.wait(60)
    assert stale in os.listdir(out)                        # kill -9 cannot clean up
    # a hidden folder that merely looks similar but holds the user's files is never touched
    mine = out / ".m.tmp-mine"
    mine.mkdir()
    (mine / "draft.txt").write_text("mine")
    assert cli(capfd, "convert", model, out / "m", "--tokenizer", tok)[0] == 0
    assert sorted(os.listdir(out)) == [".m.tmp-mine", "m"]
    assert (mine / "draft.txt").read_text() == "mine"
    assert cli(capfd, "verify", out / "m")[0] == 0


# --------------------------------------------------------------------------- permissions and messages


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_converted_model_honours_the_umask(tmp_path, capfd, mask):
    """On main folders were 0700 and files 0600 whatever the umask."""
    model, tok = llama2c_files(tmp_path)
    old = os.umask(mask)
    try:
        assert cli(capfd, "convert", model, tmp_path / "m", "--tokenizer", tok)[0] == 0
        assert cli(capfd, "prepare", "--model", tmp_path / "m", "--dtype", "float64")[0] == 0
    finally:
        os.umask(old)
    d = tmp_path / "m"
    assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((d / "cache").stat().st_mode) == 0o777 & ~mask
    for f in list(d.iterdir()) + list((d / "cache").iterdir()):
        if f.is_file():
            assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f


def test_unwritable_parent_names_dst(tmp_path, capfd, monkeypatch):
    """On main the message named the internal temporary path."""
    model, tok = llama2c_files(tmp_path)
    real_mkdir = os.mkdir

    def denied(path, *a, **k):
        if ".tmp-" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *a, **k)
    monkeypatch.setattr(os, "mkdir", denied)
    rc, _, err = cli(capfd, "convert", model, tmp_path / "out", "--tokenizer", tok)
    assert_one_error_line(rc, err, str(tmp_path / "out"), "Permission denied")
    assert ".tmp-" not in err


def test_disk_full_names_the_file(tmp_path, capfd, monkeypatch):
    """On main the message was a bare 'No space left on device'."""
    writer = _writer_module()
    model, tok = llama2c_files(tmp_path)
    real = writer.write_safetensors

    def full(path, *a, **k):
        real(path, *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(writer, "write_safetensors", full)
    rc, _, err = cli(capfd, "convert", model, tmp_path / "out", "--tokenizer", tok)
    assert_one_error_line(rc, err, str(tmp_path / "out"), "model.safetensors", "No space left on device")
    assert os.listdir(tmp_path) == ["l2c"]


# --------------------------------------------------------------------------- --plots and dump


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("wm") / "m"
    write_random_model(str(d), random_config("gpt2", d_vocab=20, n_ctx=16, n_layers=1), seed=4)
    return d


def test_dump_refuses_to_overwrite_and_never_writes_through_a_symlink(tmp_path, capfd, small_model):
    out = tmp_path / "d.safetensors"
    out.write_text("older results")
    rc, _, err = cli(capfd, "dump", "--model", small_model, "--ids", "1,2,3", "--out", out)
    assert_one_error_line(rc, err, "already exists")
    assert out.read_text() == "older results"
    victim = tmp_path / "victim.txt"
    victim.write_text("not yours")
    link = tmp_path / "link.safetensors"
    link.symlink_to(victim)
    rc, _, err = cli(capfd, "dump", "--model", small_model, "--ids", "1,2,3", "--out", link)
    assert_one_error_line(rc, err, "already exists")
    assert cli(capfd, "dump", "--model", small_model, "--ids", "1,2,3", "--out", link, "--force")[0] == 0
    assert victim.read_text() == "not yours" and not link.is_symlink()
    assert link.read_bytes()[8:9] == b"{"                         # a safetensors file replaced the link
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []


def test_plots_never_follow_a_symlink_or_overwrite(tmp_path, capfd, small_model):
    """On main --plots DIR followed a symlink in DIR and overwrote its target."""
    pytest.importorskip("matplotlib")
    plots = tmp_path / "plots"
    plots.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("not a figure")
    (plots / "layer_significance.png").symlink_to(victim)
    (plots / "ffn_counts.png").write_bytes(b"an older figure")
    before = tree(tmp_path)
    rc, _, err = cli(capfd, "locate", "--model", small_model, "--ids", "1,2,3", "--plots", plots)
    assert_one_error_line(rc, err, "already exists", "--force")
    assert tree(tmp_path) == before
    assert cli(capfd, "locate", "--model", small_model, "--ids", "1,2,3", "--plots", plots, "--force")[0] == 0
    assert victim.read_text() == "not a figure"
    assert not (plots / "layer_significance.png").is_symlink()
    assert (plots / "ffn_counts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [n for n in os.listdir(plots) if n.startswith(".")] == []


def test_force_without_plots_is_an_error(capfd, small_model):
    rc, _, err = cli(capfd, "locate", "--model", small_model, "--ids", "1,2,3", "--force")
    assert_one_error_line(rc, err, "--force")


def test_new_output_files_honour_the_umask(tmp_path, capfd, small_model):
    old = os.umask(0o027)
    try:
        assert cli(capfd, "dump", "--model", small_model, "--ids", "1,2", "--out", tmp_path / "d.safetensors")[0] == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d.safetensors").stat().st_mode) == 0o640


def test_write_new_file_is_atomic_and_no_clobber(tmp_path):
    from refimpl.errors import RefimplError
    from refimpl.files import write_new_file
    p = tmp_path / "x.bin"

    def fail(f):
        f.write(b"partial")
        raise RefimplError("stopped half-way")
    with pytest.raises(RefimplError):
        write_new_file(p, fail)
    assert os.listdir(tmp_path) == []                             # nothing half-written, no temp file
    write_new_file(p, lambda f: f.write(b"one"))
    with pytest.raises(RefimplError, match="already exists"):
        write_new_file(p, lambda f: f.write(b"two"))
    assert p.read_bytes() == b"one"
    os.unlink(p)
    with pytest.raises(RefimplError, match="appeared"):       # a file appears while we write: kept
        write_new_file(p, lambda f: (f.write(b"two"), p.write_bytes(b"theirs")))
    assert p.read_bytes() == b"theirs" and sorted(os.listdir(tmp_path)) == ["x.bin"]


def test_temporary_folders_of_other_destinations_are_not_touched(tmp_path, capfd):
    """DST `m` must not take `.m.tmp-x.tmp-1234abcd` (the live temporary folder of a conversion into
    `m.tmp-x`, under another lock) for one of its own stale folders."""
    model, tok = llama2c_files(tmp_path)
    out = tmp_path / "outputs"
    other = out / ".m.tmp-x.tmp-1234abcd"
    other.mkdir(parents=True)
    (other / ".refimpl-partial").write_text("refimpl conversion into m.tmp-x")
    (other / "config.json").write_text("{}")
    before = tree(other)
    assert cli(capfd, "convert", model, out / "m", "--tokenizer", tok)[0] == 0
    assert tree(other) == before


def _sigint_default():
    """In the child before exec: SIGINT as in a terminal. A shell starts background jobs with
    SIGINT ignored, which the child would inherit (Python then never raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
