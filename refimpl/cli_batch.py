"""`refimpl batch`: the main job over a prompt file, resumable, with a cross-sentence summary (docs/batch.md)."""
from __future__ import annotations

import argparse
import os

from .cli_analysis import NEGLIGIBLE, _tau
from .cli_common import add_prepend_bos, command, model_options, positive_int
from .errors import RefimplError


@command("batch", "the main job over many prompts: one `locate --json` record per prompt in OUT/results.jsonl "
                  "(resumable), and a cross-sentence summary (docs/batch.md)")
def cmd_batch(p, args=None):
    if args is None:
        from .batch_io import FORMATS, shipped_prompts
        names = ", ".join(shipped_prompts()) or "none"
        p.add_argument("prompts", nargs="?", default=None, metavar="PROMPTS",
                       help="prompt file: JSON Lines ({\"prompt\", \"target\", \"group\", \"id\"} a line), CSV with "
                            "those columns, plain text (one prompt a line), or the known-facts JSON layout; or the "
                            f"name of a shipped prompt file ({names})")
        model_options(p)
        p.add_argument("--out", default=None, metavar="OUT",
                       help="output directory: results.jsonl, summary.json, summary.md (created; a rerun resumes it)")
        p.add_argument("--summarize", default=None, metavar="OUT",
                       help="only rebuild OUT/summary.json and summary.md from OUT/results.jsonl")
        p.add_argument("--format", default="auto", choices=list(FORMATS),
                       help="layout of PROMPTS (auto: from the name's ending: .jsonl/.ndjson, .csv, .json, else text)")
        p.add_argument("--top", type=positive_int, default=10, help="K best subvalues of each kind per prompt")
        p.add_argument("--readout", default="frozen", choices=["frozen", "frozen-nobias", "raw", "lens"],
                       help="vocabulary readout, as for `refimpl locate`")
        p.add_argument("--exhaustive", action="store_true",
                       help="score every subvalue by brute force (as `refimpl locate --exhaustive`)")
        p.add_argument("--counts", choices=["auto", "yes", "no"], default="auto",
                       help="per-layer helpful/unhelpful counts, as for `refimpl locate`")
        p.add_argument("--negligible", type=_tau, default=NEGLIGIBLE, metavar="TAU",
                       help=f"counts: |C| <= TAU nats is negligible, as for `refimpl locate` (default {NEGLIGIBLE:g})")
        p.add_argument("--share", choices=["exact", "bound"], default="exact",
                       help="top-10 shares exact or a certified [lo, hi] bracket, as for `refimpl locate`")
        add_prepend_bos(p)
        p.add_argument("--chunk", type=positive_int, default=None, metavar="N",
                       help="prompts run through the layers together (default: 1 for a model held in memory; for a "
                            "model larger than the weight cache as many as keep their traces under 2 GiB, at most 64; "
                            "with --workers/--scheduler: prompts per task, 1)")
        p.add_argument("--workers", type=positive_int, default=None, metavar="N",
                       help="run on a local Dask cluster of N worker processes (needs refimpl[cluster])")
        p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="run on an existing Dask distributed cluster, e.g. tcp://10.0.0.5:8786 (needs "
                            "refimpl[cluster]; every worker must read --model at the same path)")
        p.add_argument("--plots", action="store_true", help="also write figures to OUT/figures (needs matplotlib)")
        p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
        return
    from .batch import run_batch, summarize
    from .progress import Progress
    if args.summarize is not None:
        given = [o for o, v in (("PROMPTS", args.prompts), ("--out", args.out), ("--model", args.model),
                                ("--workers", args.workers), ("--scheduler", args.scheduler), ("--chunk", args.chunk))
                 if v is not None]
        if given:
            raise RefimplError(f"--summarize rebuilds the summary of OUT only; {given[0]} has no effect with it")
        if not os.path.isdir(args.summarize):
            raise RefimplError(f"{args.summarize}: no such batch directory")
        if args.plots:
            from .plots import require_matplotlib
            require_matplotlib()
        s = summarize(args.summarize, plots=args.plots)
        _print(args.summarize, s)
        return
    if args.prompts is None:
        raise RefimplError("no PROMPTS given (a prompt file, or --summarize OUT)")
    if args.out is None:
        raise RefimplError("--out OUT is required (the directory of results.jsonl and the summary)")
    if args.convert:
        from .cli_common import open_model
        args.model = open_model(args).path
    options = {"top": args.top, "readout": args.readout, "dtype": args.dtype, "exhaustive": args.exhaustive,
               "counts": {"auto": "auto", "yes": True, "no": False}[args.counts], "prepend_bos": args.prepend_bos,
               "negligible": args.negligible, "share": args.share}
    prog = Progress("batch", quiet=args.quiet)
    st = run_batch(args.prompts, args.model, args.out, options, fmt=args.format, chunk=args.chunk,
                   workers=args.workers, scheduler=args.scheduler, progress=prog, plots=args.plots)
    print(f"{st['done']} prompts analysed ({st['errors']} errors), {st['skipped']} already done, "
          + (f"{st['repeats']} repeated, " if st["repeats"] else "") + f"{st['total']} in the file")
    _print(args.out, st["summary"])


def _print(out: str, s: dict) -> None:
    o = s["overall"]
    rate = o["top1"]["rate"]
    print(f"{os.path.join(out, 'results.jsonl')}: {s['n_prompts']} records, {s['n_errors']} errors; "
          f"target is the top-1 prediction in {o['top1']['count']} of {o['n_analysed']}"
          + (f" ({rate:.1%})" if rate is not None else ""))
    ffn = [e for e in o["recurring"] if e["kind"] == "ffn"][:5]
    if ffn:
        print("most recurring FFN subvalues (layer, neuron: prompts, mean log-prob increase):")
        for e in ffn:
            print(f"  ffn {e['layer']}, {e['index']}: {e['count']} of {o['n_analysed']}, "
                  f"{e['mean_log_prob_increase']:+.4f}, top tokens {', '.join(map(repr, e['top_tokens'][:4]))}")
    print(f"summary: {os.path.join(out, 'summary.md')}, {os.path.join(out, 'summary.json')}")
