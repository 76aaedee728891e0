"""`refimpl dump` and `refimpl compare`: the correctness-oracle workflow (docs/oracle.md)."""
from __future__ import annotations

import os

from .cli_common import command, common, emit, no_effect, prepare
from .errors import RefimplError


@command("dump", "write every residual-stream vector and decomposition of a run to one safetensors file")
def cmd_dump(p, args=None):
    if args is None:
        common(p)
        p.add_argument("--out", required=True, help="output .safetensors file")
        p.add_argument("--no-subvalue-scores", action="store_true",
                       help="skip scoring every subvalue (the expensive part on large models)")
        return
    from . import display
    from .dump import write_dump
    from .safetensors_io import read_header
    if os.path.isdir(args.out):
        raise RefimplError(f"{args.out}: is a directory; --out names the .safetensors file to write")
    model, trace, t, w, _ = prepare(args)
    write_dump(args.out, trace, t, w, args.readout, not args.no_subvalue_scores)
    n = len(read_header(args.out)[0])
    emit(args, {"out": os.path.abspath(args.out), "n_tensors": n, "subvalue_scores": not args.no_subvalue_scores},
         f"wrote {args.out}: {n} tensors, {len(trace.ids)} tokens, {model.cfg.n_layers} layers, {model.dtype}, "
         f"position {t}, target {display.token(model, w)}")


@command("compare", "compare two dumps tensor by tensor; exit 1 when a tolerance is exceeded")
def cmd_compare(p, args=None):
    if args is None:
        p.add_argument("a", help="dump A (.safetensors)")
        p.add_argument("b", help="dump B (.safetensors), the reference for relative differences")
        p.add_argument("--rtol", type=float, default=1e-10, help="relative tolerance (of |B|)")
        p.add_argument("--atol", type=float, default=1e-12, help="absolute tolerance")
        p.add_argument("--summary", action="store_true",
                       help="print only the failing tensors (one line each) and the total line")
        p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
        return
    if args.summary and args.json:
        no_effect("--summary", "with --json (the JSON object lists every tensor)")
    from .dump import compare_files
    for f in (args.a, args.b):
        if not os.path.isfile(f):
            raise RefimplError(f"{f}: no such file")
    rows, only = compare_files(args.a, args.b, args.rtol, args.atol)
    if not rows:
        raise RefimplError("the two files share no tensor names")
    failed = sum(not r.get("ok", False) for r in rows)
    if args.json:
        emit(args, {"a": os.path.abspath(args.a), "b": os.path.abspath(args.b), "rtol": args.rtol, "atol": args.atol,
                    "ok": failed == 0, "n_shared": len(rows), "n_failed": failed, "tensors": rows, **only}, "")
        return 1 if failed else 0
    width = max(len(r["name"]) for r in rows)
    shown = [r for r in rows if not args.summary or not r.get("ok", False)]
    if shown:
        print(f"{'tensor':<{width}}  {'max abs':>10}  {'max rel':>10}  status")
    for r in shown:
        if "problem" in r:
            status, ma, mr = f"FAIL {r['problem']} {r['shape_a']} vs {r['shape_b']}", "-", "-"
        else:
            ma, mr = f"{r['max_abs']:.3e}", f"{r['max_rel']:.3e}"
            status = "ok" if r["ok"] else (f"FAIL first at {tuple(r['first_bad_index'])}: "
                                           f"{r['values_at_first_bad'][0]:.10g} vs {r['values_at_first_bad'][1]:.10g}")
        print(f"{r['name']:<{width}}  {ma:>10}  {mr:>10}  {status}")
    for k, names in only.items():
        if names:
            print(f"{k.replace('_', ' ')}: {len(names)} tensor(s): {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}")
    print(f"{len(rows) - failed}/{len(rows)} shared tensors within rtol={args.rtol:g} atol={args.atol:g}"
          + (f"; {failed} failed" if failed else ""))
    return 1 if failed else 0
