#!/usr/bin/env python
"""All benchmarks, side by side, in one run (see benchmarks/README.md).

    python benchmarks/run.py                 # everything; cached steps are not repeated
    python benchmarks/run.py --fresh         # re-measure everything except the conversions
    python benchmarks/run.py --models gpt2-medium,baevski-wiki103 --quick

Per model: generate the synthetic source (synth.py) and convert it with `refimpl convert`
(subprocess: wall time and peak RSS); load; `locate` in float64 and float32, each in a
fresh process, the first run with the range cache removed and the model's pages dropped
from the OS page cache, then warm runs (median); `--exhaustive` (run, or estimated from a
few layers for the Llama models), its ratio to the default, and whether both give the same
top-K; TransformerLens on GPT2-medium; fp16 upcast throughput; a phase profile of locate.
Prints the markdown table and writes benchmarks/results.md. Measurements are cached as JSON
under benchmarks/cache/ (git-ignored); checkpoints live in $REFIMPL_BENCH_ROOT (/work/bench).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from benchmarks.models import BENCH_ROOT, CONVERT_ORDER, ORDER, SPECS  # noqa: E402

CACHE = os.environ.get("REFIMPL_BENCH_CACHE", os.path.join(HERE, "cache"))
LOGS = os.path.join(CACHE, "logs")
PY = sys.executable
DISK_MARGIN_GB = 4.0
SKIPPABLE = ("convert", "locate", "exhaustive", "tl", "upcast", "profile", "ops", "variants", "batching")
VARIANTS = {"OPENBLAS_NUM_THREADS=1": {"OPENBLAS_NUM_THREADS": "1"}}


def log(msg: str) -> None:
    print(f"[run {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- child processes ------------------------------------------------------------------------

def _sample_rss(pid: int, peak: dict, stop: threading.Event) -> None:
    """Peak RssAnon / RssFile of a child, sampled every 50 ms (ru_maxrss is exact but total)."""
    path = f"/proc/{pid}/status"
    while not stop.is_set():
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith(("RssAnon:", "RssFile:")):
                        k, v = line.split(":")
                        peak[k] = max(peak.get(k, 0), int(v.split()[0]) // 1024)
        except OSError:
            return
        stop.wait(0.05)


def child(cmd: list[str], label: str, env: dict | None = None) -> dict:
    """Run cmd; wall time, exact peak RSS (wait4's ru_maxrss), sampled anon/file peaks."""
    os.makedirs(LOGS, exist_ok=True)
    logf = open(os.path.join(LOGS, f"{label}.log"), "w")
    logf.write(" ".join(cmd) + "\n")
    logf.flush()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO,
                         env=None if env is None else {**os.environ, **env})
    peak, stop = {}, threading.Event()
    th = threading.Thread(target=_sample_rss, args=(p.pid, peak, stop), daemon=True)
    th.start()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    logf.close()
    out = {"wall_s": wall, "maxrss_mb": ru.ru_maxrss / 1024, "user_s": ru.ru_utime, "sys_s": ru.ru_stime,
           "peak_anon_mb": peak.get("RssAnon"), "peak_file_mb": peak.get("RssFile"), "rc": p.returncode,
           "loadavg_before": None}
    if p.returncode != 0:
        with open(os.path.join(LOGS, f"{label}.log")) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{label} failed (exit {p.returncode}):\n{tail}")
    return out


