"""`refimpl batch`: the paper's pipeline over many prompts, resumable, on one machine or a Dask cluster.

Each record of OUT/results.jsonl is the object `refimpl locate --json` gives for its prompt,
built by the same function (`refimpl.locate.locate`) from the same forward pass, plus `id`,
`group` and `key`. Only `timing` differs from a separate run.

Nothing lost, nothing twice: records are appended one at a time, each flushed and fsync'ed;
a record's `key` is the sha256 of its prompt, target, the analysis options and the model's
digest, and a rerun skips every key present. A run killed at any moment leaves at most one
incomplete last line, which the next run drops before appending (one record per prompt).
OUT/batch.json fixes the options and the model of the directory: a rerun with other options
or another model is refused, never mixed in.

Throughput: a model larger than the in-memory weight cache streams its weights layer by
layer; the prompts of a chunk then go through each layer together (`forward.forward_many`),
so each layer is read and widened once per chunk, not once per prompt.

Past one machine: with `workers` (a local Dask cluster of processes) or `scheduler` (the
address of a running Dask cluster) chunks run on Dask workers; each worker opens the model
once (`_worker_model`) and returns records; the client alone writes OUT.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
import warnings

import numpy as np

from . import output
from .errors import RefimplError
from .significance import NEGLIGIBLE

RESULTS, MANIFEST, LOCK = "results.jsonl", "batch.json", ".lock"
SUMMARY_JSON, SUMMARY_MD, FIGURES = "summary.json", "summary.md", "figures"
OPTION_DEFAULTS = {"top": 10, "readout": "frozen", "dtype": "float64", "exhaustive": False, "counts": "auto",
                   "prepend_bos": None, "negligible": NEGLIGIBLE, "share": "exact"}
TRACE_BUDGET = 2 << 30          # bytes of forward-pass traces held at once by one chunk (auto chunk size)


# --- identity: the model's digest, the options, a prompt's key ---------------------------------

def _model_files(path: str) -> list[str]:
    """The files of a model folder a batch's records depend on: config.json, the weights, the tokenizer."""
    return ["config.json"] + sorted(f for f in os.listdir(path)
                                    if f.endswith((".safetensors", ".json")) and f != "config.json")


def model_digest(path: str) -> str:
    """sha256 naming the model's exact files: of config.json's bytes when it records the sha256
    of every weight and tokenizer file (refimpl convert does), else of config.json and every
    file's content."""
    from .files import read_bytes, sha256_file
    raw = read_bytes(os.path.join(path, "config.json"), "json")
    h = hashlib.sha256(raw)
    try:
        recorded = json.loads(raw).get("files")
    except ValueError:
        recorded = None
    files = _model_files(path)[1:]
    if isinstance(recorded, dict) and all(f in recorded for f in files if f != "model.safetensors.index.json"):
        return h.hexdigest()
    for f in files:
        h.update(f.encode() + b"\0" + sha256_file(os.path.join(path, f)).encode())
    return h.hexdigest()


def file_identities(path: str) -> dict:
    """{file: {bytes, mtime_ns, ctime_ns, inode}} of the model's files (stat only)."""
    from .cache import identity
    return {f: identity(os.path.join(path, f)) for f in _model_files(path)}


def check_model_files(path: str, old: dict, prog) -> dict | None:
    """A batch that resumes trusts its records only if the model's files are still the ones
    they were made from. The digest names the files by the sha256 config.json records for
    them (not re-hashed on every run), so OUT's manifest also records each file's identity
    (size, mtime, ctime, inode). If any changed, the files are hashed again: the same bytes
    as config.json records -> the new identities are recorded and the batch goes on; other
    bytes (an ablation edited in place, a damaged file) -> an error, never stale records.
    Returns the new identities when they had to be re-checked (None when unchanged)."""
    from .files import read_bytes, sha256_file
    now = file_identities(path)
    if old.get("files") == now:
        return None
    try:
        recorded = json.loads(read_bytes(os.path.join(path, "config.json"), "json")).get("files")
    except ValueError:
        recorded = None
    if not isinstance(recorded, dict):
        return now                      # the digest itself hashed every file's content
    prog.note("the model's files changed on disk since the records were made: checking their content")
    for f in now:
        if f in recorded and sha256_file(os.path.join(path, f)) != recorded[f]:
            raise RefimplError(f"{os.path.join(path, f)}: changed since the records of this --out were made "
                               f"(its sha256 is not the one config.json records); they would be stale: "
                               f"restore the file, or give another --out")
    return now


