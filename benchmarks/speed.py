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
- warm: after one untimed run;
- prepared (GPT2-medium): the optional `refimpl prepare` run once on a folder of hard links
  to the model's files (its time recorded), then warm runs as above on that folder.

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
# peak RSS of the code before this work (commit 06599c2), Llama-7B warm, measured in this session
# (the Llama runs had no counts then either)
BEFORE_RSS = {("llama-7b", "float64"): 4843788 / 1024, ("llama-7b", "float32"): 2991584 / 1024}
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


VARIANTS = {"nocounts": ["--counts", "no"], "bound": ["--share", "bound"], "exact": []}
VARIANT_TEXT = {"nocounts": "without the per-layer counts (--counts no)",
                "bound": "with the exact per-layer counts, top-10 shares as certified bounds (--share bound)",
                "exact": "the default report: exact counts and exact top-10 shares"}


def locate_run(model_dir: str, dtype: str, label: str, extra=()) -> dict:
    """One whole `refimpl locate` process: wall, peak RSS, the report's own locate() seconds,
    whether the per-layer counts were in it."""
    la = os.getloadavg()[0]
    m = R.child([R.PY, "-m", "refimpl", "locate", "--model", model_dir, "--dtype", dtype, PROMPT, *extra], label)
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


# what is measured, in order: (model, kind, dtype, variant, runs)
PLAN = [
    ("gpt2-medium", "warm", "float64", "nocounts", 5), ("gpt2-medium", "warm", "float32", "nocounts", 5),
    ("gpt2-medium", "warm", "float64", "bound", 5), ("gpt2-medium", "warm", "float32", "bound", 5),
    ("gpt2-medium", "pass", "float64", None, 5), ("gpt2-medium", "pass", "float32", None, 5),
    ("gpt2-medium", "disk", None, None, 3),
    ("gpt2-medium", "cold", "float64", "nocounts", 5), ("gpt2-medium", "cold", "float32", "nocounts", 5),
    ("gpt2-medium", "cold", "float64", "bound", 5), ("gpt2-medium", "cold", "float32", "bound", 5),
    ("gpt2-medium", "tl", None, None, 5),
    ("gpt2-medium", "first", "float64", "bound", 3), ("gpt2-medium", "first", "float32", "bound", 3),
    ("gpt2-medium", "prepared", "float64", "bound", 5), ("gpt2-medium", "prepared", "float32", "bound", 5),
    ("llama-7b", "warm", "float64", "nocounts", 5), ("llama-7b", "pass", "float64", None, 2),
    ("llama-13b", "warm", "float64", "nocounts", 3), ("llama-13b", "pass", "float64", None, 1),
    ("llama-7b", "warm", "float32", "nocounts", 3), ("llama-7b", "warm", "float32", "bound", 2),
    ("gpt2-medium", "warm", "float32", "exact", 1), ("gpt2-medium", "warm", "float64", "exact", 1),
    ("llama-13b", "warm", "float32", "nocounts", 2), ("llama-13b", "warm", "float32", "bound", 1),
]


