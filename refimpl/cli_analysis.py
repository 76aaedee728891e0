"""Analysis subcommands: locate (the main job) and one subcommand per analysis of the paper.

Each shares the prompt/model/target options and prints a table, or with --json one object
(output.header's common keys plus the command's labelled entries; docs/json.md).
"""
from __future__ import annotations

import argparse

import numpy as np

from . import display
from .cli_common import (check_layer, check_neuron, command, common, emit, no_effect, open_model, positive_int,
                         prepare, prompt_source)
from .errors import RefimplError


NEGLIGIBLE = 1e-6          # = significance.NEGLIGIBLE (not imported here: the CLI starts without it)


def _tau(s: str) -> float:
    """argparse type for --negligible: a finite number >= 0."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 (nats), got {s!r}") from None
    if not np.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0 (nats), got {s!r}")
    return v


def _top(n_or_all: str):
    """argparse type: a positive integer or `all`."""
    if n_or_all == "all":
        return None
    return positive_int(n_or_all)


@command("locate", "the main job: which layers and subvalues raise the target's log-probability, and what activates them")
def cmd_locate(p, args=None):
    if args is None:
        common(p)
        p.add_argument("--top", type=positive_int, default=10, help="K best subvalues of each kind")
        p.add_argument("--exhaustive", action="store_true",
                       help="score every FFN subvalue, attention subvalue and attention neuron by brute force "
                            "(default: the same exact top-K found with bounds)")
        p.add_argument("--counts", choices=["auto", "yes", "no"], default="auto",
                       help="per-layer FFN counts and top-10 shares (Fig. 6-7); auto = yes (no prepare step needed)")
        p.add_argument("--negligible", type=_tau, default=NEGLIGIBLE, metavar="TAU",
                       help="counts: |C| <= TAU nats is negligible, C > TAU helpful, C < -TAU unhelpful "
                            f"(default {NEGLIGIBLE:g}; docs/design-choices.md)")
        p.add_argument("--share", choices=["exact", "bound"], default="exact",
                       help="top-10 shares: exact (scores every helpful/unhelpful subvalue the bounds do not pin "
                            "down: up to an exhaustive pass on dense models) or bound (certified [lo, hi], no extra "
                            "scoring)")
        p.add_argument("--plots", default=None, metavar="DIR", help="write the paper's figures as PNGs (needs matplotlib)")
        p.add_argument("--force", action="store_true", help="with --plots: replace figures already in DIR")
        p.add_argument("--versus", default=None, metavar="TOKEN",
                       help="compare the target's bs-value with this token (Fig. 10-11; a single token; "
                            "default: the runner-up, the most probable other token)")
        p.add_argument("--versus-id", type=int, default=None, metavar="ID",
                       help="the same, by token id (default: the runner-up)")
        return
    from .locate import format_report, locate
    model = open_model(args)
    src = prompt_source(args)
    if args.force and not args.plots:
        raise RefimplError("--force only applies to --plots (it replaces existing figures)")
    if args.versus is not None and args.versus_id is not None:
        raise RefimplError("give either --versus or --versus-id, not both")
    if args.plots:
        from .plots import check_outdir, require_matplotlib
        require_matplotlib()
        check_outdir(args.plots, args.force)
    r = locate(model, src, target=args.target, target_id=args.target_id, position=args.position, top=args.top,
               readout=args.readout, exhaustive=args.exhaustive, counts={"auto": "auto", "yes": True, "no": False}[args.counts],
               negligible=args.negligible, share=args.share,
               versus=args.versus, versus_id=args.versus_id, prepend_bos=args.prepend_bos)
    if args.plots:
        from .plots import write_figures
        r["figures"] = write_figures(model, src, r, args.plots, force=args.force)
    emit(args, r, format_report(r, model))


def _tok(model, i) -> str:
    return display.token(model, i)


@command("layers", "layer significance: log-probability and probability increase of every attention and FFN layer")
def cmd_layers(p, args=None):
    if args is None:
        return common(p)
    from .significance import layer_significance
    model, trace, t, w, R = prepare(args)
    rows = layer_significance(trace, w, t, R)
    text = [f"target {_tok(model, w)} at position {t}", f"{'layer':>5} {'attn logp':>10} {'attn p':>9} {'ffn logp':>10} {'ffn p':>9}"]
    text += [f"{r['layer']:>5} {r['attn']['log_prob_increase']:>10.4f} {r['attn']['prob_increase']:>9.4f} "
             f"{r['ffn']['log_prob_increase']:>10.4f} {r['ffn']['prob_increase']:>9.4f}" for r in rows]
    emit(args, {"layers": rows}, "\n".join(text))


# --by for attention subvalues: CLI spelling -> Trace.attn_subvalues' `by`
ATTN_BY = {"position": "position", "head": "head", "head_position": "head_position",
           "head-neuron": "head_neuron_position"}


@command("subvalues", "subvalue significance of one layer (attention by position/head, or FFN neurons)")
def cmd_subvalues(p, args=None):
    if args is None:
        common(p)
        p.add_argument("--layer", type=int, required=True, help="layer index, 0-based")
        p.add_argument("--kind", choices=["attn", "ffn"], default="ffn", help="attention or FFN subvalues")
        p.add_argument("--by", choices=list(ATTN_BY), default=None,
                       help="how attention subvalues are split (with --kind attn; default: position): by source "
                            "position (heads summed), head, head_position, or head-neuron (attention neurons: "
                            "head, head dimension, source position)")
        p.add_argument("--top", type=_top, default=10, metavar="K",
                       help="list the K best subvalues (`all`: every one)")
        p.add_argument("--negligible", type=_tau, default=NEGLIGIBLE, metavar="TAU",
                       help=f"with --kind ffn: the layer's counts treat |C| <= TAU nats as negligible (default {NEGLIGIBLE:g})")
        return
    if args.kind == "ffn" and args.by is not None:
        no_effect("--by", "with --kind ffn (it splits attention subvalues; add --kind attn)")
    from .significance import attn_subvalue_significance, ffn_layer_summary, ffn_subvalue_significance
    model, trace, t, w, R = prepare(args)
    check_layer(model, args.layer)
    by = ATTN_BY[args.by or "position"]
    body = {"layer": args.layer, "kind": args.kind, "by": by if args.kind == "attn" else None}
    if args.kind == "attn":
        s = attn_subvalue_significance(trace, args.layer, w, t, by, R)
        c, pinc = s["log_prob_increase"], s["prob_increase"]
        bias = {"log_prob_increase": s["bias"][0], "prob_increase": s["bias"][1]}
    else:
        c, pinc = ffn_subvalue_significance(trace, args.layer, w, t, readout=R)
        cb, pb = _ffn_bias_increase(trace, args.layer, w, t, R)
        bias = {"log_prob_increase": cb, "prob_increase": pb}
    flat = c.reshape(-1)
    order = np.argsort(-flat, kind="stable")[:args.top]
    m = trace.layers[args.layer].m[t]
    entries = []
    for rank, j in enumerate(order):
        ix = tuple(int(x) for x in np.unravel_index(j, c.shape))
        e = {"rank": rank}
        if args.kind == "ffn":
            e.update(neuron=ix[0], coefficient=float(m[ix[0]]))
        elif by == "position":
            e.update(position=ix[0], source_token=trace.tokens[ix[0]])
        elif by == "head":
            e.update(head=ix[0])
        elif by == "head_position":
            e.update(head=ix[0], position=ix[1], source_token=trace.tokens[ix[1]])
        else:                                                               # attention neuron
            e.update(head=ix[0], dim=ix[1], position=ix[2], source_token=trace.tokens[ix[2]])
        e.update(log_prob_increase=float(c[ix]), prob_increase=float(pinc[ix]))
        entries.append(e)
    body.update(n_subvalues=int(flat.size), subvalues=entries, bias=bias)
    if args.kind == "ffn":
        body["summary"] = ffn_layer_summary(trace, args.layer, w, t, R, scores=c, negligible=args.negligible)
    what = {"ffn": "neuron", "position": "source position", "head": "head", "head_position": "head, position",
            "head_neuron_position": "head, dim, position"}
    label = what["ffn" if args.kind == "ffn" else by]
    shown = len(entries) if args.top is None else min(args.top, flat.size)
    text = [f"layer {args.layer} {'FFN' if args.kind == 'ffn' else 'attention'} subvalues for target {_tok(model, w)}: "
            f"{shown} best of {flat.size}"]
    text.append(f"  {'rank':>4}  {label:<22} {'logp incr':>10} {'p incr':>10}")
    for e in entries:
        if args.kind == "ffn":
            where = f"n{e['neuron']} m={e['coefficient']:+.3f}"
        elif by == "position":
            where = f"pos {e['position']} {_tok(model, trace.ids[e['position']])}"
        elif by == "head":
            where = f"head {e['head']}"
        elif by == "head_position":
            where = f"head {e['head']} pos {e['position']} {_tok(model, trace.ids[e['position']])}"
        else:
            where = f"h{e['head']} d{e['dim']} pos {e['position']} {_tok(model, trace.ids[e['position']])}"
        text.append(f"  {e['rank']:>4}  {where:<22} {e['log_prob_increase']:>+10.5f} {e['prob_increase']:>+10.5f}")
    text.append(f"  {'bias':>4}  {'b_O' if args.kind == 'attn' else 'b_out':<22} {bias['log_prob_increase']:>+10.5f} "
                f"{bias['prob_increase']:>+10.5f}")
    if args.kind == "ffn":
        sm = body["summary"]
        tau = sm["threshold"]
        text.append(f"  activated {sm['activated']}, helpful (C > {tau:g}) {sm['helpful']}, unhelpful (C < -{tau:g}) "
                    f"{sm['unhelpful']}, negligible {sm['negligible']}; top-10 share of helpful "
                    f"{sm['top10_share']:.3f}, of unhelpful {sm['top10_share_unhelpful']:.3f} (exact)")
    emit(args, body, "\n".join(text))


def _ffn_bias_increase(trace, i, w, t, R) -> tuple[float, float]:
    from .significance import increases
    c, p = increases(R, trace.layers[i].lres[t], trace.ffn_bias_subvalue(i)[None], w)
    return float(c[0]), float(p[0])


VECTORS = ["ffn", "attn", "ffn-neuron", "attn-position", "attn-head", "Lin", "Lres", "Lout"]
INDEXED = {"ffn-neuron": "NEURON", "attn-position": "POSITION", "attn-head": "HEAD"}


@command("vocab", "vocabulary view of a vector: top/bottom tokens by bs-value and the target's rank")
def cmd_vocab(p, args=None):
    if args is None:
        common(p)
        p.add_argument("--layer", type=int, required=True, help="layer index, 0-based")
        p.add_argument("--vector", default="ffn", choices=VECTORS,
                       help="a layer's output (ffn, attn), one subvalue (ffn-neuron, attn-position, attn-head; "
                            "with --index) or a residual state (Lin, Lres, Lout)")
        p.add_argument("--index", type=int, default=None,
                       help="neuron, source position or head of the subvalue (only with ffn-neuron, "
                            "attn-position, attn-head)")
        p.add_argument("--top", type=positive_int, default=10, help="K top and K bottom tokens")
        return
    if args.vector in INDEXED and args.index is None:
        raise RefimplError(f"--vector {args.vector} needs --index {INDEXED[args.vector]}")
    if args.vector not in INDEXED and args.index is not None:
        no_effect("--index", f"with --vector {args.vector} (only with {', '.join(INDEXED)})")
    from .vocab import ffn_subvalue_view, vocab_view
    model, trace, t, w, R = prepare(args)
    check_layer(model, args.layer)
    i, L = args.layer, trace.layers[args.layer]
    if args.vector == "ffn-neuron":
        check_neuron(model, args.index)
        view = ffn_subvalue_view(trace, i, args.index, t, w, R, args.top)
    else:
        if args.vector in ("attn-position", "attn-head"):
            sv = trace.attn_subvalues(i, t, args.vector.split("-")[1])
            if not 0 <= args.index < len(sv):
                raise RefimplError(f"--index {args.index} out of range (0..{len(sv) - 1})")
            v = sv[args.index]
        else:
            v = {"ffn": L.ffn, "attn": L.attn, "Lin": L.lin, "Lres": L.lres, "Lout": L.lout}[args.vector][t]
        view = vocab_view(model, R, v, w, args.top)
    for side in ("top", "bottom"):
        for x in view[side]:
            x["piece"] = display.piece(model, x["id"])
    body = {"layer": i, "vector": args.vector, "index": args.index, **view}
    text = [f"{'rank':>4}  {'top token':<24} {'bs':>9}    {'bottom token':<24} {'bs':>9}"]
    for r, (a, b) in enumerate(zip(view["top"], view["bottom"])):
        text.append(f"{r:>4}  {display.show(a['token'], a['piece']):<24} {a['bs']:>9.4f}    "
                    f"{display.show(b['token'], b['piece']):<24} {b['bs']:>9.4f}")
    text.append(f"target {_tok(model, w)}: rank {view['target_rank']}, bs {view['target_bs']:.4f}"
                + (f"; rank in the bare fc2 row: {view['target_rank_in_fc2']}" if "target_rank_in_fc2" in view else "")
                + (f"; coefficient m={view['coefficient']:+.4f}" if "coefficient" in view else ""))
    emit(args, body, "\n".join(text))


@command("additivity", "additivity check: C(v1+...+vk) against C(v1)+...+C(vk) for a layer's helpful subvalues")
def cmd_additivity(p, args=None):
    if args is None:
        common(p)
        p.add_argument("--layer", type=int, required=True, help="layer index, 0-based")
        p.add_argument("--kind", choices=["attn", "ffn"], default="ffn",
                       help="FFN subvalues (neurons) or attention subvalues (by source position)")
        p.add_argument("--max", type=positive_int, default=50, help="largest k (helpful subvalues summed)")
        return
    from .significance import additivity
    model, trace, t, w, R = prepare(args)
    check_layer(model, args.layer)
    a = additivity(trace, args.layer, w, t, args.kind, args.max, R)
    keys = ("sum_of_log_prob_increases", "log_prob_increase_of_sum", "sum_of_prob_increases", "prob_increase_of_sum")
    steps = [{"k": j + 1, "index": int(a["indices"][j]), **{k: float(a[k][j]) for k in keys}}
             for j in range(len(a["indices"]))]
    what = "neuron" if args.kind == "ffn" else "position"
    text = [f"{'k':>4} {what:>8} {'sum C(vi)':>11} {'C(sum vi)':>11} {'sum P(vi)':>11} {'P(sum vi)':>11}"]
    text += [f"{s['k']:>4} {s['index']:>8} {s['sum_of_log_prob_increases']:>11.5f} {s['log_prob_increase_of_sum']:>11.5f} "
             f"{s['sum_of_prob_increases']:>11.5f} {s['prob_increase_of_sum']:>11.5f}" for s in steps]
    emit(args, {"layer": args.layer, "kind": args.kind, "steps": steps}, "\n".join(text))


@command("subkey", "subkey of an FFN neuron and the exact decomposition of its pre-activation (Section 3.3, Eq. 23)")
def cmd_subkey(p, args=None):
    if args is None:
        common(p, target=False, readout=False)
        p.add_argument("--layer", type=int, required=True, help="layer index, 0-based")
        p.add_argument("--neuron", type=int, default=None, help="one neuron (default: every neuron: Fig. 4 data)")
        p.add_argument("--which", choices=["in", "gate"], default="in",
                       help="the subkey of W_in, or of W_gate (SwiGLU models)")
        return
    from .subkeys import preactivation
    model, trace, t, _, _ = prepare(args)
    check_layer(model, args.layer)
    if args.neuron is not None:
        check_neuron(model, args.neuron)
    terms = preactivation(trace, args.layer, t, args.neuron, args.which)
    ks = np.arange(model.cfg.d_ff) if args.neuron is None else np.array([args.neuron])
    col = lambda x: np.broadcast_to(np.asarray(x, np.float64), ks.shape)          # noqa: E731
    xK, lam, B, h = (col(terms[k]) for k in ("xK", "lambda", "B", "h"))
    neurons = [{"neuron": int(k), "xK": float(xK[j]), "lambda": float(lam[j]), "B": float(B[j]), "h": float(h[j])}
               for j, k in enumerate(ks)]
    body = {"layer": args.layer, "which": args.which, "mu": float(terms["mu"]), "sigma": float(terms["sigma"]),
            "neurons": neurons}
    if args.neuron is None:
        text = (f"layer {args.layer} position {t}: mu={terms['mu']:.6f} sigma={terms['sigma']:.6f}; "
                f"{model.cfg.d_ff} neurons (x@K vs h: use --json for the Fig. 4 data)")
    else:
        n = neurons[0]
        text = (f"h = x@K/sigma - mu*lambda/sigma + B = {n['xK']:.6f}/{terms['sigma']:.6f} - "
                f"{terms['mu']:.6f}*{n['lambda']:.6f}/{terms['sigma']:.6f} + {n['B']:.6f} = {n['h']:.6f}")
    emit(args, body, text)


@command("trace", "activation tracing: what activates an FFN neuron (Section 4.2, Fig. 8-9)")
def cmd_trace(p, args=None):
    if args is None:
        common(p, target=False, readout=False)
        p.add_argument("--layer", type=int, required=True, help="layer index, 0-based")
        p.add_argument("--neuron", type=int, required=True, help="FFN neuron index")
        p.add_argument("--which", choices=["in", "gate"], default=None, help="subkey (default: gate and in for SwiGLU)")
        p.add_argument("--source", default=None,
                       help="split one source vector (attn.J, ffn.J, emb.token, emb.position) into its subvalues")
        p.add_argument("--by", choices=list(ATTN_BY), default=None,
                       help="how an attention source splits (with --source attn.J; default: position): by source "
                            "position, head, head_position or head-neuron (head, head dimension, source position)")
        return
    if args.by is not None and not (args.source or "").startswith("attn."):
        no_effect("--by", "without --source attn.J (it splits an attention source into subvalues)")
    from . import tracing
    model, trace, t, _, _ = prepare(args)
    check_layer(model, args.layer)
    check_neuron(model, args.neuron)
    whiches = [args.which] if args.which else tracing.default_which(model)
    out, text = [], []
    for which in whiches:
        if args.source:
            r = tracing.trace_source(trace, args.layer, args.neuron, args.source, t, which,
                                     ATTN_BY[args.by or "position"])
            order = np.argsort(-np.abs(r["values"]), kind="stable")[:15]
            text.append(f"{which} subkey: {args.source} contributes {r['total']:+.5f}; by subvalue:")
            text += [f"  {r['labels'][j]:<28} {r['values'][j]:+.5f}" for j in order]
            out.append({"which": which, "source": r["source"], "by": r["by"], "total": r["total"],
                        "subvalues": [{"label": lab, "value": float(v)} for lab, v in zip(r["labels"], r["values"])]})
        else:
            r = tracing.trace_activation(trace, args.layer, args.neuron, t, which)
            text.append(f"{which} subkey: pre-activation {r['pre_activation']:+.5f} = sum of")
            text += [f"  {c['source']:<12} {c['value']:+.5f}" for c in r["contributions"]]
            out.append(r)
    emit(args, {"layer": args.layer, "neuron": args.neuron, "subkeys": out}, "\n".join(text))


@command("compare-tokens", "bs-values of tokens along the residual stream and per-layer changes of their difference")
def cmd_compare_tokens(p, args=None):
    if args is None:
        common(p, target=False)
        p.add_argument("--tokens", required=True,
                       help="comma-separated tokens, each a single token of the vocabulary (ids with --token-ids)")
        p.add_argument("--token-ids", action="store_true", help="--tokens are token ids")
        return
    from .compare import bs_difference_changes, bs_trajectory
    from .locate import resolve_target
    from .output import token_info
    model, trace, t, _, R = prepare(args)
    toks = [x for x in args.tokens.split(",") if x != ""]
    if args.token_ids:
        try:
            ids = [resolve_target(model, None, target_id=int(x)) for x in toks]
        except ValueError:
            raise RefimplError(f"--tokens with --token-ids must be comma-separated integers, got {args.tokens!r}") from None
    else:
        ids = [resolve_target(model, None, x) for x in toks]
    if len(ids) < 1:
        raise RefimplError("--tokens is empty")
    traj = bs_trajectory(trace, ids, t, R)
    compared = [token_info(model, i) for i in ids]
    body = {"compared": compared,
            "trajectory": [{"state": s, "bs": [{**c, "bs": float(v)} for c, v in zip(compared, row)]}
                           for s, row in zip(traj["states"], traj["bs"])]}
    shown = [display.show(c["token"], c["piece"]) for c in compared]
    width = max(12, *(len(s) for s in shown))
    text = [f"{'state':<9} " + " ".join(f"{s:>{width}}" for s in shown)]
    text += [f"{s:<9} " + " ".join(f"{v:>{width}.4f}" for v in row) for s, row in zip(traj["states"], traj["bs"])]
    if len(ids) >= 2:
        d = bs_difference_changes(trace, ids[0], ids[1], t, R)
        body["difference"] = {**d, "a": compared[0], "b": compared[1]}
        text.append(f"\nchange of bs({shown[0]}) - bs({shown[1]}) per layer "
                    f"(start {d['start']:+.4f}, end {d['end']:+.4f}):")
        text += [f"  layer {r['layer']:>3}: attn {r['attn']:+.4f}  ffn {r['ffn']:+.4f}" for r in d["layers"]]
    emit(args, body, "\n".join(text))


@command("baseline", "Appendix E: FFN subvalues ranked by coefficient x norm (Geva et al.) next to log-probability increase")
def cmd_baseline(p, args=None):
    if args is None:
        common(p)
        p.add_argument("--top", type=positive_int, default=10, help="K best FFN subvalues under each ranking")
        p.add_argument("--signed", action="store_true",
                       help="rank by m x ||fc2|| (negative coefficients last) instead of the paper's |m| x ||fc2|| "
                            "(Table 4; the default)")
        return
    from .baseline import compare_rankings
    model, trace, t, w, R = prepare(args)
    r = compare_rankings(trace, w, t, args.top, R, signed=args.signed)
    text = [f"target {_tok(model, w)}"]
    for key in ("by_log_prob_increase", "by_coef_x_norm"):
        text.append("by log-probability increase:" if key == "by_log_prob_increase" else f"by {r['score']}:")
        text += [f"  L{x['layer']} n{x['neuron']:<6} logp {x['log_prob_increase']:+.4f}  m {x['coefficient']:+.4f}  "
                 f"||fc2|| {x['fc2_norm']:.4f}  {r['score']} {x['coef_x_norm']:+.4f}  target rank {x['target_rank']}"
                 for x in r[key]]
    emit(args, r, "\n".join(text))