def worker(task: str, label: str, *args: str, env: dict | None = None) -> tuple[dict, dict]:
    """Run benchmarks/worker.py TASK in a child; (process measurement, the JSON it wrote)."""
    out = os.path.join(CACHE, "tmp", f"{label}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    la = os.getloadavg()[0]
    m = child([PY, os.path.join(HERE, "worker.py"), task, *args, "--out", out], label, env)
    m["loadavg_before"] = la
    with open(out) as f:
        return m, json.load(f)


# --- cache ------------------------------------------------------------------------------------

def _path(model: str, key: str) -> str:
    return os.path.join(CACHE, "results", model, f"{key}.json")


def get(model: str, key: str):
    try:
        with open(_path(model, key)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def put(model: str, key: str, value) -> None:
    p = _path(model, key)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(p + ".tmp", p)


# --- helpers ------------------------------------------------------------------------------------

def dir_bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


def drop_page_cache(d: str) -> None:
    """Evict a directory's files from the OS page cache (POSIX_FADV_DONTNEED; clean pages only)."""
    for r, _, fs in os.walk(d):
        for f in fs:
            try:
                fd = os.open(os.path.join(r, f), os.O_RDONLY)
                try:
                    os.fsync(fd)
                except OSError:
                    pass
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
            except OSError:
                pass


def free_gb(path: str) -> float:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free / 1e9


def prompt_args(spec) -> list[str]:
    return ["--ids", ",".join(map(str, spec.ids))] if spec.ids else ["--prompt", spec.prompt]


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# --- steps -----------------------------------------------------------------------------------------

def step_convert(spec, opts) -> dict | None:
    done = os.path.exists(os.path.join(spec.canonical, "config.json"))
    cached = get(spec.name, "convert")
    if done and cached and not opts.reconvert:
        return cached
    if done and not opts.reconvert and not os.path.exists(os.path.join(spec.source, ".complete")) and spec.large:
        log(f"{spec.name}: canonical directory exists, conversion not measured (use --reconvert to measure)")
        return cached
    if opts.reconvert and done:
        shutil.rmtree(spec.canonical)            # it is rewritten; keeping it would need the space twice
    need = (0 if os.path.exists(os.path.join(spec.source, ".complete")) else spec.source_gb) + spec.canonical_gb
    if spec.name == "llama-13b" and not done and free_gb(BENCH_ROOT) < need + DISK_MARGIN_GB \
            and free_gb(BENCH_ROOT) >= spec.canonical_gb + DISK_MARGIN_GB:
        # source + canonical do not fit, the canonical alone does: write it directly
        # (synth.llama_meta_canonical: the real converter on generated slices; same tensors)
        log(f"{spec.name}: {need:.0f} GB for source + conversion do not fit; writing the converted model "
            f"directly (synth.py --canonical; the conversion itself is not measured)")
        m = child([PY, os.path.join(HERE, "synth.py"), spec.name, "--canonical"], f"{spec.name}-synth-canonical")
        m["direct"] = True
        m["canonical_bytes"] = dir_bytes(spec.canonical)
        put(spec.name, "convert", m)
        return m
    if free_gb(BENCH_ROOT) < need + DISK_MARGIN_GB:
        log(f"{spec.name}: SKIPPED conversion: needs ~{need:.0f} GB + {DISK_MARGIN_GB:.0f} GB margin, "
            f"{free_gb(BENCH_ROOT):.0f} GB free")
        return cached
    log(f"{spec.name}: source (synth.py)")
    child([PY, os.path.join(HERE, "synth.py"), spec.name] + (["--force"] if opts.reconvert else []),
          f"{spec.name}-synth")
    src_bytes = dir_bytes(spec.source)
    drop_page_cache(spec.source)
    log(f"{spec.name}: refimpl convert ({src_bytes / 1e9:.1f} GB source)")
    m = child([PY, "-m", "refimpl", "convert", spec.source, spec.canonical, "--format", spec.fmt, "--force"],
              f"{spec.name}-convert")
    m["source_bytes"], m["canonical_bytes"] = src_bytes, dir_bytes(spec.canonical)
    m["loadavg_after"] = os.getloadavg()[0]
    put(spec.name, "convert", m)
    log(f"{spec.name}: converted in {m['wall_s']:.1f} s, peak RSS {m['maxrss_mb']:.0f} MB")
    if spec.large and not opts.keep_sources:
        shutil.rmtree(spec.source)
        log(f"{spec.name}: source deleted ({src_bytes / 1e9:.1f} GB freed)")
    return m


@contextlib.contextmanager
def without_cache(spec, keep_new: bool = False):
    """Run with the model's cache/ (ranges, weight copies) moved aside; afterwards put back what
    the run did not recreate, and keep (keep_new) or discard what it wrote."""
    cache, aside = os.path.join(spec.canonical, "cache"), os.path.join(spec.canonical, ".cache-aside")
    shutil.rmtree(aside, ignore_errors=True)
    if os.path.isdir(cache):
        os.rename(cache, aside)
    try:
        yield
    finally:
        if not keep_new:
            shutil.rmtree(cache, ignore_errors=True)
        if os.path.isdir(aside):
            os.makedirs(cache, exist_ok=True)
            for f in os.listdir(aside):
                if not os.path.exists(os.path.join(cache, f)):
                    os.rename(os.path.join(aside, f), os.path.join(cache, f))
            shutil.rmtree(aside, ignore_errors=True)


def step_locate(spec, dtype: str, opts) -> dict:
    key = f"locate-{dtype}"
    rec = get(spec.name, key) or {}
    runs = opts.runs or spec.runs
    args = ["--model", spec.canonical, "--dtype", dtype] + prompt_args(spec)
    if "first" not in rec:
        drop_page_cache(spec.canonical)
        log(f"{spec.name}: locate {dtype}, first run (cold page cache, no range or weight cache)")
        with without_cache(spec):
            m, r = worker("locate", f"{spec.name}-locate-{dtype}-first", *args)
        rec["first"] = {**m, **{k: v for k, v in r.items() if k != "result"}}
        rec["result_first"] = r["result"]
        put(spec.name, key, rec)
    if spec.prepare and "prepare" not in rec:
        log(f"{spec.name}: refimpl prepare --dtype {dtype} (bracket constants, weight cache)")
        with without_cache(spec, keep_new=True):
            rec["prepare"] = child([PY, "-m", "refimpl", "prepare", "--model", spec.canonical, "--dtype", dtype],
                                   f"{spec.name}-prepare-{dtype}")
        put(spec.name, key, rec)
    warm = rec.setdefault("warm", [])
    while len(warm) < runs:
        log(f"{spec.name}: locate {dtype}, warm run {len(warm) + 1}/{runs}")
        m, r = worker("locate", f"{spec.name}-locate-{dtype}-warm{len(warm)}", *args)
        warm.append({**m, **{k: v for k, v in r.items() if k != "result"}})
        rec["result"] = r["result"]
        put(spec.name, key, rec)
    # the top-K report alone (what the GPT2-medium target is about), where the warm
    # runs above also computed the per-layer counts
    if rec["result"].get("ffn_counts") is not None:
        bare = rec.setdefault("warm_no_counts", [])
        while len(bare) < runs:
            log(f"{spec.name}: locate {dtype} --counts no, warm run {len(bare) + 1}/{runs}")
            m, r = worker("locate", f"{spec.name}-locate-{dtype}-nocounts{len(bare)}", *args, "--counts", "no")
            bare.append({**m, **{k: v for k, v in r.items() if k != "result"}})
            put(spec.name, key, rec)
    return rec


def step_exhaustive(spec, opts, default: dict) -> dict:
    rec = get(spec.name, "exhaustive-float64") or {}
    args = ["--model", spec.canonical, "--dtype", "float64"] + prompt_args(spec)
    mode = "estimate" if (spec.exhaustive == "estimate" or opts.quick) else "run"
    if mode == "run":
        runs = opts.exhaustive_runs or spec.exhaustive_runs
        rec.setdefault("runs", [])
        rec.pop("estimate", None)
        while len(rec["runs"]) < runs:
            log(f"{spec.name}: locate --exhaustive float64, run {len(rec['runs']) + 1}/{runs}")
            m, r = worker("locate", f"{spec.name}-exhaustive-{len(rec['runs'])}", *args, "--exhaustive")
            rec["runs"].append({**m, **{k: v for k, v in r.items() if k != "result"}})
            rec["result"] = r["result"]
            put(spec.name, "exhaustive-float64", rec)
    elif "estimate" not in rec:
        log(f"{spec.name}: exhaustive estimate (timing a sample of neurons in a few layers)")
        m, r = worker("estimate", f"{spec.name}-estimate", *args, "--layers", "3", "--sample", "2048")
        rec["estimate"] = {**m, **r}
        put(spec.name, "exhaustive-float64", rec)
    return rec


def identical(a: dict, b: dict) -> dict:
    """Default vs exhaustive: same FFN top-K (layer, neuron) and values within 1e-12 (float64)."""
    ta, tb = a["ffn_top"], b["ffn_top"]
    same_idx = [(x["layer"], x["index"]) for x in ta] == [(x["layer"], x["index"]) for x in tb]
    diff = max((abs(x["log_prob_increase"] - y["log_prob_increase"]) for x, y in zip(ta, tb)), default=0.0)
    pdiff = max((abs(x["prob_increase"] - y["prob_increase"]) for x, y in zip(ta, tb)), default=0.0)
    out = {"same_indices": same_idx, "max_abs_diff_C": diff, "max_abs_diff_P": pdiff,
           "identical": bool(same_idx and diff <= 1e-12 and pdiff <= 1e-12)}
    aa, ab = a.get("attn_top"), b.get("attn_top")
    if aa is not None and ab is not None:
        out["same_attn"] = [(x["layer"], x["index"]) for x in aa] == [(x["layer"], x["index"]) for x in ab] and \
            max((abs(x["log_prob_increase"] - y["log_prob_increase"]) for x, y in zip(aa, ab)), default=0.0) <= 1e-12
        out["identical"] = out["identical"] and out["same_attn"]
    ca, cb = a.get("ffn_counts"), b.get("ffn_counts")
    if ca and cb:
        out["same_counts"] = all((x["activated"], x["helpful"], x["unhelpful"]) == (y["activated"], y["helpful"], y["unhelpful"])
                                 for x, y in zip(ca, cb))
    return out


def step_tl(spec, opts) -> dict:
    rec = get(spec.name, "tl")
    if rec is None:
        log(f"{spec.name}: TransformerLens (float32): run_with_cache + per-neuron DLA")
        m, r = worker("tl", f"{spec.name}-tl", "--model", spec.canonical, *prompt_args(spec),
                      "--reps", "1" if opts.quick else "3", *([] if opts.quick else ["--full-dla"]))
        rec = {**m, **r}
        put(spec.name, "tl", rec)
    return rec


def step_upcast(opts) -> dict:
    rec = get("_machine", "upcast")
    if rec is None:
        model = SPECS["llama-7b"].canonical
        log("fp16 upcast throughput")
        m, r = worker("upcast", "upcast", *(["--model", model] if os.path.isdir(model) else []))
        rec = {**m, **r}
        put("_machine", "upcast", rec)
    return rec


def step_profile(spec, dtype: str, opts) -> dict:
    key = f"profile-{dtype}"
    rec = get(spec.name, key)
    if rec is None:
        log(f"{spec.name}: phase profile of locate ({dtype}, warm)")
        # one untimed run first: other models' runs may have evicted this one from the page cache
        worker("locate", f"{spec.name}-profile-warmup-{dtype}", "--model", spec.canonical, "--dtype", dtype,
               *prompt_args(spec))
        m, r = worker("profile", f"{spec.name}-profile-{dtype}", "--model", spec.canonical, "--dtype", dtype,
                      *prompt_args(spec))
        rec = {**m, **r}
        put(spec.name, key, rec)
    return rec


def step_ops(spec, opts) -> dict:
    rec = get(spec.name, "ops") or {}
    for v, env in [("default", None)] + list(VARIANTS.items()):
        if v not in rec:
            log(f"{spec.name}: forward building blocks, one layer ({v})")
            m, r = worker("ops", f"{spec.name}-ops-{len(rec)}", "--model", spec.canonical, "--dtype", "float64",
                          *prompt_args(spec), env=env)
            rec[v] = r
            put(spec.name, "ops", rec)
    return rec


def step_batching(spec, opts) -> dict:
    rec = get(spec.name, "batching")
    if rec is None:
        log(f"{spec.name}: batched bounds / scoring prototypes (float64)")
        m, r = worker("batching", f"{spec.name}-batching", "--model", spec.canonical, "--dtype", "float64",
                      *prompt_args(spec))
        rec = {**m, **r}
        put(spec.name, "batching", rec)
    return rec


def step_variants(spec, opts) -> dict:
    """Warm float64 locate under other settings (one run each)."""
    rec = get(spec.name, "variants") or {}
    for v, env in VARIANTS.items():
        if v not in rec:
            log(f"{spec.name}: locate float64 warm with {v}")
            m, r = worker("locate", f"{spec.name}-variant-{len(rec)}", "--model", spec.canonical, "--dtype",
                          "float64", *prompt_args(spec), env=env)
            rec[v] = {**m, **{k: x for k, x in r.items() if k != "result"}, "same_top": r["result"]["ffn_top"]}
            put(spec.name, "variants", rec)
    return rec


# --- report ----------------------------------------------------------------------------------------

def machine() -> dict:
    import numpy as np
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1]) / 1024 ** 2
    except (OSError, StopIteration):
        pass
    blas = "?"
    try:
        cfg = np.show_config(mode="dicts")
        b = cfg["Build Dependencies"]["blas"]
        blas = f"{b.get('name')} {b.get('version')}"
    except Exception:
        pass
    try:
        import threadpoolctl
        info = threadpoolctl.threadpool_info()
        blas += "; threads " + ", ".join(f"{i['internal_api']}={i['num_threads']}" for i in info)
    except Exception:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(mem, 1), "numpy": np.__version__, "blas": blas,
            "python": platform.python_version(), "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "loadavg": os.getloadavg()}