def measure_one(spec, kind, dt, variant, n, opts) -> None:
    rec = load_rec(spec.name)
    rec["version"], rec["machine"] = git_version(), R.machine()
    d, big = spec.canonical, spec.name.startswith("llama")
    key = "_".join(x for x in (kind, dt, variant) if x)
    extra = VARIANTS.get(variant, [])

    def save():
        save_rec(spec.name, rec)
    if kind == "disk":
        if "disk" not in rec:
            log(f"{spec.name}: cold sequential read of the model's files")
            rec["disk"] = [cold_read(d) for _ in range(n)]
            save()
        return
    if kind == "pass":
        if key not in rec:
            log(f"{spec.name} {dt}: one x @ W pass over every weight matrix")
            m, r = R.worker("pass", f"speed-{spec.name}-{key}", "--model", d, "--dtype", dt, "--reps", str(n),
                            "--T", "6" if big else "5")
            rec[key] = {**m, **r}
            save()
        return
    if kind == "tl":
        if "tl" not in rec:
            log(f"{spec.name}: TransformerLens (float32)")
            m, r = R.worker("tl", f"speed-{spec.name}-tl", "--model", d, "--prompt", PROMPT, "--reps", str(n))
            rec["tl"] = {**m, **r}
            save()
        return
    runs = rec.setdefault(key, [])
    if kind == "warm" and len(runs) < n and spec.name != "llama-13b":
        log(f"{spec.name} {key}: untimed warm-up run")
        locate_run(d, dt, f"speed-{spec.name}-warmup-{key}", extra)
    while len(runs) < n:
        k = len(runs)
        log(f"{spec.name} {key} ({k + 1}/{n})")
        if kind == "cold":
            R.drop_page_cache(d)
            runs.append(locate_run(d, dt, f"speed-{spec.name}-{key}-{k}", extra))
        elif kind == "prepared":
            tmp = os.path.join(BENCH_ROOT, "canonical", f".speed-prepared-{spec.name}-{dt}")
            if k == 0 or not os.path.isdir(os.path.join(tmp, "cache")):
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
                for name in os.listdir(d):                                  # the same files (hard links)
                    if os.path.isfile(os.path.join(d, name)):
                        os.link(os.path.join(d, name), os.path.join(tmp, name))
                la = os.getloadavg()[0]
                prep = R.child([R.PY, "-m", "refimpl", "prepare", "--model", tmp, "--dtype", dt, "--quiet"],
                               f"speed-{spec.name}-prepare-{key}")
                rec.setdefault(f"{key}_prepare", []).append({**prep, "loadavg_before": la})
                locate_run(tmp, dt, f"speed-{spec.name}-warmup-{key}", extra)
            runs.append(locate_run(tmp, dt, f"speed-{spec.name}-{key}-{k}", extra))
            if len(runs) == n:
                shutil.rmtree(tmp, ignore_errors=True)
        elif kind == "first":
            if not os.path.isdir(spec.source):
                log(f"{spec.name}: no source at {spec.source}; first-after-convert runs skipped")
                break
            tmp = os.path.join(BENCH_ROOT, "canonical", f".speed-first-{spec.name}")
            shutil.rmtree(tmp, ignore_errors=True)
            conv = R.child([R.PY, "-m", "refimpl", "convert", spec.source, tmp, "--format", spec.fmt],
                           f"speed-{spec.name}-convert-{key}-{k}")
            m = locate_run(tmp, dt, f"speed-{spec.name}-{key}-{k}", extra)
            m["convert_s"] = conv["wall_s"]
            runs.append(m)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            runs.append(locate_run(d, dt, f"speed-{spec.name}-{key}-{k}", extra))
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


def _row(label, before, runs, target_key=None, extra=""):
    if not runs:
        return None
    m = med(runs)
    tgt = TARGETS.get(target_key) if target_key else None
    verdict = "-" if tgt is None else f"<= {tgt:g} s: {'met' if m <= tgt else 'NOT met'}"
    loc = med(runs, "locate_s")
    return (f"| {label} | {before} | {fs(m)} (n={len(runs)}" + (f"; {fs(loc)} in locate()" if loc else "")
            + f"; peak RSS {R.fmt_mb(max(r['maxrss_mb'] for r in runs))}{extra}) | {verdict} |")


