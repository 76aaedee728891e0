"""Model subcommands: convert, verify, predict, models, prepare."""
from __future__ import annotations

import json
import os

import numpy as np

from .cli_common import add_prepend_bos, command, open_model, parse_ids, positive_int
from .errors import RefimplError


@command("convert", "convert a checkpoint (llama2.c, HF GPT-2/Llama, Meta LLaMA, fairseq) to the canonical format")
def cmd_convert(p, args=None):
    if args is None:
        p.add_argument("src", help="checkpoint file or directory")
        p.add_argument("dst", help="output model directory (must be empty or absent)")
        p.add_argument("--format", dest="fmt", default=None, help="force a source format")
        p.add_argument("--tokenizer", default=None, help="tokenizer file, where the format needs one")
        p.add_argument("--force", action="store_true", help="replace a non-empty DST")
        return
    import converters
    out = converters.convert(args.src, args.dst, fmt=args.fmt, force=args.force, tokenizer=args.tokenizer)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    print(f"wrote {out}: {cfg['family']} ({cfg['source']['format']}), {cfg['n_layers']} layers, "
          f"d_model {cfg['d_model']}, vocabulary {cfg['d_vocab']}")


@command("verify", "re-hash a converted model directory against the hashes recorded at conversion")
def cmd_verify(p, args=None):
    if args is None:
        p.add_argument("model", help="converted model directory")
        return
    from .verify import verify
    problems = verify(args.model)
    if problems:
        for line in problems:
            print(line)
        raise RefimplError(f"{args.model}: {len(problems)} file(s) failed verification")
    print(f"{args.model}: all files match their recorded sha256")


@command("predict", "run a prompt and print the next-token distribution at the last position")
def cmd_predict(p, args=None):
    if args is None:
        p.add_argument("prompt", nargs="?", default=None)
        p.add_argument("--ids", default=None, help="comma-separated token ids, used verbatim")
        add_prepend_bos(p)
        p.add_argument("--model", default=None, help="converted model directory")
        p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
        p.add_argument("--top", type=positive_int, default=10)
        p.add_argument("--generate", type=positive_int, default=None, help="greedy-decode this many tokens")
        return
    from .forward import forward, run
    model = open_model(args)
    if args.ids and args.prepend_bos is not None:
        raise RefimplError("--prepend-bos/--no-prepend-bos apply to a text PROMPT; --ids are used verbatim")
    ids = parse_ids(args.ids) if args.ids else model.encode(args.prompt or "", args.prepend_bos)
    if args.generate:
        out = list(ids)
        for _ in range(args.generate):
            nxt = int(np.argmax(forward(model, out).log_probs[-1]))
            if nxt in model.cfg.prepend_ids or len(out) >= model.cfg.n_ctx:
                break
            out.append(nxt)
        print(model.decode(out))
        return
    trace = run(model, ids)
    lp = trace.log_probs[-1]
    print("tokens:", " ".join(repr(t) for t in trace.tokens))
    for r, w in enumerate(np.argsort(-lp, kind="stable")[:args.top]):
        print(f"{r:>3}  {int(w):>6}  {model.token_str(w)!r:<20} p={np.exp(lp[w]):.6f}  log p={lp[w]:.6f}")


@command("models", "list the models shipped with the package")
def cmd_models(p, args=None):
    if args is None:
        return
    from .embedded import DATA, DEFAULT, embedded_models
    names = embedded_models()
    if not names:
        print("no embedded models installed")
    for n in names:
        with open(os.path.join(DATA, n, "config.json")) as f:
            c = json.load(f)
        print(f"{n}{' (default)' if n == DEFAULT else ''}: {c['family']}, {c['n_layers']} layers, d_model {c['d_model']}, "
              f"vocabulary {c['d_vocab']}  [{os.path.join(DATA, n)}]")


@command("prepare", "one-time work per model: per-neuron score ranges (exact counts) and a compute-dtype weight copy")
def cmd_prepare(p, args=None):
    if args is None:
        p.add_argument("--model", default=None, help="converted model directory (default: the embedded model)")
        p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
        p.add_argument("--readout", default="frozen", choices=["frozen", "raw"])
        p.add_argument("--weight-cache", choices=["auto", "yes", "no"], default="auto",
                       help="write the weights converted to --dtype (auto: when the copy is at most 8 GB)")
        return
    import time
    from . import bounds
    from .readout import Readout
    model = open_model(args)
    t0 = time.perf_counter()
    nbytes = sum(int(np.prod(t.shape)) for t in model.tensors.values()) * model.dtype.itemsize
    if args.weight_cache == "yes" or (args.weight_cache == "auto" and nbytes <= 8 * 1024**3):
        if model.upcast_cache is None and model.needs_upcast():
            path = model.write_upcast_cache()
            print(f"weights in {model.dtype.name}: {path} ({nbytes / 1e9:.2f} GB, {time.perf_counter() - t0:.1f} s)")
    R = Readout(model, np.ones(model.cfg.d_model, model.dtype), args.readout)   # ranges do not depend on the state
    bounds.neuron_ranges(R)
    print(f"per-neuron ranges ready in {bounds.cache_dir(model)} ({time.perf_counter() - t0:.1f} s)")