def fmt_s(x, est=False):
    if x is None:
        return "-"
    s = f"{x:.2f} s" if x < 10 else f"{x:.1f} s" if x < 100 else f"{x:.0f} s"
    if x >= 600:
        s += f" ({x / 3600:.1f} h)" if x >= 3600 else f" ({x / 60:.0f} min)"
    return ("~" + s + " (est.)") if est else s


def fmt_mb(x):
    return "-" if x is None else f"{x / 1024:.2f} GB" if x >= 1024 else f"{x:.0f} MB"


def summarize(name: str) -> dict:
    spec = SPECS[name]
    row = {"model": spec.title}
    conv = get(name, "convert")
    row["convert"] = conv
    for dt in ("float64", "float32"):
        rec = get(name, f"locate-{dt}")
        if not rec:
            continue
        warm = rec.get("warm", [])
        row[dt] = {"first_wall": rec["first"]["wall_s"], "first_rss": rec["first"]["maxrss_mb"],
                   "first_locate": rec["first"]["locate_s"],
                   "warm_wall": median([w["wall_s"] for w in warm]),
                   "warm_locate": median([w["locate_s"] for w in warm]),
                   "warm_rss": max((w["maxrss_mb"] for w in warm), default=None),
                   "warm_anon": max((w["peak_anon_mb"] or 0 for w in warm), default=None),
                   "load": median([w["load_s"] for w in warm]), "n": len(warm),
                   "prepare": rec.get("prepare"),
                   "bare_wall": median([w["wall_s"] for w in rec.get("warm_no_counts", [])]),
                   "bare_n": len(rec.get("warm_no_counts", [])),
                   "scored": rec.get("result", {}).get("ffn_scored"),
                   "counts": rec.get("result", {}).get("ffn_counts") is not None}
    ex = get(name, "exhaustive-float64")
    d64 = get(name, "locate-float64")
    if ex and d64 and "float64" in row:
        if ex.get("runs"):
            row["exh"] = median([r["wall_s"] for r in ex["runs"]])
            row["exh_est"] = False
            row["exh_n"] = len(ex["runs"])
            row["ident"] = identical(d64["result"], ex["result"])
        elif ex.get("estimate"):
            e = ex["estimate"]
            row["exh"] = row["float64"]["warm_wall"] + e["scoring_all_layers_s"]
            row["exh_est"] = True
            row["exh_detail"] = e
        if row.get("exh"):
            row["ratio"] = row["exh"] / row["float64"]["warm_wall"]
    tl = get(name, "tl")
    if tl:
        reps = tl["reps"]
        row["tl"] = {"import": tl["import_s"], "load": tl["load_s"], "wall": tl["wall_s"], "rss": tl["maxrss_mb"],
                     "fwd": median([r["forward_cache_s"] for r in reps]),
                     "dla": median([r["dla_target_s"] for r in reps]),
                     "full": median([r.get("dla_all_tokens_s") for r in reps]), "top": reps[-1]["top"]}
    return row


