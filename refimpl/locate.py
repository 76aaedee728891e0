"""The main job: locate where a prediction comes from (the paper's pipeline on one prompt).

`locate(model, prompt)` runs the model, picks the target (default: the top-1
prediction), scores every layer (Section 4.1.1), finds the most significant attention
subvalues (by source position, heads summed) and FFN subvalues over all layers
(Section 4.1.2; exact top-K via bounds, see topk.py), gives their vocabulary views
(Section 4.1.3), counts helpful/unhelpful FFN subvalues per layer (Fig. 6-7) and traces
what activates the most significant FFN subvalue (Section 4.2). The result is the
stable JSON contract of `refimpl locate --json`; `format_report` renders it as text.
"""
from __future__ import annotations

import contextlib
import time
import warnings

import numpy as np

from . import display, output, tracing
from .blas import one_blas_thread
from .bounds import ModelConstants, bracket_parts
from .compare import bs_difference_changes
from .config import short
from .decomposition import attn_neuron_coefficients, attn_neuron_subvalues
from .errors import RefimplError
from .forward import run, run_ids
from .readout import rank_of, top_ids
from .significance import NEGLIGIBLE, layer_significance
from .topk import check_negligible, ffn_counts, top_attn_neurons, top_attn_subvalues, top_ffn_subvalues

N_TOP_TOKENS = 10


def single_token(model, text: str) -> int | None:
    """The id of `text` as one vocabulary token, or None. Text is encoded as the tokenizer
    encodes a prompt (like TransformerLens's `to_single_token`; the unknown token does not
    count unless `text` is literally it); if that is not one token, `text` is looked up as a
    raw vocabulary piece (e.g. "ĠParis", "▁Paris")."""
    enc = model._tok("encode the target", lambda t: t.encode(text, add_special_tokens=False))
    if len(enc.ids) == 1 and (enc.ids[0] != model.unk_id or text == enc.tokens[0]):
        return int(enc.ids[0])
    tid = model._tok("look up the target", lambda t: t.token_to_id(text))
    return None if tid is None or not 0 <= int(tid) < model.cfg.d_vocab else int(tid)


def _forms(text: str) -> list[str]:
    """Nearby spellings of a target: with and without a leading space, lower/capitalised."""
    core = text.strip()
    out = []
    for w in (core, core.lower(), core.capitalize(), core.upper()):
        for f in (w, " " + w):
            if f and f != text and f not in out:
                out.append(f)
    return out


def _show(model, i: int) -> str:
    return f"{display.token(model, i)} (id {i})"


def resolve_target(model, log_probs_t: np.ndarray, target: str | None = None, target_id: int | None = None,
                   notes: list | None = None) -> int:
    """The target token id: --target-id, a --target that is one vocabulary token, or the top-1
    prediction. A target that is not one token is an error showing how it tokenizes and the
    nearest single-token forms; when the same word with (or without) a leading space is a
    different token, a one-line note saying so is appended to `notes`."""
    if target_id is not None:
        if not 0 <= int(target_id) < model.cfg.d_vocab:
            raise RefimplError(f"target id {target_id} out of range (vocabulary has {model.cfg.d_vocab} tokens)")
        return int(target_id)
    if target is None:
        return int(np.argmax(log_probs_t))
    if target == "":
        raise RefimplError("empty target")
    if len(target) > 1000:                   # no vocabulary token is this long; do not tokenize megabytes
        raise RefimplError(f"target {short(target, 80)} ({len(target)} characters) is not a single token")
    tid = single_token(model, target)
    if tid is None:
        enc = model._tok("encode the target", lambda t: t.encode(target, add_special_tokens=False))
        near = []
        for f in _forms(target):
            i = single_token(model, f)
            if i is not None and i not in [j for _, j in near]:
                near.append((f, i))
        hint = ("; single-token forms nearby: " + ", ".join(f"{short(f, 40)} (id {i})" for f, i in near[:4])
                if near else "; no single-token form of it nearby (give --target-id)")
        shown = short(target, 80)
        if enc.ids and all(i == model.unk_id for i in enc.ids):
            raise RefimplError(f"target {shown} is not in the vocabulary: it tokenizes as the unknown token "
                               f"{_show(model, enc.ids[0])}{hint}")
        pieces = " ".join(f"{t!r}({i})" + ("[unknown]" if i == model.unk_id else "")
                          for t, i in zip(enc.tokens[:12], enc.ids[:12]))
        more = f" ... ({len(enc.ids)} tokens)" if len(enc.ids) > 12 else ""
        raise RefimplError(f"target {shown} is not a single token: it tokenizes as {pieces or 'nothing'}{more}{hint}")
    if notes is not None:
        alt = target.lstrip(" ") if target.startswith(" ") else " " + target
        j = single_token(model, alt)
        if j is not None and j != tid:
            notes.append(f"target {short(target, 80)} is token {_show(model, tid)}; {alt!r} "
                         f"({'without' if target.startswith(' ') else 'with'} the leading space) is a different "
                         f"token, {_show(model, j)}")
        piece = model._tok("look up the target", lambda t: t.token_to_id(target))
        if piece is not None and int(piece) != tid and 0 <= int(piece) < model.cfg.d_vocab and j != int(piece):
            notes.append(f"target {short(target, 80)} as text is token {_show(model, tid)}; the vocabulary piece "
                         f"{short(target, 80)} itself is a different token, id {int(piece)} (give --target-id to use it)")
    return tid


