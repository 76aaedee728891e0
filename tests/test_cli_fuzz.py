"""The command line under random use: hypothesis draws argument lists and damaged model folders.

Whatever the arguments or the files, `refimpl` must: never show a traceback (no exception
escapes `refimpl.cli.main`), exit 0 or 2 (1 only from `compare`, whose contract it is), end
a failure with exactly one `error:` line, finish within a time limit, and change nothing
outside the output path of the command (its --out file, --plots folder, convert's DST and
the model's cache/, which `prepare` and the exact counts write).

Budget: REFIMPL_FUZZ_EXAMPLES examples per test (default 40: a few seconds on two cores).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from refimpl.cli import main
from refimpl.synthetic import random_config, write_random_model

EXAMPLES = int(os.environ.get("REFIMPL_FUZZ_EXAMPLES", "40"))
TIME_LIMIT = 60                      # seconds per command (a hang fails the test instead of stalling it)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"a command ran longer than {TIME_LIMIT} s")


def run(argv) -> tuple[int, str, str]:
    """`refimpl ARGV` in-process: (exit code, stdout, stderr); any escaping exception fails the test."""
    out, err = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main([str(a) for a in argv])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return rc, out.getvalue(), err.getvalue()


def check_contract(argv, rc, out, err):
    allowed = {0, 1, 2} if argv and argv[0] == "compare" else {0, 2}
    assert rc in allowed, (argv, rc, err[-500:])
    assert "Traceback" not in err and "Traceback" not in out, (argv, err[-2000:])
    if rc == 2:
        lines = err.splitlines()
        errors = [x for x in lines if x.startswith("error: ")]
        assert len(errors) == 1 and lines[-1] == errors[0], (argv, err)


def snapshot(root: Path, skip) -> dict:
    """Every path under root (outside `skip`) with its type and content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        d = Path(dirpath)
        dirnames[:] = [n for n in dirnames if not skip(d / n)]
        for n in dirnames:
            out[str(d / n)] = "dir"
        for n in filenames:
            p = d / n
            if skip(p):
                continue
            if p.is_symlink():
                out[str(p)] = "-> " + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p)] = "special"
    return out


# --------------------------------------------------------------------------- argument lists


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    gpt2 = root / "models" / "gpt2"
    write_random_model(str(gpt2), random_config("gpt2", d_vocab=24, n_ctx=12, n_layers=2), seed=1)
    llama = root / "models" / "llama"
    write_random_model(str(llama), random_config("llama", d_vocab=24, n_ctx=12, n_layers=2, n_kv_heads=2),
                       seed=2, dtype="F16")
    (root / "inputs").mkdir()
    (root / "inputs" / "notes.txt").write_text("hello")
    dumps = root / "inputs"
    for name, m in (("a.safetensors", gpt2), ("b.safetensors", gpt2)):
        rc, _, err = run(["dump", "--model", m, "--ids", "1,2,3", "--out", dumps / name])
        assert rc == 0, err
    (root / "out").mkdir()
    return root


WORDS = ["t1", "t2 t3", "t5 t7 t9 t11", "", " ", "\t\n", "x" * 300, "t1 " * 40, "héllo ☃ 😀", "\x00\x1b[31m",
         "The capital of France is", "-t1"]
INTS = st.one_of(st.integers(-3, 30), st.sampled_from([2**31, -2**63, 10**20, 2**64 + 1]))
ID_LISTS = st.one_of(st.lists(st.integers(-2, 30), max_size=14).map(lambda v: ",".join(map(str, v))),
                     st.sampled_from(["1,99999999999999999999", "a,b", "1.5", ",,,", "1, 2", "0x10", "9" * 5000]))


