"""refimpl batch: records equal separate `refimpl locate --json` processes, prompt files, OUT rules,
the summary against a direct computation from the records, locate(trace=), the chunked forward."""
import csv
import json
import os
import subprocess
import sys
from collections import Counter, defaultdict

import numpy as np
import pytest

import refimpl
from refimpl import batch, batch_io
from refimpl.batch_summary import average_counts, build_summary
from refimpl.forward import forward, forward_many
from refimpl.locate import locate
from tests.conftest import ROOT
from tests.helpers import random_model
from tests.test_robustness import assert_one_error_line, cli, hashes

EMBEDDED = str(ROOT / "refimpl" / "data" / "models" / "capitals-gpt2")
ITEMS = [
    {"id": "fr", "prompt": "The capital of France is", "target": "Paris", "group": "capital"},
    {"id": "jp", "prompt": "The capital of Japan is", "target": "Tokyo", "group": "capital"},
    {"id": "lyon", "prompt": "Lyon is located in the country of", "target": "France", "group": "city_in"},
    {"id": "free", "prompt": "People in Peru speak", "group": None},                       # target: the top-1
    {"id": "bad", "prompt": "The capital of Italy is", "target": "Rome Milan", "group": "capital"},   # not one token
    {"id": "unk", "prompt": "The capital of france is", "target": "Paris", "group": "capital"},     # unknown word
]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def write_jsonl(path, items):
    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps({k: v for k, v in it.items() if v is not None}) + "\n")
    return str(path)


def strip(r: dict) -> dict:
    """A record without what may differ from a separate locate run (timing) and the batch's own keys."""
    return {k: v for k, v in r.items() if k not in ("timing", "id", "group", "key")}


