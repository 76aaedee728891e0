"""Analysis subcommands: locate (the main job) and one subcommand per analysis of the paper.

Each shares the prompt/model/target options and prints a table, or JSON with --json.
"""
from __future__ import annotations


import numpy as np

from .cli_common import (check_layer, check_neuron, command, common, emit, open_model, positive_int, prepare,
                         prompt_source)
from .errors import RefimplError


@command("locate", "the main job: which layers and subvalues raise the target's log-probability, and what activates them")
def cmd_locate(p, args=None):
    if args is None:
        common(p)
        p.add_argument("--top", type=positive_int, default=10, help="K best subvalues of each kind (default 10)")
        p.add_argument("--exhaustive", action="store_true",
                       help="score every FFN subvalue, attention subvalue and attention neuron by brute force "
                            "(default: the same exact top-K found with bounds)")
        p.add_argument("--counts", choices=["auto", "yes", "no"], default="auto",
                       help="per-layer helpful/unhelpful counts (auto: on small models, after "
                            "`refimpl prepare`, and with --exhaustive)")
        p.add_argument("--plots", default=None, metavar="DIR", help="write the paper's figures as PNGs (needs matplotlib)")
        p.add_argument("--versus", default=None, metavar="TOKEN",
                       help="compare the target's bs-value with this token (Fig. 10-11; a single token; "
                            "default: the runner-up, the most probable other token)")
        p.add_argument("--versus-id", type=int, default=None, metavar="ID",
                       help="the same, by token id (default: the runner-up)")
        return
    from .locate import format_report, locate
    model = open_model(args)
    src = prompt_source(args)
    if args.versus is not None and args.versus_id is not None:
        raise RefimplError("give either --versus or --versus-id, not both")
    if args.plots:
        from .plots import require_matplotlib
        require_matplotlib()
    r = locate(model, src, target=args.target, target_id=args.target_id, position=args.position, top=args.top,
               readout=args.readout, exhaustive=args.exhaustive, counts={"auto": "auto", "yes": True, "no": False}[args.counts],
               versus=args.versus, versus_id=args.versus_id, prepend_bos=args.prepend_bos)
    if args.plots:
        from .plots import write_figures
        r["figures"] = write_figures(model, src, r, args.plots)
    emit(args, r, format_report(r))


@command("layers", "layer significance: log-probability and probability increase of every attention and FFN layer")
def cmd_layers(p, args=None):
    if args is None:
        return common(p)
    from .significance import layer_significance
    model, trace, t, w, R = prepare(args)
    rows = layer_significance(trace, w, t, R)
    text = [f"target {model.token_str(w)!r} at position {t}", f"{'layer':>5} {'attn logp':>10} {'attn p':>9} {'ffn logp':>10} {'ffn p':>9}"]
    text += [f"{r['layer']:>5} {r['attn']['log_prob_increase']:>10.4f} {r['attn']['prob_increase']:>9.4f} "
             f"{r['ffn']['log_prob_increase']:>10.4f} {r['ffn']['prob_increase']:>9.4f}" for r in rows]
    emit(args, {"target": w, "position": t, "layers": rows}, "\n".join(text))


# --by for attention subvalues: CLI spelling -> Trace.attn_subvalues' `by`, and what the array axes index
ATTN_BY = {"position": "position", "head": "head", "head_position": "head_position",
           "head-neuron": "head_neuron_position"}
ATTN_INDEX = {"position": ["position"], "head": ["head"], "head_position": ["head", "position"],
              "head_neuron_position": ["head", "dim", "position"]}


@command("subvalues", "subvalue significance of one layer (attention by position/head, or FFN neurons)")
def cmd_subvalues(p, args=None):
    if args is None:
        common(p)
        p.add_argument("--layer", type=int, required=True)
        p.add_argument("--kind", choices=["attn", "ffn"], default="ffn")
        p.add_argument("--by", choices=list(ATTN_BY), default="position",
                       help="attention subvalues by source position (default; heads summed), head, "
                            "head_position, or head-neuron (head, head dimension, source position)")
        p.add_argument("--top", type=positive_int, default=10)
        return
    from .significance import attn_subvalue_significance, ffn_layer_summary, ffn_subvalue_significance
    model, trace, t, w, R = prepare(args)
    check_layer(model, args.layer)
    if args.kind == "attn":
        by = ATTN_BY[args.by]
        s = attn_subvalue_significance(trace, args.layer, w, t, by, R)
        c, pinc = s["log_prob_increase"], s["prob_increase"]
        obj = {"by": by, "index": ATTN_INDEX[by], "log_prob_increase": c, "prob_increase": pinc, "bias": s["bias"]}
    else:
        c, pinc = ffn_subvalue_significance(trace, args.layer, w, t, readout=R)
        obj = {"log_prob_increase": c, "prob_increase": pinc,
               "summary": ffn_layer_summary(trace, args.layer, w, t, R, scores=c)}
    flat = c.reshape(-1)
    order = np.argsort(-flat, kind="stable")[:args.top]
    idx = [np.unravel_index(j, c.shape) for j in order]
    index = ", ".join(obj.get("index", ["neuron"]))
    text = [f"layer {args.layer} {args.kind} subvalues for target {model.token_str(w)!r} "
            f"(({index}), logp increase, p increase):"]
    text += [f"  {tuple(int(x) for x in ix)!s:<12} {c[ix]:+.5f} {pinc[ix]:+.5f}" for ix in idx]
    if args.kind == "ffn":
        text.append(f"  summary: {obj['summary']}")
    emit(args, obj, "\n".join(text))