TARGETS = {"gpt2-medium": "locate <= 2 s (warm); exhaustive >= 20x default, identical",
           "llama-7b": "locate <= 60 s; peak RSS <= 6 GB", "llama-13b": "locate <= 150 s; peak RSS <= 8 GB; "
           "conversion streams tensor by tensor", "baevski-wiki103": "-"}


def warm_cell(d: dict) -> str:
    if not d:
        return "-"
    s = f"{fmt_s(d.get('warm_wall'))} ({fmt_s(d.get('warm_locate'))} in locate)"
    if d.get("bare_wall"):
        s += f"; without counts {fmt_s(d['bare_wall'])}"
    return s


def table(names) -> str:
    h = ("| model | convert (wall / peak RSS) | load | prepare f64 / f32 | locate f64 first | locate f64 warm | peak RSS f64 | "
         "locate f32 first | locate f32 warm | peak RSS f32 | exhaustive f64 | ratio | identical | "
         "TransformerLens f32 |")
    lines = [h, "|" + "---|" * (h.count("|") - 1)]
    for n in names:
        r = summarize(n)
        c = r.get("convert")
        conv = f"{fmt_s(c['wall_s'])} / {fmt_mb(c['maxrss_mb'])}" if c else "-"
        f64, f32 = r.get("float64", {}), r.get("float32", {})
        ident = "-"
        if "ident" in r:
            i = r["ident"]
            ident = ("yes" if i["identical"] else "**NO**") + f" (max dC {i['max_abs_diff_C']:.1e})"
        elif r.get("exh_est"):
            ident = "n/a (estimated)"
        tl = r.get("tl")
        tls = "-"
        if tl:
            tls = f"fwd+cache {fmt_s(tl['fwd'])}, +DLA {fmt_s(tl['dla'])}"
            if tl.get("full"):
                tls += f"; DLA x all tokens {fmt_s(tl['full'])}"
            tls += f" (process {fmt_s(tl['wall'])}, {fmt_mb(tl['rss'])})"
        lines.append("| " + " | ".join([
            r["model"], conv, fmt_s(f64.get("load")),
            " / ".join(fmt_s(d["prepare"]["wall_s"]) if d.get("prepare") else "-" for d in (f64, f32)),
            fmt_s(f64.get("first_wall")), warm_cell(f64),
            fmt_mb(f64.get("warm_rss")),
            fmt_s(f32.get("first_wall")), warm_cell(f32),
            fmt_mb(f32.get("warm_rss")),
            fmt_s(r.get("exh"), r.get("exh_est", False)), f"{r['ratio']:.0f}x" if r.get("ratio") else "-",
            ident, tls]) + " |")
    return "\n".join(lines)