def _options_of(cmd: str) -> tuple[set, set]:
    """(option strings, required option strings) of a subcommand, from the CLI's own parser."""
    from refimpl.cli import build_parser
    parser = build_parser()
    sub = next((a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"), None)
    p = sub.choices.get(cmd) if sub is not None else None
    if p is None:
        return set(), set()
    opts = {s for a in p._actions for s in a.option_strings if s.startswith("--")}
    req = {s for a in p._actions if a.required for s in a.option_strings}
    return opts, req


@st.composite
def argv_lists(draw, world):
    models = [world / "models" / "gpt2", world / "models" / "llama", world / "nowhere", world / "inputs" / "notes.txt",
              world / "inputs", "capitals-gpt2", "no-such-model", world]
    out = world / "out"
    cmd = draw(st.sampled_from(["locate", "layers", "subvalues", "vocab", "additivity", "subkey", "trace",
                                "compare-tokens", "baseline", "predict", "dump", "compare", "verify", "models",
                                "prepare", "convert", "bogus", "--version", "-h"]))
    argv = [cmd]
    if cmd == "compare":
        argv += draw(st.lists(st.sampled_from([world / "inputs" / "a.safetensors", world / "inputs" / "b.safetensors",
                                               world / "inputs" / "notes.txt", world / "nothing"]), max_size=3))
    elif cmd == "verify":
        argv += draw(st.lists(st.sampled_from(models), max_size=2))
    elif cmd == "convert":
        argv += draw(st.lists(st.sampled_from([world / "models" / "gpt2", world / "inputs" / "notes.txt", world / "inputs",
                                               out / "c1", out / "c2", world / "models", world]), max_size=3))
    elif draw(st.booleans()):
        argv.append(draw(st.sampled_from(WORDS)))
    options = {
        "--model": st.sampled_from(models), "--ids": ID_LISTS, "--layer": INTS, "--neuron": INTS, "--index": INTS,
        "--position": INTS, "--top": INTS, "--max": INTS, "--target": st.sampled_from(WORDS + ["t3", "nope"]),
        "--target-id": INTS, "--readout": st.sampled_from(["frozen", "raw", "lens", "soft"]),
        "--dtype": st.sampled_from(["float32", "float64", "float16"]), "--kind": st.sampled_from(["attn", "ffn", "x"]),
        "--by": st.sampled_from(["position", "head", "head_position", "row"]),
        "--vector": st.sampled_from(["ffn", "attn", "ffn-neuron", "attn-position", "attn-head", "Lin", "Lres", "Lout",
                                     "x"]),
        "--which": st.sampled_from(["in", "gate", "out"]), "--source": st.sampled_from(["attn.0", "ffn.1", "emb.token",
                                                                                        "attn.99", "zzz"]),
        "--tokens": st.sampled_from(["t1,t2", "t1", "", "1,2", "nope,t1", "t1 t2"]),
        "--out": st.sampled_from([out / "d.safetensors", out, world / "inputs" / "notes.txt", world / "no" / "x"]),
        "--counts": st.sampled_from(["auto", "yes", "no", "maybe"]), "--rtol": st.sampled_from(["1e-10", "-1", "nan"]),
        "--atol": st.sampled_from(["0", "inf", "x"]), "--format": st.sampled_from(["hf-gpt2", "llama2c", "onnx"]),
        "--tokenizer": st.sampled_from([world / "inputs" / "notes.txt", world / "nothing"]),
        "--generate": INTS, "--weight-cache": st.sampled_from(["auto", "yes", "no"]),
        "--negligible": st.sampled_from(["1e-6", "0", "-1", "nan", "inf", "x", "1e300"]),
        "--share": st.sampled_from(["exact", "bound", "approx"]),
    }
    flags = ["--json", "--exhaustive", "--force", "--token-ids", "--summary", "--quiet", "--convert",
             "--no-subvalue-scores"]
    valid, required = _options_of(cmd)
    for name in sorted(valid):          # mostly the command's own options (else argparse refuses at once) ...
        if name in options and draw(st.integers(0, 9)) < (8 if name in required else 3):
            argv += [name, draw(options[name])]
        elif name in flags and draw(st.integers(0, 9)) < 2:
            argv.append(name)
    for _ in range(draw(st.integers(0, 1))):      # ... and now and then anything
        if draw(st.booleans()):
            argv.append(draw(st.sampled_from(flags)))
        else:
            name = draw(st.sampled_from(sorted(options)))
            argv += [name, draw(options[name])]
    return argv


def test_random_argument_lists(world, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(world / "out" / "xdg"))
    monkeypatch.setenv("REFIMPL_CACHE", str(world / "out" / "converted"))

    def skip(p: Path):
        return p.name == "cache" or p == world / "out" or world / "out" in p.parents

    @FUZZ
    @given(argv=argv_lists(world))
    @example(argv=["locate", "--ids", "1,99999999999999999999"])          # regressions, always run
    @example(argv=["predict", "--ids=-99999999999999999999,1", "--json"])
    @example(argv=["compare", world / "inputs" / "a.safetensors", world / "inputs" / "b.safetensors", "--rtol", "nan"])
    def check(argv):
        before = snapshot(world, skip)
        rc, out, err = run(argv)
        check_contract(argv, rc, out, err)
        assert snapshot(world, skip) == before, argv
        for p in (world / "out").iterdir():           # outputs of one example do not leak into the next
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    check()


# --------------------------------------------------------------------------- damaged model folders

JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64), st.sampled_from([0, 1, -1, 2**31, 10**12]),
                        st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e-300, 1e308, -0.0]),
                        st.text(max_size=12), st.lists(st.integers(-3, 40), max_size=5),
                        st.dictionaries(st.text(max_size=5), st.integers(-3, 40), max_size=3))
