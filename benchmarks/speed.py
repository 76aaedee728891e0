#!/usr/bin/env python
"""Issue 16's speed targets: whole `refimpl locate` processes, before and after, side by side.

    python benchmarks/speed.py                       # everything (GPT2-medium, Llama-7B, Llama-13B)
    python benchmarks/speed.py --models gpt2-medium --runs 5
    python benchmarks/speed.py --report-only         # rewrite the section from the cache

Each figure is the median of --runs separate processes `python -m refimpl locate --model DIR
--dtype D "The capital of France is"` (text report, the default counts policy, no `prepare`d
cache of any kind), timed by the parent around the whole process (interpreter start,
imports, tokenizer, weights, every part of the report, exit); peak RSS is the child's
ru_maxrss. The kinds of run:

- first after convert (GPT2-medium): `refimpl convert` of the source into a fresh directory,
  then the locate run on it (the page cache holds what the conversion wrote);
- cold: the model's files dropped from the page cache first (posix_fadvise DONTNEED);
- warm: after one untimed run.

Beside them, in the same session: one pass of `x @ W` over every weight matrix (worker.py pass,
in-process, page cache warm, median of 5) and TransformerLens 3.9 on the same weights
(worker.py tl). The machine, its load average before each run and the code version are
recorded. The section goes into benchmarks/results.md between `<!-- speed:begin -->` and
`<!-- speed:end -->`; the rest of the file is left as it is.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from benchmarks import run as R  # noqa: E402
from benchmarks.models import BENCH_ROOT, SPECS  # noqa: E402

CACHE = os.path.join(R.CACHE, "speed")
PROMPT = "The capital of France is"
BEGIN, END = "<!-- speed:begin -->", "<!-- speed:end -->"

# The "before" column: benchmarks/results.md of 2026-11-26 (GPT2-medium: the API worker's whole
# process, counts only after `refimpl prepare`) and issue 16 (Llama, warm).
BEFORE = {
    "gpt2-medium": {
        "float64": {"first": 6.04, "warm": 3.47, "warm_nocounts": 2.46, "rss": 675, "first_rss": 906,
                    "prepare": 159.0},
        "float32": {"first": 2.81, "warm": 2.07, "warm_nocounts": 1.49, "rss": 512, "first_rss": 486,
                    "prepare": 74.1},
        "tl": {"import": 12.4, "load": 12.7, "fwd": 0.83},
    },
    "llama-7b": {"float64": {"warm": 35.5}, "float32": {"warm": 31.3}},
    "llama-13b": {"float64": {"warm": 63.3}, "float32": {"warm": 56.5}},
}
TARGETS = {("gpt2-medium", "float64", "first"): 3.0, ("gpt2-medium", "float32", "first"): 2.0,
           ("gpt2-medium", "float64", "warm"): 1.5, ("gpt2-medium", "float32", "warm"): 1.0,
           ("llama-7b", "float64", "warm"): 25.0, ("llama-13b", "float64", "warm"): 45.0}


def log(msg: str) -> None:
    print(f"[speed {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_rec(model: str) -> dict:
    try:
        with open(os.path.join(CACHE, f"{model}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def save_rec(model: str, rec: dict) -> None:
    os.makedirs(CACHE, exist_ok=True)
    p = os.path.join(CACHE, f"{model}.json")
    with open(p + ".tmp", "w") as f:
        json.dump(rec, f, indent=1)
    os.replace(p + ".tmp", p)


def git_version() -> str:
    try:
        return subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def locate_run(model_dir: str, dtype: str, label: str) -> dict:
    """One whole `refimpl locate` process: wall, peak RSS, the report's own locate() seconds,
    whether the per-layer counts were in it."""
    la = os.getloadavg()[0]
    m = R.child([R.PY, "-m", "refimpl", "locate", "--model", model_dir, "--dtype", dtype, PROMPT], label)
    with open(os.path.join(R.LOGS, f"{label}.log")) as f:
        text = f.read()
    sec = re.findall(r"scored exactly for the top-K; ([0-9.]+) s\)", text)
    m["locate_s"] = float(sec[-1]) if sec else None
    m["counts"] = "FFN subvalues per layer" in text
    m["loadavg_before"] = la
    return m


def cold_read(model_dir: str) -> dict:
    """The floor of a cold run: every file of the model read once, sequentially, right after
    its pages were dropped from the page cache."""
    R.drop_page_cache(model_dir)
    la = os.getloadavg()[0]
    t0, n = time.perf_counter(), 0
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            with open(path, "rb", buffering=0) as f:
                while True:
                    b = f.read(16 << 20)
                    if not b:
                        break
                    n += len(b)
    t = time.perf_counter() - t0
    return {"wall_s": t, "bytes": n, "gb_per_s": n / 1e9 / t, "loadavg_before": la, "maxrss_mb": 0}


def series(rec: dict, key: str, n: int, fn) -> list:
    runs = rec.setdefault(key, [])
    while len(runs) < n:
        runs.append(fn(len(runs)))
    return runs


def measure(spec, opts) -> None:
    rec = load_rec(spec.name)
    if opts.fresh:
        rec = {}
    rec["version"], rec["machine"] = git_version(), R.machine()
    d = spec.canonical
    big = spec.name.startswith("llama")
    dtypes = opts.dtypes.split(",")

    def save():
        save_rec(spec.name, rec)

    for dt in dtypes:
        n = opts.runs
        if spec.name == "gpt2-medium" and "first" in opts.kinds:
            tmp = os.path.join(BENCH_ROOT, "canonical", f".speed-first-{spec.name}")

            def first(k, dt=dt):
                log(f"{spec.name} {dt}: convert, then the first locate ({k + 1}/{n})")
                shutil.rmtree(tmp, ignore_errors=True)
                conv = R.child([R.PY, "-m", "refimpl", "convert", spec.source, tmp, "--format", spec.fmt],
                               f"speed-{spec.name}-convert-{dt}-{k}")
                m = locate_run(tmp, dt, f"speed-{spec.name}-first-{dt}-{k}")
                m["convert_s"] = conv["wall_s"]
                return m
            if os.path.isdir(spec.source):
                series(rec, f"first_{dt}", n, first)
                save()
            shutil.rmtree(tmp, ignore_errors=True)
        if not big and "cold" in opts.kinds and "disk" not in rec:
            log(f"{spec.name}: cold sequential read of the model's files")
            rec["disk"] = [cold_read(d) for _ in range(3)]
            save()
        if not big and "cold" in opts.kinds:
            def cold(k, dt=dt):
                log(f"{spec.name} {dt}: cold locate ({k + 1}/{n})")
                R.drop_page_cache(d)
                return locate_run(d, dt, f"speed-{spec.name}-cold-{dt}-{k}")
            series(rec, f"cold_{dt}", n, cold)
            save()
        if "warm" in opts.kinds:
            if len(rec.get(f"warm_{dt}", [])) < n and not (spec.name == "llama-13b"):
                log(f"{spec.name} {dt}: untimed warm-up run")
                locate_run(d, dt, f"speed-{spec.name}-warmup-{dt}")

            def warm(k, dt=dt):
                log(f"{spec.name} {dt}: warm locate ({k + 1}/{n})")
                return locate_run(d, dt, f"speed-{spec.name}-warm-{dt}-{k}")
            series(rec, f"warm_{dt}", n, warm)
            save()
        if "pass" in opts.kinds and f"pass_{dt}" not in rec:
            log(f"{spec.name} {dt}: one x @ W pass over every weight matrix")
            m, r = R.worker("pass", f"speed-{spec.name}-pass-{dt}", "--model", d, "--dtype", dt,
                            "--reps", "1" if spec.name == "llama-13b" else "5", "--T", "6" if big else "5")
            rec[f"pass_{dt}"] = {**m, **r}
            save()
    if spec.name == "gpt2-medium" and "tl" in opts.kinds and "tl" not in rec:
        log(f"{spec.name}: TransformerLens (float32)")
        m, r = R.worker("tl", f"speed-{spec.name}-tl", "--model", d, "--prompt", PROMPT, "--reps", "5")
        rec["tl"] = {**m, **r}
        save()


# --- the section of results.md ----------------------------------------------------------------

def med(runs, key="wall_s"):
    return R.median([r.get(key) for r in runs]) if runs else None


def fs(x):
    return R.fmt_s(x)


def verdict(model, dt, kind, value):
    t = TARGETS.get((model, dt, kind))
    if t is None or value is None:
        return ""
    return f" (target <= {t:g} s: {'met' if value <= t else 'NOT met'})"


def section() -> str:
    out = [BEGIN, "## Speed: whole `refimpl locate` processes, before and after (issue 16)", ""]
    recs = {n: load_rec(n) for n in ("gpt2-medium", "llama-7b", "llama-13b")}
    any_rec = next((r for r in recs.values() if r), None)
    if any_rec is None:
        return "\n".join(out + ["(not measured yet: `python benchmarks/speed.py`)", END])
    mach = any_rec["machine"]
    out += [f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['ram_gb']} GB RAM; numpy {mach['numpy']}, "
            f"BLAS {mach['blas']}; Python {mach['python']}; measured {mach['date']} (code {any_rec['version']}). "
            "Every figure is the median of separate processes `python -m refimpl locate --model DIR --dtype D "
            f"{PROMPT!r}` (text report, default options, so the per-layer counts are included when the default "
            "report has them; no `refimpl prepare`, no cache of any kind), wall time around the whole process; "
            "peak RSS is the largest ru_maxrss of those processes. The 1-minute load average before each run is "
            "in the details below.", ""]
    g = recs["gpt2-medium"]
    if g:
        out += ["| GPT2-medium (fp32 weights) | before | after | target |", "|---|---|---|---|"]
        for dt in ("float64", "float32"):
            b = BEFORE["gpt2-medium"][dt]
            warm, cold, first = g.get(f"warm_{dt}", []), g.get(f"cold_{dt}", []), g.get(f"first_{dt}", [])
            counts = all(r.get("counts") for r in warm) if warm else None
            disk = g.get("disk")
            floor = (f"; reading the files alone takes {fs(med(disk))} at {R.median([x['gb_per_s'] for x in disk]):.2f} GB/s"
                     if disk else "")
            out.append(f"| {dt} first run, files not in the page cache | {fs(b['first'])} (no counts) | "
                       f"{fs(med(cold))} ({'with' if cold and all(r.get('counts') for r in cold) else 'no'} counts; "
                       f"n={len(cold)}{floor}) | {'<= 3 s' if dt == 'float64' else '<= 2 s'}"
                       f"{verdict('gpt2-medium', dt, 'first', med(cold))} |")
            if first:
                out.append(f"| {dt} first run right after `refimpl convert` | - | {fs(med(first))} (n={len(first)}; "
                           f"the conversion itself {fs(med(first, 'convert_s'))}) | "
                           f"{verdict('gpt2-medium', dt, 'first', med(first)).strip(' ()')} |")
            out.append(f"| {dt} warm | {fs(b['warm'])} with counts after a {fs(b['prepare'])} `refimpl prepare`; "
                       f"{fs(b['warm_nocounts'])} without counts | {fs(med(warm))} "
                       f"({'with' if counts else 'without'} counts; {fs(med(warm, 'locate_s'))} in locate(); n={len(warm)}) | "
                       f"{'<= 1.5 s' if dt == 'float64' else '<= 1 s'}{verdict('gpt2-medium', dt, 'warm', med(warm))} |")
            rss = max((r["maxrss_mb"] for r in warm), default=None)
            out.append(f"| {dt} peak RSS (warm) | {R.fmt_mb(b['rss'])} | {R.fmt_mb(rss)} | - |")
            p = g.get(f"pass_{dt}")
            if p and warm:
                out.append(f"| {dt}: one `x @ W` pass over every weight matrix (T={p['T']}, page cache) | - | "
                           f"{fs(p['pass_s'])} ({p['stored_bytes'] / 1e9:.2f} GB, {p['gflop']:.1f} GFLOP) | - |")
                out.append(f"| {dt}: warm locate / that pass | - | whole process {med(warm) / p['pass_s']:.1f}x; "
                           f"locate() alone {med(warm, 'locate_s') / p['pass_s']:.1f}x | <= 3x"
                           f"{' (met)' if med(warm) / p['pass_s'] <= 3 else ' (NOT met by the whole process)'} |")
        tl = g.get("tl")
        if tl:
            reps = tl["reps"]
            bt = BEFORE["gpt2-medium"]["tl"]
            out.append(f"| TransformerLens 3.9 float32, same weights: import / build+load / run_with_cache | "
                       f"{fs(bt['import'])} / {fs(bt['load'])} / {fs(bt['fwd'])} | {fs(tl['import_s'])} / "
                       f"{fs(tl['load_s'])} / {fs(R.median([r['forward_cache_s'] for r in reps]))} (process "
                       f"{fs(tl['wall_s'])}, {R.fmt_mb(tl['maxrss_mb'])}) | - |")
        out.append("")
    rows = []
    for n in ("llama-7b", "llama-13b"):
        r = recs[n]
        if not r:
            continue
        for dt in ("float64", "float32"):
            warm = r.get(f"warm_{dt}", [])
            if not warm:
                continue
            b = BEFORE[n][dt]
            rss = max((x["maxrss_mb"] for x in warm), default=None)
            brss = r.get(f"before_rss_{dt}")
            p = r.get(f"pass_{dt}")
            ratio = f"; {med(warm) / p['pass_s']:.1f}x one x @ W pass ({fs(p['pass_s'])})" if p else ""
            rows.append(f"| {SPECS[n].title} {dt} | {fs(b['warm'])}" + (f", peak RSS {R.fmt_mb(brss)}" if brss else "")
                        + f" | {fs(med(warm))} (n={len(warm)}), peak RSS {R.fmt_mb(rss)}{ratio} | "
                        + (f"<= {TARGETS[(n, dt, 'warm')]:g} s, RSS not higher{verdict(n, dt, 'warm', med(warm))}"
                           if (n, dt, "warm") in TARGETS else "-") + " |")
    if rows:
        out += ["| Llama (fp16 weights), warm as far as RAM allows | before | after | target |", "|---|---|---|---|"]
        out += rows + [""]
    out += ["Details (each run: wall s / peak RSS MB / load average before):", ""]
    for n, r in recs.items():
        for k, runs in r.items():
            if isinstance(runs, list) and runs and isinstance(runs[0], dict) and "wall_s" in runs[0]:
                out.append(f"- {n} {k}: " + ", ".join(f"{x['wall_s']:.2f}/{x['maxrss_mb']:.0f}/{x['loadavg_before']:.1f}"
                                                      for x in runs))
    out.append(END)
    return "\n".join(out)


def write_section(path: str) -> None:
    text = open(path).read() if os.path.exists(path) else "# refimpl benchmarks\n"
    sec = section()
    if BEGIN in text and END in text:
        a, b = text.index(BEGIN), text.index(END) + len(END)
        text = text[:a] + sec + text[b:]
    else:                                   # after the title line
        head, _, rest = text.partition("\n")
        text = head + "\n\n" + sec + "\n" + rest
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="gpt2-medium,llama-7b,llama-13b")
    p.add_argument("--dtypes", default="float64,float32")
    p.add_argument("--kinds", default="first,cold,warm,pass,tl", help="which runs: first,cold,warm,pass,tl")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--fresh", action="store_true", help="forget cached measurements of these models")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--out", default=os.path.join(HERE, "results.md"))
    opts = p.parse_args(argv)
    opts.kinds = set(opts.kinds.split(","))
    if not opts.report_only:
        for n in opts.models.split(","):
            spec = SPECS[n]
            if not os.path.exists(os.path.join(spec.canonical, "config.json")):
                log(f"{n}: no converted model at {spec.canonical}; skipped")
                continue
            measure(spec, opts)
            write_section(opts.out)
    write_section(opts.out)
    print(section())
    return 0


if __name__ == "__main__":
    sys.exit(main())