def upcast_table() -> str:
    u = get("_machine", "upcast")
    if not u:
        return ""
    lines = [f"fp16 upcast throughput ({u['source']}, {u['elements'] / 1e6:.0f} M elements, median of 5):", "",
             "| method | time | Gelem/s | exact on all 65,536 fp16 values |", "|---|---|---|---|"]
    for k, v in u["methods"].items():
        ok = {True: "yes", False: "NO", None: "(same cast as above)"}[v["exact_all_65536"]]
        lines.append(f"| {k} | {v['s'] * 1e3:.0f} ms | {v['Gelem_per_s']:.2f} | {ok} |")
    if "memmap_cold_f64_s" in u:
        lines += ["", f"What `Model.weight` does on this tensor (`np.asarray(memmap, dtype)` into a new array): from disk "
                  f"(pages dropped) to float64 {u['memmap_cold_f64_s'] * 1e3:.0f} ms (with madvise(MADV_WILLNEED) on the "
                  f"map first {u.get('memmap_cold_willneed_f64_s', 0) * 1e3:.0f} ms; one `readinto` of the tensor's bytes "
                  f"into a buffer, then astype: {u.get('readinto_cold_f64_s', 0) * 1e3:.0f} ms); page cache warm: float64 "
                  f"{u['memmap_warm_f64_s'] * 1e3:.0f} ms, float32 {u['memmap_warm_f32_s'] * 1e3:.0f} ms."]
    lines += ["", "Same tensor, the forward's product at prompt length T=6 (m [6, F] @ W_out [F, d]):", "",
              "| dtype | matmul alone | upcast (astype) then matmul | fused: 1024-row blocks upcast into a reused "
              "buffer, accumulated | max rel. diff fused vs plain |", "|---|---|---|---|---|"]
    for dt in ("float64", "float32"):
        lines.append(f"| {dt} | {u[f'matmul_{dt}_s'] * 1e3:.0f} ms | {u[f'upcast_then_matmul_{dt}_s'] * 1e3:.0f} ms | "
                     f"{u[f'fused_blocked_{dt}_s'] * 1e3:.0f} ms | {u[f'fused_blocked_{dt}_max_rel_diff']:.1e} |")
    return "\n".join(lines)


PHASES = ["run", "layer_significance", "top_attn_subvalues", "top_ffn_subvalues",
          "readout", "ffn_counts", "activation_report", "upcast"]
