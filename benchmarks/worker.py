#!/usr/bin/env python
"""One measurement, run by run.py in a fresh child process (so that wall time and peak RSS
belong to it alone). Every task writes one JSON file (--out).

    worker.py locate   --model DIR --dtype float64 [--exhaustive] (--prompt TEXT | --ids 1,2,3)
    worker.py estimate --model DIR --dtype float64 --prompt TEXT [--layers 3] [--sample 2048]
    worker.py profile  --model DIR --dtype float64 --prompt TEXT
    worker.py tl       --model DIR --prompt TEXT [--reps 3] [--full-dla]
    worker.py upcast   [--model DIR]
    worker.py ops      --model DIR --dtype float64 --prompt TEXT [--layer 0]
    worker.py batching --model DIR --dtype float64 --prompt TEXT
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

T_START = time.perf_counter()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def _ids_or_prompt(args):
    if args.ids:
        return [int(x) for x in args.ids.split(",")]
    return args.prompt


def _dump(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    os.replace(path + ".tmp", path)


# --- locate ---------------------------------------------------------------------------------

def task_locate(args):
    t0 = time.perf_counter()
    import refimpl
    from refimpl.locate import locate
    t_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = refimpl.load(args.model, dtype=args.dtype)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = locate(model, _ids_or_prompt(args), exhaustive=args.exhaustive, counts=args.counts)
    t_locate = time.perf_counter() - t0
    keep = {k: r[k] for k in ("ids", "tokens", "target", "prediction", "ffn_scored", "dtype", "exhaustive")}
    keep["ffn_top"] = [{k: s[k] for k in ("layer", "index", "log_prob_increase", "prob_increase")}
                       for s in r["top_subvalues"] if s["kind"] == "ffn"]
    keep["attn_top"] = [{k: s[k] for k in ("layer", "index", "log_prob_increase")}
                        for s in r["top_subvalues"] if s["kind"] == "attn"]
    keep["ffn_counts"] = r.get("ffn_counts")
    keep["ffn_counts_note"] = r.get("ffn_counts_note")
    _dump(args.out, {"import_s": t_import, "load_s": t_load, "locate_s": t_locate,
                     "locate_internal_s": r["seconds"], "in_process_s": time.perf_counter() - T_START,
                     "result": keep})


# --- exhaustive estimate (models where a full --exhaustive run takes hours) -----------------

def task_estimate(args):
    """Time exact scoring of `sample` neurons in `layers` layers (spread over the depth) and
    scale to one full layer; run.py turns it into the exhaustive estimate."""
    import refimpl
    from refimpl.forward import run
    from refimpl.locate import resolve_target
    from refimpl.significance import ffn_subvalue_significance
    model = refimpl.load(args.model, dtype=args.dtype)
    t0 = time.perf_counter()
    trace = run(model, _ids_or_prompt(args))
    t_forward = time.perf_counter() - t0
    t = trace.T - 1
    w = resolve_target(model, trace.log_probs[t])
    R = trace.readout(t, "frozen")
    L, F = model.cfg.n_layers, model.cfg.d_ff
    n = min(args.sample, F)
    layers = sorted({int(x) for x in np.linspace(0, L - 1, args.layers)})
    per_layer = []
    ffn_subvalue_significance(trace, layers[0], w, t, neurons=np.arange(8), readout=R)   # warm W_U
    for i in layers:
        model.weight(f"blocks.{i}.mlp.W_out")                                            # upcast outside the timer
        t0 = time.perf_counter()
        ffn_subvalue_significance(trace, i, w, t, neurons=np.arange(n), readout=R)
        per_layer.append((time.perf_counter() - t0) * F / n)
    _dump(args.out, {"forward_s": t_forward, "layers": layers, "sample": n, "d_ff": F, "n_layers": L,
                     "layer_s": per_layer, "layer_s_median": float(np.median(per_layer)),
                     "scoring_all_layers_s": float(np.median(per_layer)) * L})


# --- phase profile of one locate run --------------------------------------------------------

# the phase profilers' clock: wall (default) or this process's CPU time (REFIMPL_PROFILE_CLOCK=cpu,
# with OPENBLAS_NUM_THREADS=1 a stable measure of work while other processes load the machine)
CLOCK = time.process_time if os.environ.get("REFIMPL_PROFILE_CLOCK") == "cpu" else time.perf_counter


class PhaseProfiler:
    """Exclusive time per (phase, category): a phase is the outermost wrapped call (the
    steps of locate), a category what a wrapped function does (upcast, readout, ...)."""

    def __init__(self):
        self.excl, self.calls, self.stack = {}, {}, []

    def wrap(self, cat, fn):
        prof = self

        def wrapper(*a, **k):
            phase = prof.stack[0][0] if prof.stack else cat
            prof.stack.append([phase, cat, 0.0])
            t0 = CLOCK()
            try:
                return fn(*a, **k)
            finally:
                el = CLOCK() - t0
                _, c, child = prof.stack.pop()
                key = f"{phase}|{c}"
                prof.excl[key] = prof.excl.get(key, 0.0) + el - child
                prof.calls[key] = prof.calls.get(key, 0) + 1
                if prof.stack:
                    prof.stack[-1][2] += el
        wrapper.__wrapped__ = fn
        return wrapper


def task_profile(args):
    import importlib

    import refimpl
    from refimpl import bounds, model as M, readout as RD
    L = importlib.import_module("refimpl.locate")          # the module (refimpl.locate is the function)
    prof = PhaseProfiler()
    upcast_bytes = {"n": 0, "bytes": 0}
    orig_weight = M.Model.weight

    def weight(self, name):
        if name not in self._cache:
            upcast_bytes["n"] += 1
            upcast_bytes["bytes"] += int(np.prod(self.stored(name).shape)) * self.dtype.itemsize
        return orig_weight(self, name)

    M.Model.weight = prof.wrap("upcast", weight)
    for cls, names, cat in ((RD.Head, ("scores", "log_prob_of", "_band_logits", "target_groups"), "readout"),
                            (RD.Readout, ("bs",), "readout"), (RD.Readout, ("increase",), "scoring")):
        for n in names:
            setattr(cls, n, prof.wrap(cat, getattr(cls, n)))
    bounds.ffn_upper = prof.wrap("bounds", bounds.ffn_upper)
    bounds.g_vector = prof.wrap("bounds", bounds.g_vector)
    for n in ("run", "layer_significance", "top_attn_subvalues", "top_ffn_subvalues",
              "ffn_counts", "activation_report"):
        setattr(L, n, prof.wrap(n, getattr(L, n)))
    model = refimpl.load(args.model, dtype=args.dtype)
    t0 = time.perf_counter()
    r = L.locate(model, _ids_or_prompt(args), counts=args.counts)
    total = time.perf_counter() - t0
    _dump(args.out, {"total_s": total, "exclusive_s": prof.excl, "calls": prof.calls,
                     "upcasts": upcast_bytes, "ffn_scored": r["ffn_scored"], "dtype": args.dtype,
                     "cache_bytes": model.cache_bytes})


# --- the whole `refimpl locate` process by phase ---------------------------------------------

def task_phases(args):
    """`refimpl locate` run in this process through its own CLI entry point, wall seconds per
    phase: imports, CLI start (parser), model open, and inside locate() the forward pass, layer
    scores, the three top-K searches, vocabulary views, counts, activation trace, bs-difference;
    then the text/JSON output. A phase is the outermost wrapped call (exclusive of nothing: the
    phases do not nest). Interpreter start-up is the parent's process wall minus T_START..end."""
    import contextlib
    import importlib
    import io
    t_proc = CLOCK()
    times = {}
    t0 = CLOCK()
    import refimpl.cli as cli
    times["imports"] = CLOCK() - t0
    L = importlib.import_module("refimpl.locate")
    from refimpl import cli_common, readout as RD
    prof = PhaseProfiler()
    for n in ("run", "layer_significance", "top_attn_subvalues", "top_ffn_subvalues", "top_attn_neurons",
              "ffn_counts", "activation_report", "_activation_levels", "bs_difference_changes", "prompt_warnings", "resolve_target",
              "resolve_versus", "format_report"):
        if hasattr(L, n):
            setattr(L, n, prof.wrap(n, getattr(L, n)))
    RD.Readout.bs = prof.wrap("vocab_views", RD.Readout.bs)
    cli_common.open_model = prof.wrap("model_open", cli_common.open_model)
    import refimpl.cli_analysis as ca
    ca.open_model = cli_common.open_model
    cli_common.emit = prof.wrap("output", cli_common.emit)
    ca.emit = cli_common.emit
    build = cli.build_parser
    cli.build_parser = prof.wrap("cli_start", build)
    argv = ["locate", "--model", args.model, "--dtype", args.dtype]
    argv += ["--ids", args.ids] if args.ids else [args.prompt]
    if args.counts is not True and args.counts != "auto":
        argv += ["--counts", "no"]
    if getattr(args, "share", None):
        argv += ["--share", args.share]
    if args.json_out:
        argv += ["--json"]
    buf = io.StringIO()
    t0 = CLOCK()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(argv)
    times["main"] = CLOCK() - t0
    assert rc == 0, rc
    excl = {}
    for k, v in prof.excl.items():
        ph = k.split("|")[0]
        excl[ph] = excl.get(ph, 0.0) + v
    times.update(excl)
    times["other_in_main"] = times["main"] - sum(excl.values())
    _dump(args.out, {"times": times, "in_process_s": CLOCK() - T_START,
                     "since_worker_start_s": CLOCK() - t_proc, "dtype": args.dtype})