CONFIG_KEYS = ["family", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_head", "d_ff", "d_vocab", "n_ctx", "norm",
               "norm_eps", "final_norm", "act", "gated_ffn", "positions", "padding_idx", "rope_theta", "embed_scale",
               "embedding", "unembedding", "tie_word_embeddings", "adaptive", "attn_bias", "mlp_bias", "prepend_ids",
               "special_tokens", "format", "format_version", "files", "config_sha256"]


@st.composite
def damages(draw):
    kind = draw(st.sampled_from(["config-value", "config-delete", "config-bytes", "weights-bytes", "weights-cut",
                                 "tokenizer-bytes", "tokenizer-json", "replace", "index", "extra-tensor-file",
                                 "cache-junk"]))
    if kind == "config-value":
        return kind, (draw(st.sampled_from(CONFIG_KEYS)), draw(JSON_VALUES))
    if kind == "config-delete":
        return kind, draw(st.sampled_from(CONFIG_KEYS))
    if kind in ("config-bytes", "weights-bytes", "tokenizer-bytes"):
        return kind, draw(st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), min_size=1, max_size=6))
    if kind == "weights-cut":
        return kind, draw(st.integers(0, 4000))
    if kind == "tokenizer-json":
        return kind, draw(st.sampled_from(['{"model": 5}', "[]", '{"version": "1.0", "model": {"type": "BPE"}}',
                                           '{"padding": {"strategy": {"Fixed": 1000000000000}}}', "null"]))
    if kind == "replace":
        return kind, (draw(st.sampled_from(["config.json", "model.safetensors", "tokenizer.json"])),
                      draw(st.sampled_from(["dir", "fifo", "devzero", "empty", "dangling"])))
    if kind == "index":
        return kind, draw(st.sampled_from([{"weight_map": {"embed.W_E": 3}}, {"weight_map": []}, [],
                                           {"weight_map": {"embed.W_E": "../model.safetensors"}},
                                           {"weight_map": {"embed.W_E": "model.safetensors"}}]))
    if kind == "extra-tensor-file":
        return kind, draw(st.sampled_from(["model-00002-of-00002.safetensors", "notes.json"]))
    return kind, draw(st.sampled_from(["weights-float64.json", "constants-float64.values", "constants-float64.json",
                                       "ranges-frozen-float64.npz", "weights-float64-L0000.safetensors"]))