@command("vocab", "vocabulary view of a vector: top/bottom tokens by bs-value and the target's rank")
def cmd_vocab(p, args=None):
    if args is None:
        common(p)
        p.add_argument("--layer", type=int, default=None)
        p.add_argument("--vector", default="ffn", choices=["ffn", "attn", "ffn-neuron", "attn-position", "attn-head",
                                                           "Lin", "Lres", "Lout"],
                       help="a layer vector, a subvalue (with --index) or a residual state")
        p.add_argument("--index", type=int, default=None, help="neuron / source position / head")
        p.add_argument("--top", type=positive_int, default=10)
        return
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
            if args.index is None or not 0 <= args.index < len(sv):
                raise RefimplError(f"--index {args.index} out of range (0..{len(sv) - 1})")
            v = sv[args.index]
        else:
            v = {"ffn": L.ffn, "attn": L.attn, "Lin": L.lin, "Lres": L.lres, "Lout": L.lout}[args.vector][t]
        view = vocab_view(model, R, v, w, args.top)
    text = [f"top: {' '.join(repr(x['token']) for x in view['top'])}",
            f"bottom: {' '.join(repr(x['token']) for x in view['bottom'])}",
            f"target {model.token_str(w)!r} rank {view['target_rank']}"
            + (f" (rank in bare fc2: {view['target_rank_in_fc2']})" if "target_rank_in_fc2" in view else "")]
    emit(args, view, "\n".join(text))


@command("additivity", "additivity check: C(v1+...+vk) against C(v1)+...+C(vk) for a layer's helpful subvalues")
def cmd_additivity(p, args=None):
    if args is None:
        common(p)
        p.add_argument("--layer", type=int, required=True)
        p.add_argument("--kind", choices=["attn", "ffn"], default="ffn")
        p.add_argument("--max", type=positive_int, default=50)
        return
    from .significance import additivity
    model, trace, t, w, R = prepare(args)
    check_layer(model, args.layer)
    a = additivity(trace, args.layer, w, t, args.kind, args.max, R)
    text = [f"{'k':>4} {'sum C(vi)':>11} {'C(sum vi)':>11} {'sum P(vi)':>11} {'P(sum vi)':>11}"]
    text += [f"{j + 1:>4} {a['sum_of_log_prob_increases'][j]:>11.5f} {a['log_prob_increase_of_sum'][j]:>11.5f} "
             f"{a['sum_of_prob_increases'][j]:>11.5f} {a['prob_increase_of_sum'][j]:>11.5f}" for j in range(len(a["indices"]))]
    emit(args, a, "\n".join(text))


@command("subkey", "subkey of an FFN neuron and the exact decomposition of its pre-activation (Section 3.3, Eq. 23)")
def cmd_subkey(p, args=None):
    if args is None:
        common(p, target=False)
        p.add_argument("--layer", type=int, required=True)
        p.add_argument("--neuron", type=int, default=None, help="one neuron (default: every neuron: Fig. 4 data)")
        p.add_argument("--which", choices=["in", "gate"], default="in")
        return
    from .subkeys import preactivation
    args.target = args.target_id = None
    model, trace, t, _, _ = prepare(args)
    check_layer(model, args.layer)
    if args.neuron is not None:
        check_neuron(model, args.neuron)
    terms = preactivation(trace, args.layer, t, args.neuron, args.which)
    if args.neuron is None:
        text = (f"layer {args.layer} position {t}: mu={terms['mu']:.6f} sigma={terms['sigma']:.6f}; "
                f"{model.cfg.d_ff} neurons (x@K vs h: use --json for the Fig. 4 data)")
    else:
        text = (f"h = x@K/sigma - mu*lambda/sigma + B = {terms['xK']:.6f}/{terms['sigma']:.6f} - "
                f"{terms['mu']:.6f}*{terms['lambda']:.6f}/{terms['sigma']:.6f} + {terms['B']:.6f} = {terms['h']:.6f}")
    emit(args, terms, text)


