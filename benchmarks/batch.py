#!/usr/bin/env python
"""Throughput of `refimpl batch` against one `refimpl locate` process per prompt.

    python benchmarks/batch.py                          # GPT2-medium and Llama-7B shapes, 1, 8 and 32 prompts
    python benchmarks/batch.py --models gpt2-medium --sizes 1,8 --runs 3
    python benchmarks/batch.py --report-only            # rewrite the results.md section from the cached runs

Models: synthetic canonical models with the real shapes and random weights
(`refimpl.synthetic.write_random_model`), written once under --root (default
$REFIMPL_BATCH_BENCH_ROOT or /work/bench-batch): GPT2-medium (24 x 1024, FFN 4096, vocab 50257,
fp32) and Llama-7B (32 x 4096, FFN 11008, vocab 32000, fp16, 13.5 GB). Both are larger than
the default 1 GiB weight cache in float64, so both stream. Prompts: 8 random words of the
synthetic word-level vocabulary (seeded), no targets (the top-1 prediction is explained).

Every measurement is the wall time of a whole process (interpreter start, imports, model
open, the analysis, writing), as a user would run it, float64, default options:

- batch: `refimpl batch PROMPTS --model M --out FRESH_DIR --quiet` on the first n prompts;
  prompts/minute = n / wall; the median over --runs runs;
- per prompt: `refimpl locate PROMPT --model M --json`, one process per prompt, on the first
  --single prompts (fewer than 32: the throughput of separate processes does not depend on how
  many there are, so it is measured on a few and extrapolated); prompts/minute = 1 / median wall.

"identical" compares the records of every batch run with those single runs (all keys but
`timing`, `id`, `group` and `key`, exactly). Measurements are cached as JSON under
ROOT/results/ (one file per measurement, with the 1-minute load average before and after),
so a run can be resumed and the table rebuilt. The table goes into benchmarks/results.md
between `<!-- batch:begin -->` and `<!-- batch:end -->` only (the rest of the file belongs to
benchmarks/run.py).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT_DEFAULT = os.environ.get("REFIMPL_BATCH_BENCH_ROOT", "/work/bench-batch")
RESULTS_MD = os.path.join(HERE, "results.md")
BEGIN, END = "<!-- batch:begin -->", "<!-- batch:end -->"
MODELS = {
    "gpt2-medium": ("GPT2-medium shape (fp32)", "gpt2",
                    dict(n_layers=24, d_model=1024, n_heads=16, d_ff=4096, d_vocab=50257, n_ctx=1024), "F32"),
    "llama-7b": ("Llama-7B shape (fp16)", "llama",
                 dict(n_layers=32, d_model=4096, n_heads=32, d_ff=11008, d_vocab=32000, n_ctx=2048), "F16"),
}
PROMPT_WORDS = 8


def loadavg() -> float:
    return os.getloadavg()[0]


def ensure_model(root: str, name: str) -> str:
    from refimpl.synthetic import random_config, write_random_model
    path = os.path.join(root, name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        _, family, sizes, store = MODELS[name]
        print(f"writing {path} ...", file=sys.stderr, flush=True)
        write_random_model(path, random_config(family, **sizes), seed=0, dtype=store)
    return path


def prompts(name: str, n: int) -> list[dict]:
    import numpy as np
    V = MODELS[name][2]["d_vocab"]
    rng = np.random.default_rng(1234)
    return [{"id": k, "prompt": " ".join(f"t{int(i)}" for i in rng.integers(2, V, PROMPT_WORDS))} for k in range(n)]


def run(argv: list[str], stdout=subprocess.PIPE) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "refimpl", *argv], stdout=stdout, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"refimpl {' '.join(argv[:3])} ... failed: {p.stderr.strip()[-500:]}")
    return wall, p


def cached(root: str, key: str, fn):
    path = os.path.join(root, "results", key + ".json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    before = loadavg()
    out = fn()
    out.update(loadavg_before=before, loadavg_after=loadavg(), when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    return out


def strip(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("timing", "id", "group", "key")}


def measure(root: str, name: str, sizes: list[int], runs: list[int], single: int, tag: str) -> dict:
    model = ensure_model(root, name)
    work = tempfile.mkdtemp(prefix="batch-bench-", dir=root)
    res = {"single": [], "batch": {}}
    try:
        items = prompts(name, max(sizes + [single]))
        for k in range(single):
            def one(k=k):
                wall, p = run(["locate", items[k]["prompt"], "--model", model, "--json"])
                return {"wall": wall, "record": strip(json.loads(p.stdout))}
            res["single"].append(cached(root, f"{tag}-{name}-single-{k}", one))
            print(f"{name}: locate process {k}: {res['single'][-1]['wall']:.1f} s", file=sys.stderr, flush=True)
        ref = {items[k]["prompt"]: s["record"] for k, s in enumerate(res["single"])}
        for n, n_runs in zip(sizes, runs):
            res["batch"][n] = []
            for r in range(n_runs):
                def bat(n=n):
                    path = os.path.join(work, f"p{n}.jsonl")
                    with open(path, "w", encoding="utf-8") as f:
                        f.writelines(json.dumps(it) + "\n" for it in items[:n])
                    out = os.path.join(work, f"out{n}")
                    shutil.rmtree(out, ignore_errors=True)
                    wall, _ = run(["batch", path, "--model", model, "--out", out, "--quiet"], stdout=subprocess.DEVNULL)
                    with open(os.path.join(out, "results.jsonl"), encoding="utf-8") as f:
                        recs = [json.loads(x) for x in f]
                    compared = [strip(x) == ref[x["prompt"]] for x in recs if x["prompt"] in ref]
                    return {"wall": wall, "n": n, "n_records": len(recs), "compared": len(compared),
                            "identical": all(compared)}
                res["batch"][n].append(cached(root, f"{tag}-{name}-batch{n}-run{r}", bat))
                print(f"{name}: batch of {n}, run {r}: {res['batch'][n][-1]['wall']:.1f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return res


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(x.split(":", 1)[1].strip() for x in f if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    import numpy
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.1f} GB RAM; Python {platform.python_version()}, "
            f"numpy {numpy.__version__}")


def table(results: dict) -> str:
    lines = [BEGIN, "", "## Many prompts: `refimpl batch` against one `refimpl locate` process per prompt", "",
             f"Machine: {machine()}. Generated by `python benchmarks/batch.py` (see its docstring); float64, default "
             "options, synthetic models with the real shapes, 8-word prompts, no targets. Walls are whole processes. "
             "Batch: the median of the runs listed under the table. Per prompt: one `refimpl locate --json` process per prompt, "
             "measured on the first few prompts (listed; median wall) and extrapolated to n prompts (n x that wall). "
             "The machine is shared: the 1-minute load average before and after each measurement is given "
             "(2 cores; a load above 2 means other work was running and every number is slower than on a quiet "
             "machine)."]
    for name, res in results.items():
        label = MODELS[name][0]
        missing = [str(n) for n, rs in res["batch"].items() if not rs]
        res = {**res, "batch": {n: rs for n, rs in res["batch"].items() if rs}}    # sizes not measured: left out
        lines += ["", "| model | prompts | batch wall | batch prompts/min | per-prompt processes (extrapolated) | "
                  "per-prompt prompts/min | batch / per-prompt | identical records | load before-after |",
                  "|---|---|---|---|---|---|---|---|---|"]
        sw = statistics.median(s["wall"] for s in res["single"])
        sload = f"{min(s['loadavg_before'] for s in res['single']):.1f}-{max(s['loadavg_after'] for s in res['single']):.1f}"
        for n, rs in sorted(res["batch"].items(), key=lambda kv: int(kv[0])):
            n = int(n)
            bw = statistics.median(r["wall"] for r in rs)
            same = all(r["identical"] and r["n_records"] == n for r in rs)
            cmp = sum(r["compared"] for r in rs)
            load = f"{min(r['loadavg_before'] for r in rs):.1f}-{max(r['loadavg_after'] for r in rs):.1f}"
            lines.append(f"| {label} | {n} | {bw:.1f} s | {60 * n / bw:.2f} | {n * sw:.1f} s ({sw:.1f} s each) | "
                         f"{60 / sw:.2f} | {sw * n / bw:.2f}x | {'yes' if same else 'NO'} ({cmp} compared) | "
                         f"{load} (single: {sload}) |")
        walls = ", ".join(f"{s['wall']:.1f}" for s in res["single"])
        lines.append("")
        lines.append(f"{label}: per-prompt process walls {walls} s; batch walls "
                     + "; ".join(f"{n}: " + ", ".join(f"{r['wall']:.1f}" for r in rs) + " s"
                                 for n, rs in sorted(res["batch"].items(), key=lambda kv: int(kv[0])))
                     + f"; measured {res['single'][0]['when']} to {max(r['when'] for rs in res['batch'].values() for r in rs)}."
                     + (f" Not measured: {', '.join(missing)} prompts." if missing else ""))
    lines += ["", END]
    return "\n".join(lines)


def write_section(text: str) -> None:
    with open(RESULTS_MD, encoding="utf-8") as f:
        doc = f.read()
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        doc = head + text + tail
    else:
        doc = doc.rstrip("\n") + "\n\n" + text + "\n"
    with open(RESULTS_MD, "w", encoding="utf-8") as f:
        f.write(doc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gpt2-medium,llama-7b", help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--sizes", default="1,8,32", help="numbers of prompts of the batch runs")
    ap.add_argument("--runs", default="3,3,1", help="batch runs per size, one number or one per size (the median is quoted)")
    ap.add_argument("--single", type=int, default=3, help="prompts measured as separate locate processes")
    ap.add_argument("--root", default=ROOT_DEFAULT, help="where the models and cached measurements go")
    ap.add_argument("--tag", default="v1", help="cache tag: a new tag re-measures everything")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the results.md section from the cache")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave results.md alone")
    a = ap.parse_args(argv)
    names = [m for m in a.models.split(",") if m]
    sizes = [int(x) for x in a.sizes.split(",") if x]
    runs = [int(x) for x in a.runs.split(",") if x]
    runs = runs * len(sizes) if len(runs) == 1 else runs
    if len(runs) != len(sizes):
        ap.error("--runs: one number, or one per size")
    results = {}
    for name in names:
        if a.report_only:
            d = os.path.join(a.root, "results")
            def load(key):
                with open(os.path.join(d, key + ".json"), encoding="utf-8") as f:
                    return json.load(f)
            def all_runs(prefix):          # every cached run: the models may have had different --runs
                out, r = [], 0
                while os.path.isfile(os.path.join(d, f"{prefix}{r}.json")):
                    out.append(load(f"{prefix}{r}"))
                    r += 1
                return out
            results[name] = {"single": all_runs(f"{a.tag}-{name}-single-"),
                             "batch": {n: all_runs(f"{a.tag}-{name}-batch{n}-run") for n in sizes}}
        else:
            results[name] = measure(a.root, name, sizes, runs, a.single, a.tag)
    text = table(results)
    print(text)
    if not a.no_write:
        write_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