def normalize_options(options: dict) -> dict:
    """The analysis options of a batch (OPTION_DEFAULTS' keys), checked."""
    unknown = set(options) - set(OPTION_DEFAULTS)
    if unknown:
        raise RefimplError(f"unknown batch option {sorted(unknown)[0]!r}")
    o = {**OPTION_DEFAULTS, **options}
    if not isinstance(o["top"], int) or isinstance(o["top"], bool) or o["top"] < 1:
        raise RefimplError(f"top must be a positive integer, got {o['top']!r}")
    if o["counts"] not in ("auto", True, False):
        raise RefimplError(f"counts must be 'auto', True or False, got {o['counts']!r}")
    from .topk import check_negligible
    o["negligible"] = check_negligible(o["negligible"])
    if o["share"] not in ("exact", "bound"):
        raise RefimplError(f"share must be exact or bound, got {o['share']!r}")
    return o


def record_key(item: dict, options: dict, digest: str) -> str:
    """The identity of one prompt's record: its prompt, target, options and the model's digest."""
    body = {"prompt": item["prompt"], "target": item["target"], "options": options, "model": digest}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def locate_argv(item: dict, options: dict, model_path: str) -> list[str]:
    """The `refimpl locate` arguments whose --json object a record equals (outside `timing`)."""
    o = options
    argv = ["locate", item["prompt"], "--model", model_path, "--json", "--top", str(o["top"]),
            "--readout", o["readout"], "--dtype", o["dtype"],
            "--counts", {"auto": "auto", True: "yes", False: "no"}[o["counts"]],
            "--negligible", repr(float(o["negligible"])), "--share", o["share"]]
    if o["exhaustive"]:
        argv.append("--exhaustive")
    if o["prepend_bos"] is not None:
        argv.append("--prepend-bos" if o["prepend_bos"] else "--no-prepend-bos")
    if item["target"] is not None:
        argv += ["--target", item["target"]]
    return argv


# --- computing records -------------------------------------------------------------------------

def error_record(item: dict, key: str, message: str) -> dict:
    """The record of a prompt that could not be analysed (the batch goes on)."""
    return {**output.base("batch-error"), "id": item["id"], "group": item["group"], "key": key,
            "prompt": item["prompt"], "target_requested": item["target"], "error": message}


def _message(e: BaseException) -> str:
    from .files import printable
    if isinstance(e, RefimplError):
        return printable(str(e))
    if isinstance(e, MemoryError):
        return "out of memory"
    return printable(f"{type(e).__name__}: {e}")


def streams(model) -> bool:
    """Whether the model is larger than its in-memory weight cache (its layers are re-read and
    widened on every forward pass)."""
    return not model._fits_cache() and model.upcast_cache is None