CATS = ["self", "upcast", "readout", "bounds", "scoring", "ranges"]


def profile_table(names) -> str:
    out = []
    for n in names:
        for dt in ("float64", "float32"):
            p = get(n, f"profile-{dt}")
            if not p:
                continue
            ex = p["exclusive_s"]
            rows = {}
            for k, v in ex.items():
                ph, cat = k.split("|")
                cat = "self" if cat == ph and ph != "upcast" else cat
                rows.setdefault(ph, {}).setdefault(cat, 0.0)
                rows[ph][cat] += v
            out += ["", f"**{SPECS[n].title}, {dt}** (warm; locate {p['total_s']:.1f} s; {p['ffn_scored']} FFN "
                    f"subvalues scored; {p['upcasts']['n']} upcasts, {p['upcasts']['bytes'] / 1e9:.1f} GB written; "
                    f"weight cache {p['cache_bytes'] / 2 ** 30:.0f} GiB; process peak RSS {fmt_mb(p['maxrss_mb'])}):", "",
                    "| phase | total | " + " | ".join(c if c != "self" else "own code (matmuls etc.)" for c in CATS) + " |",
                    "|---|---|" + "---|" * len(CATS)]
            label = {"run": "forward", "upcast": "locate's own weight reads (fc2 rows of the top-K: whole W_out upcast)",
                     "readout": "vocab views (R.bs)",
                     "top_attn_subvalues": "attention subvalues (top-K)"}
            tot = {c: 0.0 for c in CATS}
            for ph in PHASES:
                if ph not in rows:
                    continue
                r = rows[ph]
                for c in CATS:
                    tot[c] += r.get(c, 0.0)
                out.append(f"| {label.get(ph, ph)} | {sum(r.values()):.2f} s | " +
                           " | ".join(f"{r[c]:.2f}" if c in r else "" for c in CATS) + " |")
            out.append(f"| **all** | {sum(tot.values()):.2f} s | " + " | ".join(f"{tot[c]:.2f}" for c in CATS) + " |")
    return "\n".join(out)


def detail(names) -> str:
    out = []
    for n in names:
        r = summarize(n)
        c = r.get("convert")
        if c and c.get("direct"):
            out.append(f"- {r['model']}: converted model written directly by synth.py --canonical in "
                       f"{fmt_s(c['wall_s'])} (source + conversion would not fit the disk; conversion not measured)")
        elif c:
            out.append(f"- {r['model']}: conversion {fmt_s(c['wall_s'])} wall, {c['user_s']:.0f} s user + "
                       f"{c['sys_s']:.0f} s sys CPU, peak RSS {fmt_mb(c['maxrss_mb'])} (sampled peak anon "
                       f"{fmt_mb(c.get('peak_anon_mb'))}, file-backed {fmt_mb(c.get('peak_file_mb'))}); source "
                       f"{c['source_bytes'] / 1e9:.2f} GB -> canonical {c['canonical_bytes'] / 1e9:.2f} GB; "
                       f"load average before {c.get('loadavg_before') or 0:.1f}")
        for dt in ("float64", "float32"):
            f = r.get(dt)
            if f:
                out.append(f"- {r['model']} {dt}: first run {fmt_s(f['first_wall'])} ({fmt_s(f['first_locate'])} in "
                           f"locate, peak RSS {fmt_mb(f['first_rss'])}); warm median of {f['n']}: "
                           f"{fmt_s(f['warm_wall'])} ({fmt_s(f['warm_locate'])} in locate), peak RSS "
                           f"{fmt_mb(f['warm_rss'])} (anon {fmt_mb(f['warm_anon'])}); {f['scored']} FFN subvalues "
                           f"scored exactly; per-layer counts {'computed' if f['counts'] else 'skipped (auto policy)'}")
                if f.get("prepare"):
                    pr = f["prepare"]
                    out.append(f"- {r['model']} {dt}: `refimpl prepare` (empty cache) {fmt_s(pr['wall_s'])}, peak RSS "
                               f"{fmt_mb(pr['maxrss_mb'])}; the warm runs use its ranges and weight copy")
        if r.get("exh_est"):
            e = r["exh_detail"]
            out.append(f"- {r['model']} exhaustive (ESTIMATED): exact scoring of {e['sample']} neurons in layers "
                       f"{e['layers']} took {', '.join(f'{x:.1f}' for x in e['layer_s'])} s per full layer "
                       f"({e['d_ff']} neurons); estimate = warm default wall + one pass (each layer is scored once; top-K and counts share it) x "
                       f"{e['n_layers']} layers x {e['layer_s_median']:.1f} s")
        elif "ident" in r:
            i = r["ident"]
            out.append(f"- {r['model']} exhaustive: median of {r['exh_n']} run(s); top-K indices identical: "
                       f"{i['same_indices']}; max |dC| {i['max_abs_diff_C']:.2e}, max |dP| {i['max_abs_diff_P']:.2e}"
                       + (f"; per-layer counts identical: {i['same_counts']}" if "same_counts" in i else ""))
        if r.get("tl"):
            t = r["tl"]
            out.append(f"- {r['model']} TransformerLens 3.9 float32: import {fmt_s(t['import'])}, build+load "
                       f"{fmt_s(t['load'])}, run_with_cache {fmt_s(t['fwd'])}, per-neuron DLA on the target over all "
                       f"layers {fmt_s(t['dla'])}" + (f", per-neuron DLA against all tokens {fmt_s(t['full'])}"
                                                       if t.get("full") else "") +
                       f"; top-3 DLA neurons (layer, neuron) {t['top'][:3]}")
    return "\n".join(out)