def prompt_warnings(model, prompt, prepend_bos: bool | None = None) -> list[str]:
    """One line per prompt word the tokenizer turned into its unknown token (text prompts only)."""
    if not isinstance(prompt, str):
        return []
    unk = model.unk_id
    return [f"prompt word {short(word, 80)} is not in the vocabulary: it became the unknown token "
            f"{_show(model, unk)} at position {pos}" for pos, word in model.unknown_words(prompt, prepend_bos)]


def resolve_position(trace, position: int | None) -> int:
    T = trace.T
    t = T - 1 if position is None else int(position)
    if not -T <= t < T:
        raise RefimplError(f"position {position} out of range (prompt has {T} tokens)")
    return t % T


def _top_tokens(model, R, v) -> list[str]:
    return [model.token_str(i) for i in top_ids(R.bs(v), N_TOP_TOKENS)]


def resolve_versus(model, log_probs_t: np.ndarray, w: int, versus=None, versus_id=None) -> tuple[int, str]:
    """The token the target's bs-value is compared with (Fig. 10-11): --versus / --versus-id, or
    the runner-up (the most probable token other than the target). Returns (id, how chosen)."""
    if versus is None and versus_id is None:
        order = np.argsort(-log_probs_t, kind="stable")
        return int(order[0] if order[0] != w else order[1]), "runner-up"
    b = resolve_target(model, log_probs_t, versus, versus_id)
    if b == w:
        raise RefimplError(f"--versus {model.token_str(b)!r} is the target itself; choose another token")
    return b, "--versus"


@output.collected
def locate(model, prompt_or_ids, target=None, target_id=None, position=None, top: int = 10,
           readout: str = "frozen", exhaustive: bool = False, counts="auto", versus=None, versus_id=None,
           prepend_bos: bool | None = None, negligible: float = NEGLIGIBLE, share: str = "exact",
           trace=None) -> dict:
    """The report as a dict: the one place the `refimpl locate --json` object is built (schema
    refimpl/data/schemas/locate.json), also what `refimpl.locate(...).to_dict()` returns and
    each record of `refimpl batch`. counts: True, False or "auto" (= True): the per-layer
    helpful / unhelpful / negligible counts and top-10 shares of Fig. 6-7 (topk.ffn_counts), with
    negligible = tau (|C| <= tau nats is negligible) and share = "exact" or "bound" (a certified
    bracket that needs no extra exact scores). versus / versus_id: the token of the bs-value difference
    (Fig. 10-11; default the runner-up). prepend_bos: the start token of a text prompt (None: the
    family's convention, Model.start_ids). trace: the forward pass of exactly this prompt, computed
    already (`forward.forward_many`, as `refimpl batch` does); the report is then the same."""
    with contextlib.ExitStack() as one_thread:
        # one BLAS thread up to the counts, whatever the machine: the forward pass always (its
        # bits), the analysis while the counts' per-model constants are computed on the other
        # core (bounds.ModelConstants); the same last bits with or without counts
        one_thread.enter_context(one_blas_thread())
        return _locate(model, prompt_or_ids, target, target_id, position, top, readout, exhaustive, counts,
                       versus, versus_id, prepend_bos, negligible, share, trace, one_thread)