def auto_chunk(model, n_tokens: int = 16) -> int:
    """Prompts per chunk: 1 for a model held in memory (nothing to share), else as many as keep
    their forward-pass traces under TRACE_BUDGET (at least 1, at most 64)."""
    if not streams(model):
        return 1
    c = model.cfg
    per_layer = n_tokens * (9 * c.d_model + 3 * c.d_ff + c.n_heads * n_tokens)    # [T, .] arrays of a LayerTrace
    per_prompt = c.n_layers * per_layer * model.dtype.itemsize
    return int(max(1, min(64, TRACE_BUDGET // max(1, per_prompt))))


def _typical_length(model, items: list[dict], options: dict) -> int:
    """The longest tokenized length among (the first) prompts: what sizes a chunk's traces."""
    from .forward import run_ids
    n = [1]
    for it in items:
        try:
            n.append(len(run_ids(model, it["prompt"], options["prepend_bos"])))
        except (RefimplError, ValueError):
            pass
    return max(n)


def compute_records(model, items: list[dict], keys: list[str], options: dict, extra_warnings=()):
    """Yield (item, record) for each item, in order: the forward passes of all items run
    together (`forward_many`), then each is reported by `locate(..., trace=)`. A prompt that
    fails (empty, too long, a target that is not one token) gives an error record."""
    from .forward import check_ids, forward_many, run_ids
    from .locate import locate
    o = options
    ok, ids = [], []
    for n, it in enumerate(items):
        try:
            ids.append(check_ids(model, run_ids(model, it["prompt"], o["prepend_bos"])))
            ok.append(n)
        except (RefimplError, ValueError, MemoryError) as e:
            yield it, error_record(it, keys[n], _message(e))
    traces = dict(zip(ok, forward_many(model, ids))) if ok else {}
    for n in ok:
        it = items[n]
        try:
            r = locate(model, it["prompt"], target=it["target"], top=o["top"], readout=o["readout"],
                       exhaustive=o["exhaustive"], counts=o["counts"], prepend_bos=o["prepend_bos"],
                       negligible=o["negligible"], share=o["share"], trace=traces.pop(n))
        except (RefimplError, ValueError, ArithmeticError, MemoryError) as e:
            yield it, error_record(it, keys[n], _message(e))
            continue
        for msg in extra_warnings:                      # as `refimpl locate` lists warnings of the model's load
            if msg not in r["warnings"]:
                r["warnings"].append(msg)
        r["timing"] = r.pop("timing")
        yield it, {"id": it["id"], "group": it["group"], "key": keys[n], **r}


def keep_attention_outputs(model) -> int:
    """The weight cache of a batch on a streaming model: every layer's W_O in the compute dtype
    is pinned (kept once widened, outside the cache budget). The per-prompt analysis widens each
    layer's W_O in full (attention subvalues, Eq. 7-8), so a batch keeps them from one prompt to
    the next instead of widening them again for every prompt (Llama-7B in float64: 4.3 GB more
    memory). Returns the bytes pinned (0 for a model held in memory)."""
    if not streams(model):
        return 0
    return model.pin([f"blocks.{i}.attn.W_O" for i in range(model.cfg.n_layers)])


def open_model(path: str, dtype: str, **model_options):
    """The model and the warnings its load showed (they go into every record, as in `refimpl locate`).
    Without an explicit cache_bytes the weight cache keeps the attention outputs (keep_attention_outputs)."""
    from .api import load
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        model = load(path, dtype=dtype, **model_options)
        if "cache_bytes" not in model_options:
            keep_attention_outputs(model)
    shown = []
    for w in caught:
        msg = str(w.message).splitlines()[0] if str(w.message) else w.category.__name__
        if issubclass(w.category, UserWarning) and msg not in shown:
            shown.append(msg)
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return model, shown


# --- Dask workers: one model per worker process ---------------------------------------------------

_WORKER_MODELS: dict = {}
WORKER_OPENS: list = []        # (path, dtype) of every model this process opened for tasks


def _worker_model(path: str, dtype: str, model_options: dict):
    """The model of this worker process, opened on its first task and kept for the next ones."""
    key = (path, dtype, json.dumps(model_options, sort_keys=True))
    if key not in _WORKER_MODELS:
        _WORKER_MODELS.clear()
        _WORKER_MODELS[key] = open_model(path, dtype, **model_options)
        WORKER_OPENS.append((path, dtype))
    return _WORKER_MODELS[key]


def worker_task(path: str, dtype: str, model_options: dict, options: dict, items: list,
                keys: list, blas_threads: int | None = None) -> list[tuple[str, bool]]:
    """A chunk on a Dask worker: its records as (JSON line, is an error record) (the client writes them).
    blas_threads: the client's BLAS thread count (Dask starts workers with one), so that the
    records equal the client's own `refimpl locate` to the last bit (refimpl/blas.py)."""
    from .blas import blas_threads as with_threads
    with warnings.catch_warnings(), with_threads(blas_threads):
        warnings.simplefilter("ignore")                  # listed in the records; a worker has no user to tell
        model, shown = _worker_model(path, dtype, model_options)
        return [(encode(r), "error" in r) for _, r in compute_records(model, items, keys, options, shown)]


# --- OUT: the manifest, the results file, resumption ------------------------------------------------

def encode(record: dict) -> str:
    """One line of results.jsonl (floats written exactly: json's shortest round-trip repr)."""
    return json.dumps(record, default=output.jsonable, ensure_ascii=False, allow_nan=False)


def manifest(model, digest: str, options: dict, prompts: str | None) -> dict:
    return {**output.base("batch"), "model": {**output.model_info(model), "digest": digest},
            "options": options, "prompts": os.path.abspath(prompts) if prompts else None,
            "files": file_identities(model.path)}


def _describe_difference(old: dict, new: dict) -> str:
    if old.get("model", {}).get("digest") != new["model"]["digest"]:
        return (f"another model ({old.get('model', {}).get('path')}, digest "
                f"{str(old.get('model', {}).get('digest'))[:12]}...; now {new['model']['path']}, "
                f"digest {new['model']['digest'][:12]}...)")
    diffs = [f"{k} {json.dumps(old.get('options', {}).get(k))} there, {json.dumps(v)} now"
             for k, v in new["options"].items() if old.get("options", {}).get(k) != v]
    return "other options (" + "; ".join(diffs) + ")"


def check_out(out: str, new_manifest: dict | None) -> dict | None:
    """OUT may be new, empty, or a batch directory of the same model and options (resumed).
    Returns the manifest found there (None for a new directory)."""
    from .files import read_json
    if os.path.lexists(out) and not os.path.isdir(out):
        raise RefimplError(f"{out}: exists and is not a directory (--out names a directory)")
    if not os.path.isdir(out):
        return None
    mpath = os.path.join(out, MANIFEST)
    if not os.path.lexists(mpath):
        rest = [f for f in os.listdir(out) if f != LOCK]
        if rest:
            raise RefimplError(f"{out}: exists and is not a refimpl batch directory (no {MANIFEST}; holds "
                               f"{rest[0]!r}); give a new or empty directory")
        return None
    old = read_json(mpath)
    if not isinstance(old, dict) or old.get("command") != "batch":
        raise RefimplError(f"{mpath}: not a refimpl batch manifest")
    if new_manifest is not None and (old.get("options") != new_manifest["options"]
                                     or old.get("model", {}).get("digest") != new_manifest["model"]["digest"]):
        raise RefimplError(f"{out} holds results from {_describe_difference(old, new_manifest)}; "
                           f"they are never mixed or overwritten: give another --out")
    return old


def write_atomic(path: str, text: str) -> None:
    """Write a file the batch owns (manifest, summary) whole or not at all."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_results(out: str, repair: bool = False) -> list[dict]:
    """The records of OUT/results.jsonl. An incomplete last line (a run killed while writing it)
    is dropped from the file when `repair` (the run that resumes), ignored otherwise; any other
    line that is not a record is an error naming it."""
    path = os.path.join(out, RESULTS)
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data) and repair:
        with open(path, "r+b") as f:                   # only our own torn write is cut, nothing else
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    records, seen = [], {}
    for n, line in enumerate(data[:end].split(b"\n")[:-1], 1):
        try:
            r = json.loads(line)
        except ValueError:
            raise RefimplError(f"{path} line {n}: not a record (damaged file; refimpl batch only appends whole lines)") from None
        if not isinstance(r, dict) or not isinstance(r.get("key"), str):
            raise RefimplError(f"{path} line {n}: not a batch record (no key)")
        if r["key"] in seen:
            raise RefimplError(f"{path} lines {seen[r['key']]} and {n}: two records of one prompt "
                               f"(id {r.get('id')!r}); was the directory written by two runs at once?")
        seen[r["key"]] = n
        records.append(r)
    return records


@contextlib.contextmanager
def locked(out: str):
    """One writer per OUT at a time."""
    import fcntl
    fd = os.open(os.path.join(out, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RefimplError(f"{out}: another refimpl batch is writing this directory") from None
        yield
    finally:
        os.close(fd)


class Appender:
    """results.jsonl opened for appending: each record one write, flushed and fsync'ed."""

    def __init__(self, path: str):
        self.f = open(path, "ab")

    def write(self, line: str) -> None:
        self.f.write(line.encode("utf-8") + b"\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


# --- the run -------------------------------------------------------------------------------------

def run_batch(prompts: str, model_path: str | None, out: str, options: dict | None = None, fmt: str = "auto",
              chunk: int | None = None, workers: int | None = None, scheduler: str | None = None,
              progress=None, model_options: dict | None = None, plots: bool = False) -> dict:
    """Analyse every prompt of `prompts` not already in OUT, then write the summary.
    Returns {"done", "skipped" (already in OUT), "repeats" (of an earlier prompt of the file), "errors",
    "total", "summary"} of this run."""
    from .batch_io import read_prompts, resolve_prompts
    from .embedded import resolve_model
    from .progress import QUIET
    prog = progress or QUIET
    options = normalize_options(options or {})
    model_options = dict(model_options or {})
    if workers is not None and scheduler is not None:
        raise RefimplError("give either --workers or --scheduler, not both")
    if chunk is not None and chunk < 1:
        raise RefimplError(f"--chunk must be a positive integer, got {chunk}")
    path = resolve_prompts(prompts)
    items = read_prompts(path, fmt)
    model_dir = os.path.abspath(resolve_model(model_path))
    if plots:
        from .plots import require_matplotlib
        require_matplotlib()
    model, shown = open_model(model_dir, options["dtype"], **model_options)
    digest = model_digest(model_dir)
    new = manifest(model, digest, options, path)
    check_out(out, new)
    os.makedirs(out, exist_ok=True)
    with locked(out):
        old = check_out(out, new)                       # again, now that we hold the lock
        if old is None:
            write_atomic(os.path.join(out, MANIFEST), json.dumps(new, indent=1) + "\n")
        else:
            files = check_model_files(model_dir, old, prog)
            if files is not None:
                write_atomic(os.path.join(out, MANIFEST), json.dumps({**old, "files": files}, indent=1) + "\n")
        done = {r["key"] for r in read_results(out, repair=True)}
        keys = [record_key(it, options, digest) for it in items]
        todo, dup = [], set()
        for it, k in zip(items, keys):
            if k in done or k in dup:
                continue
            dup.add(k)
            todo.append((it, k))
        already = sum(1 for k in keys if k in done)
        repeats = len(items) - already - len(todo)
        stats = {"total": len(items), "skipped": already, "repeats": repeats, "done": 0, "errors": 0}
        if repeats:
            prog.note(f"{repeats} prompts repeat an earlier one of the file (same prompt and target): analysed once")
        if stats["skipped"]:
            prog.note(f"{stats['skipped']} of {len(items)} prompts already in {os.path.join(out, RESULTS)}")
        app = Appender(os.path.join(out, RESULTS))
        try:
            prog.stage(f"{len(todo)} prompts", total=len(todo), unit="prompt")
            def take(line: str, is_error: bool):
                app.write(line)
                stats["done"] += 1
                stats["errors"] += is_error
                prog.update(1)
            if workers is not None or scheduler is not None:
                _run_dask(model_dir, options, model_options, todo, chunk or 1, workers, scheduler, take)
            else:
                size = chunk or auto_chunk(model, _typical_length(model, [p[0] for p in todo[:64]], options))
                for s in range(0, len(todo), size):
                    part = todo[s:s + size]
                    for _, r in compute_records(model, [p[0] for p in part], [p[1] for p in part], options, shown):
                        take(encode(r), "error" in r)
        except KeyboardInterrupt as e:          # Ctrl-C, SIGTERM: what is written stays
            e.hint = (f"{stats['done']} records written this run are kept in {os.path.join(out, RESULTS)}; "
                      f"rerun the same command to finish")
            raise
        finally:
            app.close()
            prog.close()
        stats["summary"] = summarize(out, plots=plots)
    return stats


def _run_dask(model_dir, options, model_options, todo, chunk, workers, scheduler, take) -> None:
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise RefimplError("--workers/--scheduler need Dask: pip install \"refimpl[cluster]\"") from None
    with contextlib.ExitStack() as stack:
        if scheduler is not None:
            try:
                client = stack.enter_context(Client(scheduler, timeout="30s"))
            except (OSError, TimeoutError) as e:
                raise RefimplError(f"--scheduler {scheduler}: cannot connect ({_message(e)})") from None
        else:
            cluster = stack.enter_context(LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                       host="127.0.0.1", dashboard_address=None))
            client = stack.enter_context(Client(cluster))
        from .blas import threads as blas_thread_count
        threads = blas_thread_count()
        futures = [client.submit(worker_task, model_dir, options["dtype"], model_options, options,
                                 [p[0] for p in todo[s:s + chunk]], [p[1] for p in todo[s:s + chunk]], threads, pure=False)
                   for s in range(0, len(todo), chunk)]
        for fut in as_completed(futures):
            try:
                lines = fut.result()
            except Exception as e:          # a worker died (KilledWorker), lost connection, ...
                for f in futures:
                    f.cancel()
                raise RefimplError(f"a Dask task failed ({_message(e)}); the records written so far are kept: "
                                   f"rerun the same command to finish") from None
            for line, is_error in lines:
                take(line, is_error)
            fut.release()


def summarize(out: str, plots: bool = False) -> dict:
    """Rebuild OUT/summary.json and summary.md (and figures) from OUT/results.jsonl alone."""
    from .batch_summary import build_summary, summary_markdown
    old = check_out(out, None)
    if old is None and not os.path.exists(os.path.join(out, RESULTS)):
        raise RefimplError(f"{out}: not a refimpl batch directory (no {MANIFEST} or {RESULTS})")
    records = read_results(out)
    s = build_summary(records, old)
    if plots:
        from .batch_summary import write_figures
        s["figures"] = write_figures(s, os.path.join(out, FIGURES))
    write_atomic(os.path.join(out, SUMMARY_JSON), json.dumps(s, indent=1, default=output.jsonable) + "\n")
    write_atomic(os.path.join(out, SUMMARY_MD), summary_markdown(s))
    return s