@command("trace", "activation tracing: what activates an FFN neuron (Section 4.2, Fig. 8-9)")
def cmd_trace(p, args=None):
    if args is None:
        common(p, target=False)
        p.add_argument("--layer", type=int, required=True)
        p.add_argument("--neuron", type=int, required=True)
        p.add_argument("--which", choices=["in", "gate"], default=None, help="subkey (default: gate and in for SwiGLU)")
        p.add_argument("--source", default=None, help="split one source vector (attn.J, ffn.J, emb.token) into its subvalues")
        p.add_argument("--by", choices=list(ATTN_BY), default="position",
                       help="how --source attn.J is split: by source position (default), head, head_position "
                            "or head-neuron (head, head dimension, source position)")
        return
    from . import tracing
    args.target = args.target_id = None
    model, trace, t, _, _ = prepare(args)
    check_layer(model, args.layer)
    check_neuron(model, args.neuron)
    whiches = [args.which] if args.which else tracing.default_which(model)
    out, text = [], []
    for which in whiches:
        if args.source:
            r = tracing.trace_source(trace, args.layer, args.neuron, args.source, t, which, ATTN_BY[args.by])
            order = np.argsort(-np.abs(r["values"]), kind="stable")[:15]
            text.append(f"{which} subkey: {args.source} contributes {r['total']:+.5f}; by subvalue:")
            text += [f"  {r['labels'][j]:<28} {r['values'][j]:+.5f}" for j in order]
        else:
            r = tracing.trace_activation(trace, args.layer, args.neuron, t, which)
            text.append(f"{which} subkey: pre-activation {r['pre_activation']:+.5f} = sum of")
            text += [f"  {c['source']:<12} {c['value']:+.5f}" for c in r["contributions"]]
        out.append(r)
    emit(args, out, "\n".join(text))


@command("compare-tokens", "bs-values of tokens along the residual stream and per-layer changes of their difference")
def cmd_compare_tokens(p, args=None):
    if args is None:
        common(p, target=False)
        p.add_argument("--tokens", required=True, help="comma-separated tokens (each a single token) or ids with --token-ids")
        p.add_argument("--token-ids", action="store_true")
        return
    from .compare import bs_difference_changes, bs_trajectory
    from .locate import resolve_target
    args.target = args.target_id = None
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
    obj = {"trajectory": traj}
    text = [f"{'state':<9} " + " ".join(f"{model.token_str(i)!r:>12}" for i in ids)]
    text += [f"{s:<9} " + " ".join(f"{v:>12.4f}" for v in row) for s, row in zip(traj["states"], traj["bs"])]
    if len(ids) >= 2:
        d = bs_difference_changes(trace, ids[0], ids[1], t, R)
        obj["difference"] = d
        text.append(f"\nchange of bs({model.token_str(ids[0])!r}) - bs({model.token_str(ids[1])!r}) per layer "
                    f"(start {d['start']:+.4f}, end {d['end']:+.4f}):")
        text += [f"  layer {r['layer']:>3}: attn {r['attn']:+.4f}  ffn {r['ffn']:+.4f}" for r in d["layers"]]
    emit(args, obj, "\n".join(text))


@command("baseline", "Appendix E: FFN subvalues ranked by coefficient x norm (Geva et al.) next to log-probability increase")
def cmd_baseline(p, args=None):
    if args is None:
        common(p)
        p.add_argument("--top", type=positive_int, default=10, help="K subvalues in each ranking (default 10)")
        p.add_argument("--signed", action="store_true",
                       help="rank by m x ||fc2|| (negative coefficients last) instead of the paper's |m| x ||fc2|| "
                            "(Table 4; the default)")
        return
    from .baseline import compare_rankings
    model, trace, t, w, R = prepare(args)
    r = compare_rankings(trace, w, t, args.top, R, signed=args.signed)
    text = []
    for key in ("by_log_prob_increase", "by_coef_x_norm"):
        text.append("by log-probability increase:" if key == "by_log_prob_increase" else f"by {r['score']}:")
        text += [f"  L{x['layer']} n{x['neuron']:<6} logp {x['log_prob_increase']:+.4f}  m {x['coefficient']:+.4f}  "
                 f"||fc2|| {x['fc2_norm']:.4f}  {r['score']} {x['coef_x_norm']:+.4f}  target rank {x['target_rank']}"
                 for x in r[key]]
    emit(args, r, "\n".join(text))