def records(out) -> list[dict]:
    with open(os.path.join(out, "results.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """The six items run once by the CLI (in a process of its own, as a user would)."""
    d = tmp_path_factory.mktemp("batch")
    prompts = write_jsonl(d / "p.jsonl", ITEMS)
    out = d / "out"
    p = subprocess.run([sys.executable, "-m", "refimpl", "batch", prompts, "--out", str(out)],
                       capture_output=True, text=True, env=ENV, cwd=str(d))
    assert p.returncode == 0, p.stderr
    return {"dir": d, "prompts": prompts, "out": str(out), "stdout": p.stdout, "stderr": p.stderr}


def test_records_equal_separate_locate_processes(serial):
    """Each record is `refimpl locate --json` of its prompt to the last bit (outside timing), run
    as separate processes with the equivalent arguments; a failing prompt is an error record
    carrying the message `refimpl locate` prints."""
    got = {r["id"]: r for r in records(serial["out"])}
    assert sorted(got) == sorted(it["id"] for it in ITEMS)
    for it in ITEMS:
        argv = [sys.executable, "-m", "refimpl", "locate", it["prompt"], "--json"]
        if it.get("target"):
            argv += ["--target", it["target"]]
        p = subprocess.run(argv, capture_output=True, text=True, env=ENV)
        r = got[it["id"]]
        assert r["id"] == it["id"] and r["group"] == it["group"]
        if it["id"] == "bad":
            assert p.returncode == 2
            assert r["command"] == "batch-error" and "error" in r
            assert p.stderr.strip().endswith("error: " + r["error"]), (p.stderr, r["error"])
            continue
        assert p.returncode == 0, p.stderr
        single = json.loads(p.stdout)
        single.pop("timing")
        assert strip(r) == single                     # floats compared exactly (JSON round-trips them)
    assert got["unk"]["warnings"] and "france" in got["unk"]["warnings"][0]


def test_records_are_locate_of_the_library(serial):
    """The same in-process: refimpl.locate.locate on a model opened alone."""
    model = refimpl.load(EMBEDDED)
    for r in records(serial["out"]):
        if r["command"] == "batch-error":
            continue
        it = next(i for i in ITEMS if i["id"] == r["id"])
        one = locate(model, it["prompt"], target=it.get("target"))
        one.pop("timing")
        assert strip(r) == json.loads(json.dumps(one))


def test_rerun_skips_everything_and_keeps_the_file(serial):
    before = hashes(os.path.join(serial["out"], "results.jsonl"))
    p = subprocess.run([sys.executable, "-m", "refimpl", "batch", serial["prompts"], "--out", serial["out"]],
                       capture_output=True, text=True, env=ENV)
    assert p.returncode == 0, p.stderr
    assert "0 prompts analysed" in p.stdout and "6 already done" in p.stdout
    assert hashes(os.path.join(serial["out"], "results.jsonl")) == before


def test_new_prompts_are_appended_to_a_resumed_run(serial, tmp_path):
    out = tmp_path / "out"
    first = write_jsonl(tmp_path / "a.jsonl", ITEMS[:2])
    assert batch.run_batch(first, None, str(out))["done"] == 2
    more = write_jsonl(tmp_path / "b.jsonl", ITEMS[:4])
    st = batch.run_batch(more, None, str(out))
    assert (st["done"], st["skipped"]) == (2, 2)
    got = records(out)
    assert [r["id"] for r in got] == ["fr", "jp", "lyon", "free"]
    ref = {r["id"]: strip(r) for r in records(serial["out"])}
    assert all(strip(r) == ref[r["id"]] for r in got)


def test_a_torn_last_line_is_dropped_and_redone(serial, tmp_path):
    """What kill -9 in the middle of a write leaves: an incomplete last line. The rerun cuts it
    and writes that prompt's record whole (test_batch_kill.py does it with real SIGKILLs)."""
    out = tmp_path / "out"
    prompts = write_jsonl(tmp_path / "p.jsonl", ITEMS[:3])
    batch.run_batch(prompts, None, str(out))
    path = out / "results.jsonl"
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join(lines[:2]) + b"\n" + lines[2][:len(lines[2]) // 2])
    st = batch.run_batch(prompts, None, str(out))
    assert (st["done"], st["skipped"]) == (1, 2)
    got = records(out)
    assert sorted(r["id"] for r in got) == ["fr", "jp", "lyon"]
    ref = {r["id"]: strip(r) for r in records(serial["out"])}
    assert all(strip(r) == ref[r["id"]] for r in got)


def test_summarize_rebuilds_the_summary_from_the_results_alone(serial, tmp_path, capfd):
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(serial["out"], out)
    with open(out / "summary.json", encoding="utf-8") as f:
        first = json.load(f)
    os.remove(out / "summary.json")
    os.remove(out / "summary.md")
    rc, stdout, err = cli(capfd, "batch", "--summarize", out)
    assert rc == 0, err
    with open(out / "summary.json", encoding="utf-8") as f:
        assert json.load(f) == first
    assert (out / "summary.md").read_text(encoding="utf-8").startswith("# refimpl batch summary")
    top1 = sum(r["target"]["rank"] == 0 for r in records(out) if r["command"] == "locate")
    assert f"target is the top-1 prediction in {top1} of 5" in stdout


# --------------------------------------------------------------------------- the summary, independently

def test_summary_against_a_direct_computation(serial):
    recs = records(serial["out"])
    with open(os.path.join(serial["out"], "summary.json"), encoding="utf-8") as f:
        s = json.load(f)
    ok = [r for r in recs if r["command"] == "locate"]
    assert (s["n_prompts"], s["n_errors"]) == (6, 1)
    assert [g["group"] for g in s["groups"]] == ["capital", "city_in", None]
    o = s["overall"]
    assert o["top1"]["count"] == sum(r["target"]["id"] == r["prediction"]["id"] for r in ok)
    for L in range(ok[0]["model"]["n_layers"]):
        for part in ("attn", "ffn"):
            v = [r["layers"][L][part]["log_prob_increase"] for r in ok]
            st = o["layers"][L][part]["log_prob_increase"]
            mean = sum(v) / len(v)
            assert st["mean"] == pytest.approx(mean, rel=1e-12, abs=1e-15)
            assert st["std"] == pytest.approx((sum((x - mean) ** 2 for x in v) / len(v)) ** 0.5, rel=1e-9, abs=1e-15)
            assert st["median"] == pytest.approx(sorted(v)[len(v) // 2], rel=1e-12)     # 5 values: the middle one
            assert st["min"] == min(v) and st["max"] == max(v)
    # recurring subvalues: every (kind, layer, index) in the top-K of >= 2 prompts, with who and the mean
    occ = defaultdict(dict)
    for r in ok:
        for sv in r["top_subvalues"]:
            occ[(sv["kind"], sv["layer"], sv["index"])].setdefault(r["id"], sv["log_prob_increase"])
    want = {k: v for k, v in occ.items() if len(v) >= 2}
    got = {(e["kind"], e["layer"], e["index"]): e for e in o["recurring"]}
    assert set(got) == set(want)
    for k, e in got.items():
        assert e["count"] == len(want[k]) and sorted(e["prompts"]) == sorted(want[k])
        assert e["share"] == pytest.approx(len(want[k]) / len(ok))
        assert e["mean_log_prob_increase"] == pytest.approx(np.mean(list(want[k].values())), rel=1e-12)
    kinds = [e["kind"] for e in o["recurring"]]
    assert kinds == sorted(kinds, key=["ffn", "attn_neuron", "attn"].index)     # FFN subvalues read off first
    ffn = [e["count"] for e in o["recurring"] if e["kind"] == "ffn"]
    assert ffn == sorted(ffn, reverse=True)
    # the error record is listed
    assert [e["id"] for e in o["errors"]] == ["bad"]


def test_counts_are_averaged_whatever_their_fields():
    """Old rows (helpful/unhelpful, a top-10 share) and new ones (negligible, threshold, an
    interval share) average field by field; a number next to intervals counts as [x, x]."""
    a = [{"layer": 0, "activated": 4, "helpful": 3, "unhelpful": 1, "top10_share": 0.5}]
    b = [{"layer": 0, "activated": 6, "helpful": 2, "unhelpful": 2, "negligible": 2, "threshold": 1e-3,
          "top10_share": [0.2, 0.4]}]
    got = average_counts([a, b])
    assert got == [{"layer": 0, "n": 2, "activated": 5.0, "helpful": 2.5, "unhelpful": 1.5, "top10_share": [0.35, 0.45],
                    "negligible": 2.0, "threshold": 1e-3}]


def test_summary_of_records_without_groups_has_only_overall():
    recs = [{"command": "batch-error", "id": 1, "group": None, "key": "0" * 64, "error": "x"}]
    s = build_summary(recs)
    assert s["groups"] == [] and s["overall"]["n_errors"] == 1 and s["overall"]["top1"]["rate"] is None


# --------------------------------------------------------------------------- prompt files

def test_prompt_file_layouts(tmp_path):
    (tmp_path / "p.txt").write_text("The capital of France is\n\n  The capital of Japan is\n", encoding="utf-8")
    assert batch_io.read_prompts(str(tmp_path / "p.txt")) == [
        {"id": 1, "prompt": "The capital of France is", "target": None, "group": None},
        {"id": 3, "prompt": "  The capital of Japan is", "target": None, "group": None}]
    with open(tmp_path / "p.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "target", "group"])
        w.writerow(["The capital of France is", "Paris", "capital"])
        w.writerow(["Lyon, a city, is located in", "", ""])
    assert batch_io.read_prompts(str(tmp_path / "p.csv")) == [
        {"id": 2, "prompt": "The capital of France is", "target": "Paris", "group": "capital"},
        {"id": 3, "prompt": "Lyon, a city, is located in", "target": None, "group": None}]
    facts = [{"known_id": 7, "subject": "France", "attribute": "Paris", "template": "The capital of {} is",
              "prediction": " Paris", "prompt": "The capital of France is", "relation_id": "P36"}]
    (tmp_path / "known.json").write_text(json.dumps(facts), encoding="utf-8")
    assert batch_io.read_prompts(str(tmp_path / "known.json")) == [
        {"id": 7, "prompt": "The capital of France is", "target": " Paris", "group": "P36"}]
    write_jsonl(tmp_path / "p.jsonl", ITEMS[:2])
    got = batch_io.read_prompts(str(tmp_path / "p.jsonl"))
    assert got == [{**it, "group": it["group"]} for it in ITEMS[:2]]


def test_known_facts_records_equal_locate_with_the_spaced_target(tmp_path):
    """The known-facts target is the attribute as it continues the prompt (" Paris")."""
    facts = [{"known_id": 1, "subject": "France", "attribute": "Paris", "prompt": "The capital of France is",
              "relation_id": "P36"}]
    (tmp_path / "k.json").write_text(json.dumps(facts), encoding="utf-8")
    batch.run_batch(str(tmp_path / "k.json"), None, str(tmp_path / "out"))
    (r,) = records(tmp_path / "out")
    one = locate(refimpl.load(EMBEDDED), "The capital of France is", target=" Paris")
    one.pop("timing")
    assert strip(r) == json.loads(json.dumps(one)) and (r["id"], r["group"]) == (1, "P36")


def test_shipped_prompt_files_are_the_embedded_models_facts():
    sys.path.insert(0, str(ROOT / "training"))
    try:
        import make_prompts
    finally:
        sys.path.pop(0)
    files = make_prompts.prompt_files()
    assert set(batch_io.shipped_prompts()) == {n[:-6] for n in files}
    model = refimpl.load(EMBEDDED)
    from refimpl.locate import single_token
    for name, items in files.items():
        path = batch_io.resolve_prompts(name[:-6])
        with open(path, encoding="utf-8") as f:
            assert f.read() == make_prompts.render(items), f"{name} is stale: run training/make_prompts.py"
        assert batch_io.read_prompts(path) == items
        for it in items:
            assert single_token(model, it["target"]) is not None, it
    groups = Counter(it["group"] for it in files["capitals-gpt2-relations.jsonl"])
    assert groups == {"capital": 169, "capital_of": 169, "city_in": 533, "language": 169, "currency": 168,
                      "continent": 169}
    paper = files["capitals-gpt2-paper.jsonl"]
    assert Counter(it["group"] for it in paper) == {"capital": 169, "city_in": 533}
    assert all(it["prompt"].startswith("The capital of ") and it["prompt"].endswith(" is")
               for it in paper if it["group"] == "capital")
    assert all(" is located in the country of" in it["prompt"] for it in paper if it["group"] == "city_in")


# --------------------------------------------------------------------------- bad input: one error line, nothing overwritten

@pytest.mark.parametrize("content,name,needle", [
    (None, "missing.jsonl", "missing.jsonl: prompt file not found"),
    ('{"prompt": "The capital of France is"}\n{"prompt": \n', "p.jsonl", "p.jsonl line 2: not a JSON object"),
    ('{"promt": "The capital of France is"}\n', "p.jsonl", "p.jsonl line 1: unknown key 'promt'"),
    ("prompt,tagret\nThe capital of France is,Paris\n", "p.csv", "p.csv line 1: unknown column 'tagret'"),
    ("target\nParis\n", "p.csv", "no `prompt` column"),
    ('id,prompt\na,"The capital of France is\nb,x\n', "p.csv", "p.csv line 2: not CSV (a quoted field"),
    ('{"prompt": "a", "id": 1}\n{"prompt": "b", "id": 1}\n', "p.jsonl", "two prompts have the id 1"),
    ('{"prompt": "  "}\n', "p.jsonl", "line 1: the prompt is empty"),
    ("\n\n", "p.txt", "no prompts in the file"),
    ('{"prompt": 3}', "p.json", "expected a JSON list of objects"),
])
def test_bad_prompt_files(tmp_path, capfd, content, name, needle):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    rc, out, err = cli(capfd, "batch", path, "--out", tmp_path / "out")
    assert_one_error_line(rc, err, needle)
    assert not (tmp_path / "out").exists()


def test_out_with_other_options_or_model_is_refused_and_kept(serial, tmp_path, capfd):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(serial["out"], out)
    before = hashes(out)
    rc, _, err = cli(capfd, "batch", serial["prompts"], "--out", out, "--top", "5")
    assert_one_error_line(rc, err, "holds results from other options", "top 10 there, 5 now", "give another --out")
    rc, _, err = cli(capfd, "batch", serial["prompts"], "--out", out, "--readout", "raw")
    assert_one_error_line(rc, err, 'readout "frozen" there, "raw" now')
    other = random_model("gpt2", d_vocab=60)
    rc, _, err = cli(capfd, "batch", serial["prompts"], "--out", out, "--model", other.path)
    assert_one_error_line(rc, err, "holds results from another model")
    assert hashes(out) == before


def test_out_that_is_not_a_batch_directory_is_refused(tmp_path, capfd):
    prompts = write_jsonl(tmp_path / "p.jsonl", ITEMS[:1])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine", encoding="utf-8")
    rc, _, err = cli(capfd, "batch", prompts, "--out", tmp_path / "mine")
    assert_one_error_line(rc, err, "is not a refimpl batch directory", "notes.txt")
    assert sorted(os.listdir(tmp_path / "mine")) == ["notes.txt"]
    rc, _, err = cli(capfd, "batch", prompts, "--out", prompts)
    assert_one_error_line(rc, err, "is not a directory")
    rc, _, err = cli(capfd, "batch", "--summarize", tmp_path / "mine")
    assert_one_error_line(rc, err, "not a refimpl batch directory")
    rc, _, err = cli(capfd, "batch", prompts)
    assert_one_error_line(rc, err, "--out OUT is required")
    rc, _, err = cli(capfd, "batch", prompts, "--out", tmp_path / "o", "--workers", "2", "--scheduler", "tcp://x:1")
    assert_one_error_line(rc, err, "either --workers or --scheduler")
    rc, _, err = cli(capfd, "batch", "--summarize", tmp_path / "mine", "--top", "3", "--out", tmp_path / "o")
    assert_one_error_line(rc, err, "--out has no effect")


def test_a_damaged_line_inside_results_is_an_error_not_a_repair(serial, tmp_path, capfd):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(serial["out"], out)
    lines = (out / "results.jsonl").read_bytes().split(b"\n")
    lines[1] = b"{garbage"
    (out / "results.jsonl").write_bytes(b"\n".join(lines))
    before = hashes(out)
    rc, _, err = cli(capfd, "batch", serial["prompts"], "--out", out)
    assert_one_error_line(rc, err, "results.jsonl line 2: not a record")
    assert hashes(out) == before


def test_every_option_has_help_with_its_default():
    from refimpl.cli import build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    text = " ".join(sub.choices["batch"].format_help().split())
    for opt in ("--out", "--summarize", "--format", "--top", "--readout", "--exhaustive", "--counts", "--chunk",
                "--workers", "--scheduler", "--plots", "--quiet", "--model", "--dtype", "--prepend-bos"):
        assert opt in text
    assert "(default: 10)" in text and "(default: frozen)" in text and "(default: auto)" in text


# --------------------------------------------------------------------------- the engine

def test_locate_reports_a_given_trace_identically():
    model = refimpl.load(EMBEDDED)
    for prompt in ("The capital of France is", "Kyoto is located in the country of"):
        a = locate(model, prompt)
        b = locate(model, prompt, trace=forward(model, model.encode(prompt)))
        a.pop("timing"), b.pop("timing")
        assert a == b
    with pytest.raises(refimpl.RefimplError, match="not the forward pass of this prompt"):
        locate(model, "The capital of Japan is", trace=forward(model, model.encode("The capital of France is")))


FIELDS = ("lin", "attn", "lres", "ffn", "lout", "q", "k", "v", "pattern", "z", "pre", "m")


@pytest.mark.parametrize("family", ["gpt2", "llama", "fairseq_lm"])
def test_forward_many_is_forward_bit_for_bit_and_reads_each_layer_once(family, monkeypatch):
    """Streaming (the cache holds no layer): the chunk's traces equal forward's on each prompt
    alone, exactly, and each stored tensor of a block is widened once per chunk, not per prompt."""
    sizes = dict(n_layers=3, d_model=16, n_heads=4, d_ff=40, d_vocab=50)
    if family == "fairseq_lm":
        sizes["cutoffs"] = [20, 35]
    held = random_model(family, store="F16", **sizes)
    streaming = refimpl.load(held.path, cache_bytes=0)
    assert batch.streams(streaming) and not batch.streams(held)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, 50, n)) for n in (1, 5, 9, 3)]
    calls = Counter()
    real = type(streaming)._upcast

    def counting(self, src, out=None):
        calls[src] += 1
        return real(self, src, out)
    monkeypatch.setattr(type(streaming), "_upcast", counting)
    many = forward_many(streaming, prompts)
    assert calls and all(calls[n] == 1 for n in calls if n.startswith("blocks.")), calls
    monkeypatch.setattr(type(streaming), "_upcast", real)
    for p, tr in zip(prompts, many):
        for ref in (forward(streaming, p), forward(held, p)):
            assert np.array_equal(tr.log_probs, ref.log_probs)
            for a, b in zip(tr.layers, ref.layers):
                for f in FIELDS:
                    assert np.array_equal(getattr(a, f), getattr(b, f)), f
                assert (a.gate_pre is None) == (b.gate_pre is None)
                assert a.gate_pre is None or np.array_equal(a.gate_pre, b.gate_pre)


def test_batch_on_a_streaming_model_equals_locate(tmp_path):
    """A whole batch with chunks of 3 on a model larger than its weight cache: every record is
    `locate` of the prompt on the same model opened alone (held in memory)."""
    held = random_model("llama", store="F16", n_layers=2, d_model=16, n_heads=4, d_ff=40, d_vocab=50)
    items = [{"id": n, "prompt": " ".join(f"t{(7 * n + 3 * j) % 50}" for j in range(2 + n % 4)), "group": None}
             for n in range(7)]
    prompts = write_jsonl(tmp_path / "p.jsonl", items)
    st = batch.run_batch(prompts, held.path, str(tmp_path / "out"), model_options={"cache_bytes": 0}, chunk=3)
    assert st["done"] == 7 and st["errors"] == 0
    for r in records(tmp_path / "out"):
        one = locate(held, items[r["id"]]["prompt"])
        one.pop("timing")
        assert strip(r) == json.loads(json.dumps(one))


def test_progress_bar_with_rate_and_eta(tmp_path):
    import io
    import re

    from refimpl import progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    term = Terminal()
    prompts = write_jsonl(tmp_path / "p.jsonl", ITEMS[:3])
    batch.run_batch(prompts, None, str(tmp_path / "out"), progress=progress.Progress("batch", stream=term, delay=0.0))
    text = term.getvalue()
    assert "batch: 3 prompts" in text
    assert re.search(r"\d\d:\d\d<\d\d:\d\d, +[\d.]+ ?(prompt/s|s/prompt)", text), text


def test_a_streaming_batch_keeps_the_attention_outputs_and_the_same_records():
    """keep_attention_outputs: the batch pins every W_O (widened once, then reused by every
    prompt's analysis, never evicted); the records stay those of the model held in memory."""
    held = random_model("gpt2", store="F16", n_layers=3, d_model=16, n_heads=4, d_ff=40, d_vocab=50)
    m = refimpl.load(held.path, cache_bytes=2000)
    assert batch.streams(m)
    w_o = sum(int(np.prod(m.tensors[f"blocks.{i}.attn.W_O"].shape)) for i in range(3)) * 8
    assert batch.keep_attention_outputs(m) == w_o and batch.streams(m) and m.cache_bytes == 2000
    items = [{"id": n, "prompt": p, "target": None, "group": None} for n, p in enumerate(["t1 t2 t3", "t4 t5", "t9"])]
    got = [r for _, r in batch.compute_records(m, items, ["0" * 64] * 3, batch.normalize_options({}))]
    assert all(f"blocks.{i}.attn.W_O" in m._cache for i in range(3))
    for it, r in zip(items, got):
        one = locate(held, it["prompt"])
        one.pop("timing")
        assert strip(r) == one


def test_one_writer_at_a_time(tmp_path, capfd):
    prompts = write_jsonl(tmp_path / "p.jsonl", ITEMS[:1])
    out = tmp_path / "out"
    out.mkdir()
    with batch.locked(str(out)):
        rc, _, err = cli(capfd, "batch", prompts, "--out", out)
    assert_one_error_line(rc, err, "another refimpl batch is writing this directory")
    assert not (out / "results.jsonl").exists()


def test_a_repeated_prompt_is_analysed_once(tmp_path):
    items = [ITEMS[0], {**ITEMS[0], "id": "again"}, ITEMS[1]]
    st = batch.run_batch(write_jsonl(tmp_path / "p.jsonl", items), None, str(tmp_path / "out"))
    assert (st["done"], st["repeats"], st["skipped"]) == (2, 1, 0)
    assert [r["id"] for r in records(tmp_path / "out")] == ["fr", "jp"]


def test_ctrl_c_keeps_what_is_written_and_says_how_to_finish(tmp_path, capfd, monkeypatch):
    prompts = write_jsonl(tmp_path / "p.jsonl", ITEMS[:3])
    real = batch.compute_records

    def interrupted(model, items, keys, options, extra=()):
        for n, pair in enumerate(real(model, items, keys, options, extra)):
            if items[0]["id"] == "lyon":
                raise KeyboardInterrupt
            yield pair
    monkeypatch.setattr(batch, "compute_records", interrupted)
    rc, out, err = cli(capfd, "batch", prompts, "--out", tmp_path / "out")
    assert rc == 130 and err.splitlines()[-1].startswith("error: interrupted; 2 records written this run are kept"), err
    assert "rerun the same command to finish" in err
    monkeypatch.setattr(batch, "compute_records", real)
    rc, out, err = cli(capfd, "batch", prompts, "--out", tmp_path / "out")
    assert rc == 0 and "1 prompts analysed (0 errors), 2 already done" in out


def test_plots_draw_each_group(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", ITEMS[:4])
    s = batch.run_batch(prompts, None, str(tmp_path / "out"), plots=True)["summary"]
    names = sorted(os.listdir(tmp_path / "out" / "figures"))
    assert {"layers-all.png", "layers-capital.png", "layers-city_in.png"} <= set(names)
    assert set(s["figures"]) == {n[:-4] for n in names}
    for n in names:
        assert (tmp_path / "out" / "figures" / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _zero_tensor_in_place(path, name):
    """Overwrite one tensor's bytes of a safetensors file with zeros (same size: an ablation)."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        a, b = header[name]["data_offsets"]
        f.seek(8 + n + a)
        f.write(bytes(b - a))


def test_a_model_edited_in_place_is_not_resumed_with_stale_records(tmp_path, capfd):
    """The digest names the files by the sha256 config.json records; a weight file edited in
    place after the records were made (every W_out zeroed) must not let the rerun skip them."""
    import shutil
    model = tmp_path / "m"
    shutil.copytree(EMBEDDED, model)
    prompts = write_jsonl(tmp_path / "p.jsonl", ITEMS[:1])
    out = tmp_path / "out"
    assert batch.run_batch(prompts, str(model), str(out))["done"] == 1
    os.utime(model / "model.safetensors")                     # touched only: same bytes, resumed
    rc, o, err = cli(capfd, "batch", prompts, "--model", model, "--out", out, "--quiet")
    assert rc == 0 and "already done" in o, (o, err)
    n_layers = json.loads((model / "config.json").read_text())["n_layers"]
    for i in range(n_layers):
        _zero_tensor_in_place(model / "model.safetensors", f"blocks.{i}.mlp.W_out")
    before = hashes(out / "results.jsonl")
    rc, o, err = cli(capfd, "batch", prompts, "--model", model, "--out", out, "--quiet")
    assert_one_error_line(rc, err, str(model / "model.safetensors"), "stale")
    assert hashes(out / "results.jsonl") == before
    fresh = batch.run_batch(prompts, str(model), str(tmp_path / "out2"))
    assert fresh["done"] == 1
    assert records(tmp_path / "out2")[0]["prediction"] != records(out)[0]["prediction"]