def _locate(model, prompt_or_ids, target, target_id, position, top, readout, exhaustive, counts, versus,
            versus_id, prepend_bos, negligible, share, trace, one_thread) -> dict:
    t0 = time.perf_counter()
    negligible = check_negligible(negligible)
    if share not in ("exact", "bound"):
        raise RefimplError(f"share must be exact or bound, got {share!r}")
    background = ModelConstants.start(model, readout, spectral=share == "bound") if counts and not exhaustive else None
    if background is not None:
        one_thread.callback(background.thread.join)        # on an error: joined before the thread count is restored
    if trace is None:
        trace = run(model, prompt_or_ids, prepend_bos)     # one BLAS thread (forward_many)
    elif trace.model is not model or list(trace.ids) != list(run_ids(model, prompt_or_ids, prepend_bos)):
        raise RefimplError("trace= is not the forward pass of this prompt on this model")
    t = resolve_position(trace, position)
    notes = prompt_warnings(model, prompt_or_ids, prepend_bos)
    w = resolve_target(model, trace.log_probs[t], target, target_id, notes=notes)
    for msg in notes:                # unknown prompt words, target notes: listed in `warnings`, shown on stderr
        warnings.warn(msg, UserWarning, stacklevel=3)
    if model.cfg.d_vocab > 1:
        b, how = resolve_versus(model, trace.log_probs[t], w, versus, versus_id)
    R = trace.readout(t, readout)
    result = {
        **output.header("locate", trace, prompt_or_ids, t, w, readout), "prepend_bos": prepend_bos,
        "exhaustive": bool(exhaustive),
        "layers": layer_significance(trace, w, t, R),
    }
    # log p(w) of the final state read out with this readout: the model's own value for frozen
    # and lens, another number for frozen-nobias (beta dropped) and raw
    result["readout_log_prob"] = float(R.log_prob(trace.final[t], w))
    # attention subvalues by source position, heads summed, over all layers: exact top-K
    # (each branch-and-bound batch is one product over the vocabulary; the bounds are tight enough
    # that the first K + K/2 candidates usually settle the top-K, so batches are sized to that)
    batch = max(16, top + top // 2)
    att = top_attn_subvalues(trace, w, t, top, R, exhaustive=exhaustive, batch=batch)
    attn = [(int(i), int(j)) for i, j in zip(att["layer"], att["position"])]
    ffn = top_ffn_subvalues(trace, w, t, top, R, exhaustive=exhaustive, batch=batch)
    # attention neurons (head, head dimension, source position): the authors' finer unit
    an = top_attn_neurons(trace, w, t, top, R, exhaustive=exhaustive, batch=batch)
    # vocabulary views of all chosen subvalues (and of the bare fc2 rows) in one product
    vecs = [trace.attn_subvalues(i, t, "position")[j] for i, j in attn]
    vecs += [trace.ffn_subvalues(int(i), t, [int(k)])[0] for i, k in zip(ffn["layer"], ffn["neuron"])]
    vecs += [model.rows(f"blocks.{int(i)}.mlp.W_out", int(k)) for i, k in zip(ffn["layer"], ffn["neuron"])]
    vecs += [attn_neuron_subvalues(trace, int(i), t, [h], [e], [j])[0]
             for i, h, e, j in zip(an["layer"], an["head"], an["dim"], an["position"])]
    act = _activation_levels(trace, int(ffn["layer"][0]), int(ffn["neuron"][0]), t) if len(ffn["layer"]) else None
    n_views = len(vecs)
    if act is not None:
        vecs += list(act[1])                    # Section 4.2's level-2 subvalues: top tokens in the same product
    bs = R.bs(np.array(vecs)) if vecs else np.zeros((0, model.cfg.d_vocab))
    if act is not None:
        act[2](bs[n_views:])
    def toks(row):                  # {"top_tokens": decoded strings, "top_token_ids": their ids}
        ids = [int(x) for x in top_ids(row, N_TOP_TOKENS)]
        return {"top_tokens": [model.token_str(x) for x in ids], "top_token_ids": ids}
    tops = [{"kind": "attn", "layer": i, "index": j, "source_token": trace.tokens[j],
             "log_prob_increase": float(c), "prob_increase": float(p),
             "target_rank": rank_of(bs[n], w), **toks(bs[n])}
            for n, ((i, j), c, p) in enumerate(zip(attn, att["log_prob_increase"], att["prob_increase"]))]
    nf = len(ffn["layer"])
    for n, (i, k, c, p) in enumerate(zip(ffn["layer"], ffn["neuron"], ffn["log_prob_increase"], ffn["prob_increase"])):
        row, fc2 = bs[len(attn) + n], bs[len(attn) + nf + n]
        tops.append({"kind": "ffn", "layer": int(i), "index": int(k), "log_prob_increase": float(c),
                     "prob_increase": float(p), "target_rank": rank_of(row, w), "target_rank_in_fc2": rank_of(fc2, w),
                     "coefficient": float(trace.layers[int(i)].m[t, int(k)]), **toks(row)})
    base = len(attn) + 2 * nf
    for n, (i, h, e, j, c, p) in enumerate(zip(an["layer"], an["head"], an["dim"], an["position"],
                                                an["log_prob_increase"], an["prob_increase"])):
        row = bs[base + n]
        tops.append({"kind": "attn_neuron", "layer": int(i), "index": int(h * model.cfg.d_head + e),   # row of W_O
                     "head": int(h), "dim": int(e), "position": int(j),
                     "source_token": trace.tokens[int(j)], "log_prob_increase": float(c), "prob_increase": float(p),
                     "coefficient": float(attn_neuron_coefficients(trace, int(i), t)[h, e, j]),
                     "target_rank": rank_of(row, w), **toks(row)})
    result["top_subvalues"] = tops
    result["ffn_scored"] = int(ffn["scored"])
    result["attn_scored"] = int(att["scored"])
    result["attn_neuron_scored"] = int(an["scored"])
    if counts and not exhaustive and R.kind != "lens":
        # the counts' prompt-dependent parts, while the per-model constants are computed (and
        # always here, on one BLAS thread: the same bits whether or not the constants were known)
        for i in range(model.cfg.n_layers):
            bracket_parts(trace, i, w, t, R)
    if background is not None:
        background.wait()
    one_thread.close()                                       # the BLAS thread count as it was
    if counts:                       # "auto" (the default) is True: no prepared data needed (topk.ffn_counts)
        result["ffn_counts"] = ffn_counts(trace, w, t, R, exhaustive=exhaustive, negligible=negligible, share=share)
    if act is not None:
        result["activation_trace"] = act[0]
    if model.cfg.d_vocab > 1:
        d = bs_difference_changes(trace, w, b, t, R)
        result["bs_difference"] = {"target": output.token_info(model, w),
                                   "versus": {**output.token_info(model, b), "chosen_by": how},
                                   "start": d["start"], "end": d["end"], "layers": d["layers"]}
    result["timing"] = {"seconds": time.perf_counter() - t0}
    return result


def activation_report(trace, i: int, k: int, t: int, R) -> list[dict]:
    """Section 4.2 for one FFN subvalue: level-1 contributions per subkey, and level 2 for the
    attention/FFN vector that contributes most (its top subvalues with their top tokens)."""
    out, V, fill = _activation_levels(trace, i, k, t)
    fill(R.bs(V) if len(V) else np.zeros((0, trace.model.cfg.d_vocab)))
    return out


def _activation_levels(trace, i: int, k: int, t: int):
    """activation_report without the vocabulary views: (report, the level-2 subvalues whose top
    tokens it shows [n, d], fill(bs [n, V]) that puts their top tokens in), so that `locate`
    reads them out in the same product as its other vocabulary views."""
    model, out, pending = trace.model, [], []
    for which in tracing.default_which(model):
        lvl1 = tracing.trace_activation(trace, i, k, t, which)
        srcs = [c for c in lvl1["contributions"] if c["source"].startswith(("attn.", "ffn."))]
        if srcs:
            sign = 1.0 if lvl1["pre_activation"] >= 0 else -1.0              # the direction that drives h
            best = max(srcs, key=lambda c: sign * c["value"])
            lvl2 = tracing.trace_source(trace, i, k, best["source"], t, which, "position")
            order = np.argsort(-sign * lvl2["values"], kind="stable")[:5]
            labels, vals = lvl2["labels"], lvl2["values"]
            subs = [{"label": labels[j], "value": float(vals[j])} for j in order]
            pending.append((subs, tracing.source_subvalue_rows(trace, best["source"], t, order)))
            lvl1["top_source"] = {"source": best["source"], "subvalues": subs}
        out.append(lvl1)
    V = np.concatenate([rows for _, rows in pending]) if pending else np.zeros((0, model.cfg.d_model))

    def fill(bs):
        n = 0
        for subs, _ in pending:
            for sub in subs:
                ids = [int(x) for x in top_ids(bs[n], 5)]
                sub["top_tokens"], sub["top_token_ids"] = [model.token_str(x) for x in ids], ids
                n += 1
    return out, V, fill


# --- text report -------------------------------------------------------------------------

def format_report(r: dict, model=None) -> str:
    """The text report of a locate object r. Tokens read as refimpl.display shows them (␣ for
    a space); `model` (the one r was made with) tells SentencePiece word starts in top lists."""
    tgt, lines = r["target"], []
    pieces = r.get("pieces") or [None] * len(r["tokens"])
    prompt = [display.show(tok, pc) for tok, pc in zip(r["tokens"], pieces)]

    def top_list(s, n):
        if model is not None and "top_token_ids" in s:
            return " ".join(display.token(model, i) for i in s["top_token_ids"][:n])
        return " ".join(display.show(x) for x in s["top_tokens"][:n])

    lines.append("prompt tokens: " + " ".join(f"[{i}]{tok}" for i, tok in zip(r["ids"], prompt)))
    lines += [f"warning: {w}" for w in r.get("warnings", [])]      # unknown prompt words, target notes, ...
    lines.append(f"analysed position: {r['position']} ({prompt[r['position']]}); readout: {r['readout']}; "
                 f"dtype {r['dtype']}")
    pred = r["prediction"]
    lines.append(f"prediction: {display.show(pred['token'], pred.get('piece'))} p={pred['prob']:.4f}")
    lines.append(f"target: {display.show(tgt['token'], tgt.get('piece'))} (id {tgt['id']}) log p={tgt['log_prob']:.4f} "
                 f"p={tgt['prob']:.4f} rank {tgt['rank']}")
    if abs(r.get("readout_log_prob", tgt["log_prob"]) - tgt["log_prob"]) > 1e-9:
        lines.append(f"  (the {r['readout']} readout of the final state gives log p={r['readout_log_prob']:.4f}, "
                     f"not the model's; the layer scores below sum to it minus log p at Lin_0)")
    lines.append("")
    lines.append("layer significance for the target (log-probability increase / probability increase):")
    lines.append(f"{'layer':>5}  {'attn logp':>10} {'attn p':>9}  {'ffn logp':>10} {'ffn p':>9}")
    for L in r["layers"]:
        a, f = L["attn"], L["ffn"]
        lines.append(f"{L['layer']:>5}  {a['log_prob_increase']:>10.4f} {a['prob_increase']:>9.4f}  "
                     f"{f['log_prob_increase']:>10.4f} {f['prob_increase']:>9.4f}")
    for kind, title in (("attn", "attention subvalues (layer, source position; heads summed)"),
                        ("ffn", "FFN subvalues (layer, neuron)"),
                        ("attn_neuron", "attention neurons (layer, head, head dimension, source position)")):
        if not any(x["kind"] == kind for x in r["top_subvalues"]):
            continue
        lines.append("")
        lines.append(f"top {title}:")
        for s in (x for x in r["top_subvalues"] if x["kind"] == kind):
            where = (f"L{s['layer']} pos {s['index']} {prompt[s['index']]}" if kind == "attn"
                     else f"L{s['layer']} n{s['index']} m={s['coefficient']:+.3f}" if kind == "ffn"
                     else f"L{s['layer']} h{s['head']} d{s['dim']} pos {s['position']} {prompt[s['position']]}")
            extra = f" fc2-rank {s['target_rank_in_fc2']}" if kind == "ffn" else ""
            lines.append(f"  {where:<28} logp {s['log_prob_increase']:+.4f}  p {s['prob_increase']:+.4f}  "
                         f"target rank {s['target_rank']}{extra}  top: {top_list(s, 8)}")
    if "ffn_counts_note" in r:
        lines += ["", r["ffn_counts_note"]]
    if r.get("ffn_counts"):
        cs = r["ffn_counts"]
        bound = any(c.get("share") == "bound" for c in cs)
        tau = cs[0].get("threshold", 0.0)
        lines.append("")
        lines.append(f"FFN subvalues per layer (Fig. 6): helpful C > {tau:g}, unhelpful C < -{tau:g}, negligible "
                     f"|C| <= {tau:g} nats;")
        lines.append("top-10 share of the helpful (unhelpful) subvalues' summed increase (Fig. 7), "
                     + ("certified bounds [lo, hi], not exact (--share bound):" if bound else "exact:"))
        lines.append(f"  {'layer':>9}  {'activated':>9} {'helpful':>7} {'unhelpful':>9} {'negligible':>10}  "
                     f"{'top-10 share':>14} {'(unhelpful)':>14}")

        def fmt(sh):
            return f"{sh:.3f}" if not isinstance(sh, list) else f"[{sh[0]:.3f}, {sh[1]:.3f}]"
        for c in cs:
            lines.append(f"  layer {c['layer']:>3}  {c['activated']:>9} {c['helpful']:>7} {c['unhelpful']:>9} "
                         f"{c.get('negligible', 0):>10}  {fmt(c['top10_share']):>14} "
                         f"{fmt(c.get('top10_share_unhelpful', 0.0)):>14}")
    for a in r.get("activation_trace", []):
        lines.append("")
        lines.append(f"what activates L{a['layer']} n{a['neuron']} ({a['which']} subkey; pre-activation "
                     f"{a['pre_activation']:+.4f} = sum of):")
        for c in sorted(a["contributions"], key=lambda c: -abs(c["value"]))[:8]:
            lines.append(f"  {c['source']:<14} {c['value']:+.4f}")
        if "top_source" in a:
            ts = a["top_source"]
            lines.append(f"  largest source {ts['source']}, by subvalue:")
            for s in ts["subvalues"]:
                lines.append(f"    {s['label']:<24} {s['value']:+.4f}  top: {top_list(s, 5)}")
    if "bs_difference" in r:
        d = r["bs_difference"]
        how = "the runner-up; --versus to choose" if d["versus"]["chosen_by"] == "runner-up" else "--versus"
        a_, b_ = (display.show(x["token"], x.get("piece")) for x in (d["target"], d["versus"]))
        lines.append("")
        lines.append(f"bs-value difference {a_} - {b_} ({how}): {d['start']:+.4f} at Lin_0, {d['end']:+.4f} at "
                     f"the end; change per layer (Fig. 10-11):")
        lines += [f"  layer {x['layer']:>3}: attn {x['attn']:+.4f}  ffn {x['ffn']:+.4f}" for x in d["layers"]]
    lines.append("")
    lines.append(f"({r['ffn_scored']} FFN subvalues, {r['attn_scored']} attention subvalues and "
                 f"{r['attn_neuron_scored']} attention neurons scored exactly for the top-K; "
                 f"{r['timing']['seconds']:.2f} s)")
    return "\n".join(lines)