def experiments(names) -> str:
    out = []
    for n in names:
        title = SPECS[n].title
        v = get(n, "variants")
        d64 = get(n, "locate-float64")
        if v and d64:
            base = median([w["wall_s"] for w in d64.get("warm", [])])
            for k, r in v.items():
                a, b = r["same_top"], d64["result"]["ffn_top"]
                same = [(x["layer"], x["index"]) for x in a] == [(x["layer"], x["index"]) for x in b]
                dc = max((abs(x["log_prob_increase"] - y["log_prob_increase"]) for x, y in zip(a, b)), default=0.0)
                same = f"{same} (max |dC| {dc:.0e})"
                out.append(f"- {title}: warm float64 locate with {k}: {fmt_s(r['wall_s'])} wall ({fmt_s(r['locate_s'])} "
                           f"in locate; user {r['user_s']:.1f} s, sys {r['sys_s']:.1f} s) vs {fmt_s(base)} with the "
                           f"default threads; same top-K: {same}")
        b = get(n, "batching")
        if b and "skipped" not in b:
            out.append(f"- {title}: bound vectors g of all {b['n_layers']} layers: one layer at a time (bounds.g_vector, "
                       f"2 passes over W_U each) {fmt_s(b['g_per_layer_s'])} vs all layers in one product "
                       f"{fmt_s(b['g_batched_s'])} (max rel. diff {b['g_max_rel_diff']:.0e}); upper bounds "
                       f"m * (W_out @ g) via Model.weight {fmt_s(b['upper_via_weight_s'])} vs 2048-row blocks of the "
                       f"stored W_out {fmt_s(b['upper_blocked_s'])} (max diff {b['upper_max_abs_diff']:.0e}); first "
                       f"top-K batch (64 neurons in {b['first_batch_layers']} layers) scored per layer "
                       f"{fmt_s(b['score_per_layer_s'])} vs one stacked product {fmt_s(b['score_stacked_s'])}, "
                       f"and stacked with only the 64 fc2 rows read from storage (no whole-W_out upcast) "
                       f"{fmt_s(b.get('score_stacked_rows_s'))} (max |dC| vs per layer "
                       f"{b.get('score_stacked_max_abs_diff', float('nan')):.0e})")
        o = get(n, "ops")
        if o:
            for k, r in o.items():
                out.append(f"- {title}: one layer (layer {r['layer']}, T={r['T']}, float64, {k} threads): upcast of the "
                           f"block (`model.block`, cache off) {r['block_upcast_s'] * 1e3:.0f} ms; q/k/v einsum "
                           f"{r['qkv_einsum_s'] * 1e3:.1f} ms vs `np.matmul(x, W_Q)` (no copy) {r['qkv_matmul_s'] * 1e3:.1f} ms "
                           f"(max rel. diff {r['qkv_max_rel_diff']:.0e}); W_O einsum {r['wo_einsum_s'] * 1e3:.1f} ms vs "
                           f"reshape-matmul {r['wo_matmul_s'] * 1e3:.1f} ms; FFN in {r['ffn_s'] * 1e3:.1f} ms, W_out "
                           f"{r['w_out_s'] * 1e3:.1f} ms; attention() {r['attention_fn_s'] * 1e3:.1f} ms")
    return "\n".join(out)


def report(names, mach: dict, started_load) -> str:
    parts = ["# refimpl benchmarks", "",
             f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['ram_gb']} GB RAM; numpy {mach['numpy']}, "
             f"BLAS {mach['blas']}; Python {mach['python']}; {mach['date']}.",
             f"Load average (1 min) when this report was made: at start {started_load[0]:.2f}, at end "
             f"{mach['loadavg'][0]:.2f}. The measurements run one child at a time and each keeps the load near 2 on "
             "this 2-core machine; nothing else should run meanwhile (results are cached, so the table can mix "
             "sessions: see the per-measurement load averages in cache/results).", "",
             "Synthetic checkpoints with the real shapes and random weights (benchmarks/synth.py); prompt "
             f"{SPECS['gpt2-medium'].prompt!r}. Walls are whole processes (interpreter start, imports, load, locate, "
             "exit), as `refimpl locate` would take; the time inside `locate()` is in brackets. Peak RSS is the "
             "child's ru_maxrss (includes memory-mapped weight pages it touched).", "",
             table(names), "", "Targets: " + "; ".join(f"{SPECS[n].title}: {TARGETS[n]}" for n in names), "",
             "## Details", "", detail(names), "", "## fp16 upcast", "", upcast_table(), "",
             "## Experiments", "", experiments(names), "",
             "## Where locate spends its time", "",
             "Exclusive seconds per phase of `locate` and per kind of work inside it (a phase profiler wraps "
             "`Model.weight` = upcast (including reading the pages from disk), `Head.scores`/`log_prob_of`/`Readout.bs` "
             "= readout products, `bounds.ffn_upper`, `significance.increases` = exact scoring glue, "
             "`bounds.neuron_ranges`).", profile_table(names), ""]
    return "\n".join(parts)