def section() -> str:
    out = [BEGIN, "## Speed: whole `refimpl locate` processes, before and after (issue 16)", ""]
    recs = {n: load_rec(n) for n in ("gpt2-medium", "llama-7b", "llama-13b")}
    any_rec = next((r for r in recs.values() if r), None)
    if any_rec is None:
        return "\n".join(out + ["(not measured yet: `python benchmarks/speed.py`)", END])
    mach = any_rec["machine"]
    out += [f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['ram_gb']} GB RAM; numpy {mach['numpy']}, "
            f"BLAS {mach['blas']}; Python {mach['python']}; measured {mach['date']} (code {any_rec['version']}). "
            "Every figure is the median of n separate processes `python -m refimpl locate --model DIR --dtype D "
            f"{PROMPT!r} [options]` (text report; no `refimpl prepare`, no cache of any kind), wall time around "
            "the whole process (interpreter, imports, tokenizer, weights, every part of the report, exit); peak "
            "RSS is the largest ru_maxrss of those processes. Warm: after one untimed run, weights in the page "
            "cache. Cold: the model's files dropped from the page cache before each run. The 1-minute load "
            "average before each run is in the details. \"Before\" is benchmarks/results.md of 2026-11-26 "
            "(whole processes of the API worker; counts only after a `refimpl prepare`) and issue 16.", ""]
    g = recs["gpt2-medium"]
    if g:
        out += ["| GPT2-medium (fp32 weights) | before | after | target |", "|---|---|---|---|"]
        for dt in ("float64", "float32"):
            b = BEFORE["gpt2-medium"][dt]
            rows = [
                _row(f"{dt} warm, {VARIANT_TEXT['nocounts']}", f"{fs(b['warm_nocounts'])}", g.get(f"warm_{dt}_nocounts")),
                _row(f"{dt} warm, {VARIANT_TEXT['bound']}", f"{fs(b['warm'])} (exact counts, share brackets) after a "
                     f"{fs(b['prepare'])} `refimpl prepare`", g.get(f"warm_{dt}_bound"), ("gpt2-medium", dt, "warm")),
                _row(f"{dt} warm, {VARIANT_TEXT['exact']}", "-", g.get(f"warm_{dt}_exact")),
                _row(f"{dt} cold, {VARIANT_TEXT['nocounts']}", f"{fs(b['first'])} (first run: cold, no counts)",
                     g.get(f"cold_{dt}_nocounts")),
                _row(f"{dt} cold, {VARIANT_TEXT['bound']}", "- (counts needed `prepare`)", g.get(f"cold_{dt}_bound"),
                     ("gpt2-medium", dt, "first")),
                _row(f"{dt} warm after an optional `refimpl prepare`, {VARIANT_TEXT['bound']}",
                     f"{fs(b['warm'])} after a {fs(b['prepare'])} `refimpl prepare`", g.get(f"prepared_{dt}_bound"),
                     ("gpt2-medium", dt, "warm"),
                     f"; the prepare itself {fs(R.median([x['wall_s'] for x in g[f'prepared_{dt}_bound_prepare']]))}"
                     if g.get(f"prepared_{dt}_bound_prepare") else ""),
                _row(f"{dt} right after `refimpl convert`, {VARIANT_TEXT['bound']}", "-", g.get(f"first_{dt}_bound"),
                     ("gpt2-medium", dt, "first"),
                     f"; the conversion itself {fs(med(g.get(f'first_{dt}_bound', []), 'convert_s'))}"
                     if g.get(f"first_{dt}_bound") else ""),
            ]
            out += [r for r in rows if r]
            p = g.get(f"pass_{dt}")
            if p:
                out.append(f"| {dt}: one `x @ W` pass over every weight matrix (T={p['T']}, page cache warm, in-process) "
                           f"| - | {fs(p['pass_s'])} ({p['stored_bytes'] / 1e9:.2f} GB stored, {p['gflop']:.1f} GFLOP) | - |")
                for v in ("nocounts", "bound"):
                    w = g.get(f"warm_{dt}_{v}")
                    if w:
                        r1, r2 = med(w) / p["pass_s"], med(w, "locate_s") / p["pass_s"]
                        out.append(f"| {dt}: warm locate {VARIANT_TEXT[v].split(' (')[0]} / that pass | - | whole "
                                   f"process {r1:.1f}x; locate() alone {r2:.1f}x | <= 3x: "
                                   f"{'met' if r1 <= 3 else 'met by locate() alone' if r2 <= 3 else 'NOT met'} |")
        disk = g.get("disk")
        if disk:
            out.append(f"| the model's files read sequentially from disk (page cache dropped) | - | {fs(med(disk))} "
                       f"({R.median([x['gb_per_s'] for x in disk]):.2f} GB/s, n={len(disk)}): the floor of a cold run | - |")
        tl = g.get("tl")
        if tl:
            reps = tl["reps"]
            bt = BEFORE["gpt2-medium"]["tl"]
            out.append(f"| TransformerLens 3.9 float32, same weights: import / build+load / run_with_cache (median of "
                       f"{len(reps)}) | {fs(bt['import'])} / {fs(bt['load'])} / {fs(bt['fwd'])} | {fs(tl['import_s'])} / "
                       f"{fs(tl['load_s'])} / {fs(R.median([r['forward_cache_s'] for r in reps]))} (process "
                       f"{fs(tl['wall_s'])}, {R.fmt_mb(tl['maxrss_mb'])}; no exact scores) | - |")
        out.append("")
    rows = []
    for n in ("llama-7b", "llama-13b"):
        r = recs[n]
        for dt in ("float64", "float32"):
            warm = r.get(f"warm_{dt}_nocounts", []) if r else []
            if not warm:
                continue
            b = BEFORE[n][dt]
            brss = BEFORE_RSS.get((n, dt))
            p = r.get(f"pass_{dt}")
            ratio = f"; {med(warm) / p['pass_s']:.1f}x one x @ W pass ({fs(p['pass_s'])})" if p else ""
            rss = max(x["maxrss_mb"] for x in warm)
            tgt = TARGETS.get((n, dt, "warm"))
            verdict = "-" if tgt is None else (f"<= {tgt:g} s: {'met' if med(warm) <= tgt else 'NOT met'}; RSS "
                                              f"{'not higher' if brss and rss <= brss * 1.02 else 'higher' if brss else '?'}")
            rows.append(f"| {SPECS[n].title} {dt} | {fs(b['warm'])}" + (f", peak RSS {R.fmt_mb(brss)}" if brss else "")
                        + f" | {fs(med(warm))} (n={len(warm)}; {fs(med(warm, 'locate_s'))} in locate()), peak RSS "
                        f"{R.fmt_mb(rss)}{ratio} | {verdict} |")
    if rows:
        out += ["| Llama (fp16 weights), warm as far as RAM allows, without the per-layer counts (as before) | before | "
                "after | target |", "|---|---|---|---|"] + rows + [""]
    out += ["Details (each run: wall s / peak RSS MB / load average before):", ""]
    for n, r in recs.items():
        for k, runs in r.items():
            if isinstance(runs, list) and runs and isinstance(runs[0], dict) and "wall_s" in runs[0]:
                out.append(f"- {n} {k}: " + ", ".join(
                    f"{x['wall_s']:.2f}/{x['maxrss_mb']:.0f}/" + ("?" if x.get("loadavg_before") is None
                                                                  else f"{x['loadavg_before']:.1f}") for x in runs))
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
    p.add_argument("--kinds", default="first,cold,warm,pass,tl,disk,prepared",
                   help="which runs: first,cold,warm,pass,tl,disk,prepared")
    p.add_argument("--runs", type=int, default=None, help="at most this many runs per figure (default: PLAN's)")
    p.add_argument("--deadline", type=float, default=None, help="unix time after which nothing new is started")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--out", default=os.path.join(HERE, "results.md"))
    opts = p.parse_args(argv)
    opts.kinds = set(opts.kinds.split(","))
    opts.fresh = False
    if not opts.report_only:
        models = opts.models.split(",")
        for name, kind, dt, variant, n in PLAN:
            if name not in models or kind not in opts.kinds:
                continue
            spec = SPECS[name]
            if not os.path.exists(os.path.join(spec.canonical, "config.json")):
                log(f"{name}: no converted model at {spec.canonical}; skipped")
                continue
            if opts.deadline and time.time() > opts.deadline:
                log("deadline reached; the rest is not measured")
                break
            measure_one(spec, kind, dt, variant, n if opts.runs is None else min(n, opts.runs), opts)
            write_section(opts.out)
    write_section(opts.out)
    print(section())
    return 0


if __name__ == "__main__":
    sys.exit(main())
