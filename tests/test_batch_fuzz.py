"""refimpl batch under hostile input (hypothesis): random prompt files, options and output paths
give exit 0 or 2, never a traceback, exactly one `error:` line when refusing, and nothing outside
OUT changes (a foreign directory given as OUT is refused untouched)."""
import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import given, settings, strategies as st

from refimpl.cli import main
from tests.test_robustness import hashes

LINES = ['{"prompt": "The capital of France is"}', '{"prompt": "The capital of Japan is", "target": "Tokyo"}',
         '{"prompt": "The capital of Peru is", "target": "Lima Lima"}', '{"prompt": ""}', '{"prompt": 5}',
         '{"promt": "x"}', '{"prompt": "x", "id": [1]}', '{"prompt": "\\u0000\\u001b[31m"}', "{", "[]", "null",
         '{"prompt": "' + "t " * 100 + '"}', '{"prompt": "héllo ☃ 😀", "group": 3}', "", "   ",
         "The capital of France is", "prompt,target", '"a,b', "\x1b[31m"]
OPTIONS = [["--top", "0"], ["--top", "2"], ["--readout", "soft"], ["--readout", "raw"], ["--format", "csv"],
           ["--format", "yaml"], ["--chunk", "-1"], ["--chunk", "2"], ["--counts", "maybe"], ["--workers", "0"],
           ["--dtype", "float16"], ["--model", "no-such-model"], ["--exhaustive"], ["--no-prepend-bos"],
           ["--summarize"], ["--plots"]]


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@settings(max_examples=40, deadline=None)
@given(lines=st.lists(st.sampled_from(LINES), max_size=3), ext=st.sampled_from([".jsonl", ".csv", ".txt", ".json"]),
       options=st.lists(st.sampled_from(OPTIONS), max_size=2), out_kind=st.sampled_from(["new", "file", "foreign", "nested"]))
def test_random_prompt_files_and_options(lines, ext, options, out_kind):
    world = Path(tempfile.mkdtemp(prefix="batch-fuzz-"))
    try:
        f = world / ("p" + ext)
        f.write_text("\n".join(lines) + "\n", encoding="utf-8")
        (world / "foreign").mkdir()
        (world / "foreign" / "mine.txt").write_text("mine", encoding="utf-8")
        (world / "afile").write_text("x", encoding="utf-8")
        out = {"new": world / "out", "file": world / "afile", "foreign": world / "foreign",
               "nested": world / "out" / "a" / "b"}[out_kind]
        argv = ["batch", f, "--out", out, "--quiet"]
        for o in options:
            argv += [o[0], out] if o == ["--summarize"] else o
        before = {k: v for k, v in hashes(world).items() if not k.startswith(str(world / "out"))}
        rc, stdout, err = run(argv)
        assert rc in (0, 2), (argv, rc, err)
        assert "Traceback" not in err and "Traceback" not in stdout, (argv, err)
        if rc == 2:
            errs = [x for x in err.splitlines() if not x.startswith("warning: ")]
            assert len(errs) == 1 and errs[0].startswith("error: "), (argv, err)
        after = {k: v for k, v in hashes(world).items() if not k.startswith(str(world / "out"))}
        assert after == before, argv
        if rc == 0:
            assert os.path.isfile(os.path.join(out, "results.jsonl")) and os.path.isfile(os.path.join(out, "summary.md"))
    finally:
        shutil.rmtree(world, ignore_errors=True)