# sections of results.md written by other scripts, carried over verbatim when the report is rebuilt:
# the batch throughput table (benchmarks/batch.py) and the speed section (benchmarks/speed.py)
KEPT_SECTIONS = [("<!-- batch:begin -->", "<!-- batch:end -->"), ("<!-- speed:begin -->", "<!-- speed:end -->")]


def keep_sections(old: str, new: str) -> str:
    """`new` with every KEPT_SECTIONS block of `old` copied in verbatim: in place of the same block
    of `new` if it has one, else after the title line (in the order they appear in `old`)."""
    found = []
    for begin, end in KEPT_SECTIONS:
        if begin in old and end in old[old.index(begin):]:
            a = old.index(begin)
            found.append((a, begin, end, old[a:old.index(end, a) + len(end)]))
    insert = []
    for _, begin, end, block in sorted(found):
        if begin in new and end in new[new.index(begin):]:
            a = new.index(begin)
            new = new[:a] + block + new[new.index(end, a) + len(end):]
        else:
            insert.append(block)
    if insert:
        head, _, rest = new.partition("\n")
        new = head + "\n\n" + "\n\n".join(insert) + "\n" + rest
    return new


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="refimpl benchmarks (see benchmarks/README.md)")
    p.add_argument("--models", default=",".join(ORDER), help=f"comma-separated subset of {','.join(ORDER)}")
    p.add_argument("--fresh", action="store_true", help="forget cached measurements (not conversions) and re-measure")
    p.add_argument("--reconvert", action="store_true", help="regenerate sources and re-measure conversions")
    p.add_argument("--keep-sources", action="store_true", help="do not delete large sources after converting")
    p.add_argument("--runs", type=int, default=None, help="warm locate runs per dtype (default 3)")
    p.add_argument("--exhaustive-runs", type=int, default=None, help="measured exhaustive runs (default 3 for "
                   "GPT2-medium and Baevski)")
    p.add_argument("--quick", action="store_true", help="development: 1 warm run, exhaustive estimated, TL 1 rep")
    p.add_argument("--skip", default="", help=f"comma-separated steps to skip: {','.join(SKIPPABLE)}")
    p.add_argument("--report-only", action="store_true", help="rebuild the table from the cache only")
    p.add_argument("--out", default=os.path.join(HERE, "results.md"))
    opts = p.parse_args(argv)
    names = [n for n in opts.models.split(",") if n]
    for n in names:
        if n not in SPECS:
            p.error(f"unknown model {n!r}")
    skip = {s for s in opts.skip.split(",") if s}
    if opts.quick and not opts.runs:
        opts.runs = 1
    started = os.getloadavg()
    if opts.fresh and not opts.report_only:
        for n in names:
            for f in os.listdir(os.path.join(CACHE, "results", n)) if os.path.isdir(os.path.join(CACHE, "results", n)) else []:
                if f != "convert.json":
                    os.remove(os.path.join(CACHE, "results", n, f))
        if "upcast" not in skip and os.path.exists(_path("_machine", "upcast")):
            os.remove(_path("_machine", "upcast"))
    if not opts.report_only:
        if "convert" not in skip:
            for n in [m for m in CONVERT_ORDER if m in names]:
                step_convert(SPECS[n], opts)
        for n in names:
            spec = SPECS[n]
            if not os.path.exists(os.path.join(spec.canonical, "config.json")):
                log(f"{n}: no converted model at {spec.canonical}; skipped")
                continue
            if "locate" not in skip:
                for dt in ("float64", "float32"):
                    step_locate(spec, dt, opts)
            if "exhaustive" not in skip and get(n, "locate-float64"):
                step_exhaustive(spec, opts, get(n, "locate-float64"))
            if "tl" not in skip and n == "gpt2-medium":
                step_tl(spec, opts)
        for n in names:
            if os.path.exists(os.path.join(SPECS[n].canonical, "config.json")):
                if "variants" not in skip and get(n, "locate-float64"):
                    step_variants(SPECS[n], opts)
                if "ops" not in skip:
                    step_ops(SPECS[n], opts)
                if "batching" not in skip:
                    step_batching(SPECS[n], opts)
        if "upcast" not in skip:
            step_upcast(opts)
        if "profile" not in skip:
            for n in names:
                if os.path.exists(os.path.join(SPECS[n].canonical, "config.json")):
                    for dt in (("float64", "float32") if n.startswith("llama") else ("float64",)):
                        step_profile(SPECS[n], dt, opts)
    text = report(names, machine(), started)
    if os.path.exists(opts.out):
        with open(opts.out) as f:
            text = keep_sections(f.read(), text)
    with open(opts.out, "w") as f:
        f.write(text)
    print(table(names))
    print(f"\n(full report: {opts.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