# --- the floor: one pass of x @ W over every weight matrix -----------------------------------

def task_pass(args):
    """One pass of x @ W over every stored weight matrix, each in the orientation the model
    multiplies it: np.matmul(x [T, a], W) for W [a, b] or [H, a, b] (per head), and for the
    embedding matrices [V, d] the readout's x [T, d] @ W.T. x is random in the compute dtype,
    T the prompt length; W is read from the memory map (page cache), as stored when that is
    the compute dtype, else widened in blocks of 1024 rows into a reused buffer (what any exact
    product in the compute dtype must do). Median of --reps passes after one untimed pass
    (which also brings the pages in)."""
    import refimpl
    from refimpl.safetensors_io import bf16_to_f32
    model = refimpl.load(args.model, dtype=args.dtype)
    dt = model.dtype
    T = int(args.T)
    rng = np.random.default_rng(0)
    jobs = []
    for name, st in model.tensors.items():
        if len(st.shape) < 2 or not name.rsplit(".", 1)[-1].startswith("W_"):      # matrices, not biases
            continue
        readout = name.endswith("W_E") and len(st.shape) == 2                 # x [T, d] @ W_E.T
        a = st.shape[-1] if readout else st.shape[-2]
        jobs.append((st, readout, rng.standard_normal((T, a)).astype(dt)))
    buf = np.empty(1 << 20, dt)                                               # 8 MB (f64) reused block

    def widen(blk, st):
        b = buf[:blk.size].reshape(blk.shape)
        np.copyto(b, blk if st.dtype != "BF16" else bf16_to_f32(blk), casting="unsafe")
        return b

    def one_pass():
        for st, readout, x in jobs:
            W = np.asarray(st.raw())
            if W.dtype == dt:
                np.matmul(x, W.T) if readout else np.matmul(x, W)
                continue
            if readout:                                                       # rows of W_E = columns of x @ W.T
                k = max(1, buf.size // W.shape[1])
                y = np.empty((T, W.shape[0]), dt)
                for s0 in range(0, W.shape[0], k):
                    y[:, s0:s0 + k] = x @ widen(W[s0:s0 + k], st).T
            elif W.ndim == 2:
                k = max(1, buf.size // W.shape[1])
                y = np.zeros((T, W.shape[1]), dt)
                for s0 in range(0, W.shape[0], k):
                    y += x[:, s0:s0 + k] @ widen(W[s0:s0 + k], st)
            else:
                for h in range(W.shape[0]):                                   # [H, a, b]: one head at a time
                    np.matmul(x, widen(W[h], st))
    t0 = time.perf_counter()
    one_pass()
    first = time.perf_counter() - t0
    ts = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        one_pass()
        ts.append(time.perf_counter() - t0)
    n = sum(int(np.prod(st.shape)) for st, _, _ in jobs)
    _dump(args.out, {"pass_s": float(np.median(ts)), "passes_s": ts, "first_pass_s": first, "T": T,
                     "matrices": len(jobs), "elements": n, "stored_bytes": sum(st.nbytes for st, _, _ in jobs),
                     "gflop": 2.0 * T * n / 1e9, "dtype": args.dtype})


# --- TransformerLens side by side (GPT-2) -------------------------------------------------

def task_tl(args):
    t0 = time.perf_counter()
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    import refimpl
    t_import = time.perf_counter() - t0
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    model = refimpl.load(args.model, dtype="float32")
    c = model.cfg
    assert c.family == "gpt2", "the TransformerLens comparison is set up for GPT-2"
    cfg = HookedTransformerConfig(
        d_model=c.d_model, n_layers=c.n_layers, n_heads=c.n_heads, d_head=c.d_head, d_mlp=c.d_ff,
        d_vocab=c.d_vocab, n_ctx=c.n_ctx, act_fn=c.act, eps=c.norm_eps, normalization_type="LN",
        positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
        default_prepend_bos=False, dtype=torch.float32, device="cpu", init_weights=False)
    tl = HookedTransformer(cfg)
    sd = {}
    for name, p in tl.named_parameters():
        sd[name] = torch.from_numpy(np.array(model.stored(name), dtype=np.float32)) \
            if model.has(name) else torch.zeros(tuple(p.shape))
    tl.load_and_process_state_dict(sd, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                   fold_value_biases=False, refactor_factored_attn_matrices=False)
    del sd
    t_load = time.perf_counter() - t0
    ids = model.encode(args.prompt) if not args.ids else [int(x) for x in args.ids.split(",")]
    toks = torch.tensor([ids])
    W_out = torch.stack([b.mlp.W_out for b in tl.blocks])                      # [L, F, d]
    W_U = tl.unembed.W_U                                                         # [d, V]
    reps = []
    for _ in range(args.reps):
        r = {}
        t0 = time.perf_counter()
        logits, cache = tl.run_with_cache(toks)
        r["forward_cache_s"] = time.perf_counter() - t0
        w = int(logits[0, -1].argmax())
        t0 = time.perf_counter()
        post = torch.stack([cache[f"blocks.{i}.mlp.hook_post"][0, -1] for i in range(c.n_layers)])   # [L, F]
        contrib = post[:, :, None] * W_out                                      # [L, F, d] per-neuron outputs
        contrib = contrib - contrib.mean(-1, keepdim=True)                      # ln_final centring
        contrib = contrib / cache["ln_final.hook_scale"][0, -1] * tl.ln_final.w  # frozen final-LN scale
        dla = contrib @ W_U[:, w]                                               # [L, F] DLA on the target
        top = torch.topk(dla.reshape(-1), 10)
        r["dla_target_s"] = time.perf_counter() - t0
        r["target"] = w
        r["top"] = [divmod(int(i), c.d_ff) for i in top.indices]
        if args.full_dla and not reps:                          # every neuron x every token (first rep only)
            t0 = time.perf_counter()
            best = []
            for i in range(c.n_layers):
                for s in range(0, c.d_ff, 1024):
                    full = contrib[i, s:s + 1024] @ W_U                         # [1024, V]
                    best.append(full[:, w].clone())                     # (a view would keep `full` alive)
                    del full
            r["dla_all_tokens_s"] = time.perf_counter() - t0
        reps.append(r)
        del cache, contrib
    _dump(args.out, {"import_s": t_import, "load_s": t_load, "reps": reps, "ids": ids,
                     "torch_threads": torch.get_num_threads()})


# --- fp16 upcast throughput ---------------------------------------------------------------

def _f16_lut(dtype):
    return np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(dtype)


def f16_to_f32_bits(h: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """fp16 -> fp32 by integer arithmetic (exact; subnormals by a float multiply; inf/nan fixed up)."""
    u = h.view(np.uint16).astype(np.uint32)
    em = (u & 0x7FFF) << 13
    f = em.view(np.float32) * np.float32(2.0 ** 112)                  # normals and subnormals, exactly
    bits = f.view(np.uint32)
    bits |= np.where(em >= (0x7C00 << 13), np.uint32(0x7F800000), np.uint32(0))   # inf / nan
    bits |= (u & 0x8000) << 16
    return bits.view(np.float32)


def _time(fn, reps=5):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def task_upcast(args):
    from concurrent.futures import ThreadPoolExecutor
    import refimpl
    src = None
    if args.model and os.path.isdir(args.model):
        m = refimpl.load(args.model, dtype="float64")
        name = next((n for n in ("blocks.0.mlp.W_out", "blocks.0.mlp.W_in") if n in m.tensors), None)
        if name and m.tensors[name].dtype == "F16":
            src = (name, m.tensors[name])
    if src is not None:
        a = np.array(src[1].raw())
        origin = f"{args.model}: {src[0]} {list(a.shape)}"
    else:
        a = (np.random.default_rng(0).standard_normal((11008, 4096), dtype=np.float32) * 0.02).astype(np.float16)
        origin = "random [11008, 4096] fp16"
    n = a.size
    res = {"source": origin, "elements": n, "methods": {}}
    # correctness on all 65536 bit patterns
    allh = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    ref32, ref64 = allh.astype(np.float32), allh.astype(np.float64)

    def same(x, y):
        return bool(np.array_equal(x, y, equal_nan=True) and np.array_equal(np.signbit(x), np.signbit(y)))

    lut32, lut64 = _f16_lut(np.float32), _f16_lut(np.float64)
    pool = ThreadPoolExecutor(2)

    def threaded(fn, out):
        h = len(a) // 2
        list(pool.map(lambda s: fn(out[s], a[s]), (slice(0, h), slice(h, None))))
        return out

    out32, out64 = np.empty(a.shape, np.float32), np.empty(a.shape, np.float64)
    buf32 = np.empty((256,) + a.shape[1:], np.float32)

    def via32_chunked(out):
        for s in range(0, len(a), 256):
            blk = a[s:s + 256]
            np.copyto(buf32[:len(blk)], blk, casting="unsafe")
            np.copyto(out[s:s + 256], buf32[:len(blk)])
        return out

    methods = {
        "f32 astype (new array)": (lambda: a.astype(np.float32), lambda: allh.astype(np.float32), ref32),
        "f32 copyto (reused buffer)": (lambda: np.copyto(out32, a, casting="unsafe"), None, None),
        "f32 LUT take (reused buffer)": (lambda: np.take(lut32, a.view(np.uint16), out=out32),
                                         lambda: np.take(lut32, allh.view(np.uint16)), ref32),
        "f32 bit arithmetic": (lambda: f16_to_f32_bits(a), lambda: f16_to_f32_bits(allh), ref32),
        "f32 copyto, 2 threads": (lambda: threaded(lambda o, x: np.copyto(o, x, casting="unsafe"), out32), None, None),
        "f64 astype (new array)": (lambda: a.astype(np.float64), lambda: allh.astype(np.float64), ref64),
        "f64 copyto (reused buffer)": (lambda: np.copyto(out64, a, casting="unsafe"), None, None),
        "f64 LUT take (reused buffer)": (lambda: np.take(lut64, a.view(np.uint16), out=out64),
                                         lambda: np.take(lut64, allh.view(np.uint16)), ref64),
        "f64 via f32 (astype twice)": (lambda: a.astype(np.float32).astype(np.float64),
                                       lambda: allh.astype(np.float32).astype(np.float64), ref64),
        "f64 via f32, chunked, reused buffers": (lambda: via32_chunked(out64), None, None),
        "f64 copyto, 2 threads": (lambda: threaded(lambda o, x: np.copyto(o, x, casting="unsafe"), out64), None, None),
        "f64 LUT take, 2 threads": (lambda: threaded(lambda o, x: np.take(lut64, x.view(np.uint16), out=o), out64),
                                    None, None),
    }
    try:
        import torch
        ta = torch.from_numpy(a)
        methods["(torch, reference only) f32"] = (lambda: ta.to(torch.float32), None, None)
        methods["(torch, reference only) f64"] = (lambda: ta.to(torch.float64), None, None)
    except ImportError:
        pass
    for k, (fn, check, ref) in methods.items():
        s = _time(fn)
        with np.errstate(invalid="ignore"):                              # NaN payloads through float32
            ok = same(check(), ref) if check is not None else None
        res["methods"][k] = {"s": s, "Gelem_per_s": n / s / 1e9, "exact_all_65536": ok}
    if src is not None:       # what Model.weight does: from the memory map (disk / page cache) into a new array
        st = src[1]
        fd = os.open(st.path, os.O_RDONLY)
        os.posix_fadvise(fd, st.offset, st.nbytes, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        t0 = time.perf_counter()
        np.asarray(st.raw(), np.float64)
        res["memmap_cold_f64_s"] = time.perf_counter() - t0
        import mmap

        def drop():
            fd = os.open(st.path, os.O_RDONLY)
            os.posix_fadvise(fd, st.offset, st.nbytes, os.POSIX_FADV_DONTNEED)
            os.close(fd)

        def willneed():
            mm = st.raw()
            mm._mmap.madvise(mmap.MADV_WILLNEED)
            return np.asarray(mm, np.float64)

        def readinto():
            buf = np.empty(st.shape, np.float16)
            with open(st.path, "rb", buffering=0) as f:
                f.seek(st.offset)
                f.readinto(memoryview(buf.reshape(-1)).cast("B"))
            return buf.astype(np.float64)
        for k, fn in (("memmap_cold_willneed_f64_s", willneed), ("readinto_cold_f64_s", readinto)):
            drop()
            t0 = time.perf_counter()
            out = fn()
            res[k] = time.perf_counter() - t0
        res["readinto_exact"] = bool(np.array_equal(out, a.astype(np.float64)))
        res["memmap_warm_f64_s"] = _time(lambda: np.asarray(st.raw(), np.float64))
        res["memmap_warm_f32_s"] = _time(lambda: np.asarray(st.raw(), np.float32))
    # the copyto/threaded paths are exact iff numpy's cast is: check on the real tensor
    res["copyto_equals_astype"] = bool(np.array_equal(out64, a.astype(np.float64)))
    pool.shutdown()
    # matmul vs upcast at prompt length (the forward's x @ W with T rows)
    T = args.T
    rng = np.random.default_rng(1)
    for dt in (np.float64, np.float32):
        W = a.astype(dt)
        x = rng.standard_normal((T, a.shape[0])).astype(dt)                  # m [T, F] @ W_out [F, d]
        key = np.dtype(dt).name
        res[f"matmul_{key}_s"] = _time(lambda: x @ W)
        res[f"upcast_then_matmul_{key}_s"] = _time(lambda: x @ a.astype(dt))
        buf = np.empty((1024,) + a.shape[1:], dt)

        def fused():
            y = np.zeros((T, a.shape[1]), dt)
            for s in range(0, a.shape[0], 1024):
                blk = a[s:s + 1024]
                np.copyto(buf[:len(blk)], blk, casting="unsafe")
                y += x[:, s:s + 1024] @ buf[:len(blk)]
            return y
        res[f"fused_blocked_{key}_s"] = _time(fused)
        res[f"fused_blocked_{key}_max_rel_diff"] = float(np.abs(fused() - x @ W).max() / np.abs(x @ W).max())
    _dump(args.out, res)


# --- forward building blocks: what the forward does now vs cheaper equivalents -------------

def task_ops(args):
    """One layer of the model at prompt length T: the forward's einsums against plain
    (copy-free) matmuls, and the cost of upcasting the layer (model.block) vs the products."""
    import refimpl
    from refimpl.forward import attention, ffn, norm
    model = refimpl.load(args.model, dtype=args.dtype, cache_bytes=0)
    ids = model.encode(args.prompt) if not args.ids else [int(x) for x in args.ids.split(",")]
    T, i = len(ids), args.layer
    res = {"T": T, "layer": i, "dtype": args.dtype}
    res["block_upcast_s"] = _time(lambda: model.block(i), 3)
    W = model.block(i)
    x = np.random.default_rng(0).standard_normal((T, model.cfg.d_model)).astype(model.dtype)
    WQ = W["attn.W_Q"]
    res["qkv_einsum_s"] = _time(lambda: [np.einsum("td,hde->the", x, W[f"attn.W_{m}"], optimize=True) for m in "QKV"])
    res["qkv_matmul_s"] = _time(lambda: [np.matmul(x, W[f"attn.W_{m}"]).transpose(1, 0, 2) for m in "QKV"])
    a, b = np.einsum("td,hde->the", x, WQ, optimize=True), np.matmul(x, WQ).transpose(1, 0, 2)
    res["qkv_max_rel_diff"] = float(np.abs(a - b).max() / np.abs(a).max())
    z = np.random.default_rng(1).standard_normal((T, model.cfg.n_heads, model.cfg.d_head)).astype(model.dtype)
    WO = W["attn.W_O"]
    res["wo_einsum_s"] = _time(lambda: np.einsum("the,hed->td", z, WO, optimize=True))
    res["wo_matmul_s"] = _time(lambda: z.reshape(T, -1) @ WO.reshape(-1, WO.shape[-1]))
    h = norm(model, x, W["ln2.w"], W.get("ln2.b"))
    res["ffn_s"] = _time(lambda: ffn(model, W, h))
    m = ffn(model, W, h)[2]
    res["w_out_s"] = _time(lambda: m @ W["mlp.W_out"])
    res["attention_fn_s"] = _time(lambda: attention(model, W, norm(model, x, W["ln1.w"], W.get("ln1.b"))))
    res["openblas_threads_env"] = os.environ.get("OPENBLAS_NUM_THREADS")
    _dump(args.out, res)


# --- prototypes of cheaper bounds / scoring, against what topk.py does now -----------------

def task_batching(args):
    """After one forward pass: (a) the bound vectors g of all layers one layer at a time
    (bounds.g_vector: two passes over W_U per layer) vs all layers in one product; (b) the
    first top-K batch scored per layer (as topk.py groups it) vs one stacked product; (c) the
    per-layer upper bounds m * (W_out @ g) through Model.weight (upcast of W_out) vs a
    blocked product on the stored (fp16/fp32) W_out."""
    import refimpl
    from refimpl import bounds, nn
    from refimpl.forward import run
    from refimpl.locate import resolve_target
    from refimpl.significance import ffn_subvalue_significance
    model = refimpl.load(args.model, dtype=args.dtype)
    trace = run(model, _ids_or_prompt(args))
    t = trace.T - 1
    w = resolve_target(model, trace.log_probs[t])
    R = trace.readout(t, "frozen")
    L = model.cfg.n_layers
    res = {"dtype": args.dtype, "n_layers": L}
    if R.head.adaptive:
        res["skipped"] = "adaptive softmax: prototypes are written for a plain vocabulary readout"
        _dump(args.out, res)
        return
    W_U = model.weight("unembed.W_U")
    bounds.g_vector(R, trace.layers[0].lres[t], w)                             # warm
    t0 = time.perf_counter()
    G_ref = np.array([bounds.g_vector(R, trace.layers[i].lres[t], w) for i in range(L)])
    res["g_per_layer_s"] = time.perf_counter() - t0

    def g_batched():
        Y = R.state_input(np.array([trace.layers[i].lres[t] for i in range(L)]))   # [L, d]
        S = Y @ W_U + R.head.bias()                                                         # [L, V] one pass
        E = -nn.softmax(S, axis=-1)
        E[:, w] += 1.0
        G = E @ W_U.T                                                                       # [L, d] one pass
        if R.has_norm:
            G = R.gamma * G / bounds.scale(R)
            if R.centre:
                G = G - G.mean(-1, keepdims=True)
        return G
    t0 = time.perf_counter()
    G = g_batched()
    res["g_batched_s"] = time.perf_counter() - t0
    res["g_max_rel_diff"] = float(np.abs(G - G_ref).max() / np.abs(G_ref).max())
    # (c) upper bounds
    ups_ref = []
    t0 = time.perf_counter()
    for i in range(L):
        ups_ref.append(trace.layers[i].m[t] * (model.weight(f"blocks.{i}.mlp.W_out") @ G_ref[i]))
    res["upper_via_weight_s"] = time.perf_counter() - t0
    F = model.cfg.d_ff
    buf = np.empty((2048, model.cfg.d_model), model.dtype)

    def upper_blocked(i):
        Wst = model.stored(f"blocks.{i}.mlp.W_out")
        out = np.empty(F, model.dtype)
        for s in range(0, F, 2048):
            blk = Wst[s:s + 2048]
            np.copyto(buf[:len(blk)], blk, casting="unsafe")
            out[s:s + len(blk)] = buf[:len(blk)] @ G_ref[i]
        return trace.layers[i].m[t] * out
    t0 = time.perf_counter()
    ups = [upper_blocked(i) for i in range(L)]
    res["upper_blocked_s"] = time.perf_counter() - t0
    res["upper_max_abs_diff"] = float(max(np.abs(a - b).max() for a, b in zip(ups, ups_ref)))
    # (b) scoring the first batch of 64 in visiting order
    upper = np.concatenate(ups_ref)
    layer = np.repeat(np.arange(L), F)
    neuron = np.tile(np.arange(F), L)
    sel = np.lexsort((neuron, layer, -upper))[:64]
    res["first_batch_layers"] = int(len(np.unique(layer[sel])))
    for i in np.unique(layer[sel]):
        model.weight(f"blocks.{int(i)}.mlp.W_out")
    t0 = time.perf_counter()
    C_ref = {}
    for i in np.unique(layer[sel]):
        ns = neuron[sel][layer[sel] == i]
        C_ref[int(i)] = (ns, ffn_subvalue_significance(trace, int(i), w, t, neurons=ns, readout=R)[0])
    res["score_per_layer_s"] = time.perf_counter() - t0

    def score_stacked(rows_only):
        rows, base_rows = [], []
        for i in np.unique(layer[sel]):
            ns = neuron[sel][layer[sel] == i]
            base = trace.layers[int(i)].lres[t]
            if rows_only:       # only the fc2 rows needed, upcast from storage (same values)
                sv = trace.layers[int(i)].m[t][ns, None] * np.asarray(
                    model.stored(f"blocks.{int(i)}.mlp.W_out")[ns], model.dtype)
            else:
                sv = trace.ffn_subvalues(int(i), t, ns)
            rows.append(base + sv)
            base_rows.append(base)
        X = np.concatenate(rows + [np.array(base_rows)])                  # [64 + n_layers, d]
        return R.log_prob(X, w)                                            # one pass over W_U
    t0 = time.perf_counter()
    score_stacked(False)
    res["score_stacked_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    lp = score_stacked(True)
    res["score_stacked_rows_s"] = time.perf_counter() - t0
    lp0 = lp[-len(C_ref):]
    C = np.concatenate([lp[:-len(C_ref)]])
    got, n0 = [], 0
    for j, (i, (ns, c_ref)) in enumerate(sorted(C_ref.items())):
        got.append(np.abs(C[n0:n0 + len(ns)] - lp0[j] - c_ref).max())
        n0 += len(ns)
    res["score_stacked_max_abs_diff"] = float(max(got))
    _dump(args.out, res)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("task", choices=["locate", "estimate", "profile", "phases", "pass", "tl", "upcast", "ops", "batching"])
    p.add_argument("--model")
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--ids", default=None)
    p.add_argument("--exhaustive", action="store_true")
    p.add_argument("--counts", default="auto", type=lambda s: {"auto": "auto", "yes": True, "no": False}[s])
    p.add_argument("--share", default=None, choices=["exact", "bound"], help="phases: locate --share")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--sample", type=int, default=2048)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--full-dla", action="store_true")
    p.add_argument("--json-out", action="store_true")
    p.add_argument("--T", type=int, default=6)
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    globals()["task_" + args.task](args)


if __name__ == "__main__":
    main()