def apply_damage(d: Path, damage):
    kind, arg = damage
    cfg = d / "config.json"
    if kind == "config-value":
        c = json.loads(cfg.read_text())
        c[arg[0]] = arg[1]
        cfg.write_text(json.dumps(c))
    elif kind == "config-delete":
        c = json.loads(cfg.read_text())
        c.pop(arg, None)
        cfg.write_text(json.dumps(c))
    elif kind in ("config-bytes", "weights-bytes", "tokenizer-bytes"):
        f = d / {"config-bytes": "config.json", "weights-bytes": "model.safetensors",
                 "tokenizer-bytes": "tokenizer.json"}[kind]
        data = bytearray(f.read_bytes())
        for off, val in arg:
            data[off % len(data)] = val
        f.write_bytes(bytes(data))
    elif kind == "weights-cut":
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[:arg])
    elif kind == "tokenizer-json":
        (d / "tokenizer.json").write_text(arg)
    elif kind == "replace":
        name, what = arg
        (d / name).unlink()
        if what == "dir":
            (d / name).mkdir()
        elif what == "fifo":
            os.mkfifo(d / name)
        elif what == "devzero":
            (d / name).symlink_to("/dev/zero")
        elif what == "empty":
            (d / name).write_bytes(b"")
        else:
            (d / name).symlink_to(d / "nowhere")
    elif kind == "index":
        (d / "model.safetensors.index.json").write_text(json.dumps(arg))
    elif kind == "extra-tensor-file":
        shutil.copy(d / "model.safetensors", d / arg) if arg.endswith(".safetensors") else (d / arg).write_text("{}")
    else:
        (d / "cache").mkdir(exist_ok=True)
        (d / "cache" / arg).write_bytes(b'{"refimpl_cache": 1}' if arg.endswith(".json") else b"PK\x03\x04junk")


COMMANDS = [["layers", "--ids", "1,2,3"], ["locate", "--ids", "1,2,3", "--top", "2"], ["predict", "t1 t2"],
            ["verify"], ["prepare"], ["subvalues", "--ids", "1,2", "--layer", "1", "--kind", "attn", "--json"],
            ["dump", "--ids", "1,2"], ["trace", "t3 t4", "--layer", "0", "--neuron", "3"]]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    models = {}
    for fam, store in (("gpt2", "F32"), ("llama", "F16"), ("fairseq_lm", "F32")):
        d = root / fam
        kw = dict(cutoffs=[8, 16]) if fam == "fairseq_lm" else {}
        write_random_model(str(d), random_config(fam, d_vocab=24, n_ctx=12, n_layers=2, **kw), seed=3, dtype=store)
        models[fam] = d
    return models


def test_damaged_model_folders(pristine, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))
    work = tmp_path_factory.mktemp("damaged")

    @FUZZ
    @given(family=st.sampled_from(sorted(pristine)), damage=damages(), command=st.sampled_from(COMMANDS))
    def check(family, damage, command):
        d = work / "m"
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(pristine[family], d, symlinks=True)
        apply_damage(d, damage)
        out = work / "out.safetensors"
        if out.exists():
            out.unlink()
        argv = [command[0], "--model", d, *command[1:]] if command[0] != "verify" else ["verify", d]
        if command[0] == "dump":
            argv += ["--out", out]

        def skip(p: Path):
            return p.name == "cache" or p == out
        before = snapshot(work, skip)
        rc, o, e = run(argv)
        check_contract(argv, rc, o, e)
        assert snapshot(work, skip) == before, (damage, argv)
    check()


def test_the_fuzzers_see_working_models(world, pristine):
    """The worlds are usable: an undamaged run of each command succeeds (so the fuzz checks work, not only errors)."""
    for d in list(pristine.values()) + [world / "models" / "gpt2"]:
        for command in COMMANDS:
            argv = [command[0], "--model", d, *command[1:]] if command[0] != "verify" else ["verify", d]
            if command[0] == "dump":
                argv += ["--out", world / "out" / f"{d.name}.safetensors", "--force"]
            rc, out, err = run(argv)
            assert rc == 0, (argv, err)
    assert math.isfinite(EXAMPLES)
