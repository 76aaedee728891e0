"""The paper's figures as PNGs for one `locate` result (`refimpl locate --plots DIR`).

`write_figures` re-runs the trace, computes what a figure needs beyond the locate result,
and stores every plotted series under r["figure_data"][name] as plain JSON (no figure
without its data). Figures (DRAW below), for the analysed position and target of r:
layer_significance (Fig. 5), ffn_counts (Fig. 6), top10_share (Fig. 7), additivity with
the F(l) curves (Fig. 3, 2), subkey_linearity (Fig. 4), activation_trace (Fig. 8-9),
bs_trajectory and bs_difference (Fig. 10-11).
"""
from __future__ import annotations

import os
import warnings

import numpy as np

from .compare import bs_difference_changes, bs_trajectory
from .errors import RefimplError
from .files import write_new_file
from .forward import run
from .significance import additivity, f_curves
from .subkeys import preactivation
from .topk import ffn_counts
from .tracing import default_which, trace_source

DPI = 110
MAX_SOURCE_BARS = 15          # level-2 bars of the activation figure: the largest |value|, then "other"
ADDITIVITY_K_MAX = 200


def require_matplotlib():
    """pyplot on the Agg backend (no display needed), or a RefimplError saying how to install it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RefimplError("--plots needs matplotlib: pip install 'refimpl[plot]'") from None
    return plt


def _plain(x):
    """NumPy values and containers -> JSON-able Python values."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return _plain(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    return x


def _tok(s: str) -> str:
    """A token for a title: quoted, with matplotlib's mathtext markers escaped."""
    return repr(s).replace("$", r"\$")


def _layer_axis(ax, n: int):
    ax.set_xticks(range(0, n, max(1, -(-n // 24))))       # at most ~24 layer labels
    ax.set_xlabel("layer")


def _bars(ax, layers, series: dict, ylabel: str, title: str):
    """Grouped bars, one group per layer, one bar per series."""
    x, width = np.arange(len(layers)), 0.8 / len(series)
    for j, (name, vals) in enumerate(series.items()):
        ax.bar(x + (j - (len(series) - 1) / 2) * width, vals, width, label=name)
    ax.axhline(0, color="black", lw=0.6)
    _layer_axis(ax, len(layers))
    lo, hi = ax.get_ylim()
    ax.set(ylabel=ylabel, title=title, ylim=(lo, hi + 0.2 * (hi - lo)))     # headroom for the legend
    ax.legend(fontsize=8, ncol=len(series), loc="upper left")


def _hbars(ax, labels, values, title: str, xlabel: str):
    y = np.arange(len(values))[::-1]
    ax.barh(y, values, color=["tab:green" if v >= 0 else "tab:red" for v in values])
    ax.set_yticks(y, [lab.replace("$", r"\$") for lab in labels], fontsize=8)
    ax.axvline(0, color="black", lw=0.6)
    ax.set(xlabel=xlabel, title=title)


# --- figure data -----------------------------------------------------------------------------

def _layer_data(r):
    L = r["layers"]
    return {"layer": [x["layer"] for x in L], **{f"{part}_{m}": [x[part][m] for x in L] for part in ("attn", "ffn")
                                                 for m in ("log_prob_increase", "prob_increase")}}


def _additivity_data(trace, i, t, w, R):
    a = additivity(trace, i, w, t, "ffn", ADDITIVITY_K_MAX, R)
    a["k"] = np.arange(1, len(a["indices"]) + 1)
    a["f_curves"] = f_curves(R, trace.layers[i].lres[t], w, np.linspace(-10, 10, 81))
    return {"layer": i, **a}


def _subkey_data(trace, i, t):
    """Fig. 4: for every neuron of layer i, x.K against x.K/sigma - mu*lambda/sigma (the paper's
    y-axis, without B^k) and against the pre-activation h = that + B^k (Eq. 23's terms)."""
    out = []
    for which in default_which(trace.model):
        p = preactivation(trace, i, t, None, which)
        paper = p["xK"] / p["sigma"] - p["mu"] * p["lambda"] / p["sigma"]
        out.append({"which": which, "mu": p["mu"], "sigma": p["sigma"], "xK": p["xK"], "paper_y": paper,
                    "B": p["B"], "h": p["h"]})
    return {"layer": i, "subkeys": out}


def _activation_data(trace, t, acts):
    panels = []
    for a in acts:
        p = {"which": a["which"], "pre_activation": a["pre_activation"],
             "labels": [c["source"] for c in a["contributions"]], "values": [c["value"] for c in a["contributions"]]}
        if "top_source" in a:
            s = trace_source(trace, a["layer"], a["neuron"], a["top_source"]["source"], t, a["which"], "position")
            vals, labels = np.asarray(s["values"]), list(s["labels"])
            if len(vals) > MAX_SOURCE_BARS:
                keep = np.sort(np.argsort(-np.abs(vals), kind="stable")[:MAX_SOURCE_BARS - 1])
                rest = np.setdiff1d(np.arange(len(vals)), keep)
                labels = [labels[j] for j in keep] + [f"other ({len(rest)})"]
                vals = np.append(vals[keep], vals[rest].sum())
            p.update(source=s["source"], source_total=s["total"], source_labels=labels, source_values=vals)
        panels.append(p)
    return {"layer": acts[0]["layer"], "neuron": acts[0]["neuron"], "panels": panels}


# --- drawing ---------------------------------------------------------------------------------

def _draw_layers(plt, d, tgt):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, m, name in zip(axes, ("log_prob_increase", "prob_increase"), ("log-probability", "probability")):
        _bars(ax, d["layer"], {"attention": d[f"attn_{m}"], "FFN": d[f"ffn_{m}"]}, f"{name} increase",
              f"{name} increase per layer")
    return fig


def _draw_counts(plt, d, tgt):
    fig, ax = plt.subplots(figsize=(max(7, 3 + 0.25 * len(d["layer"])), 4))
    keys = [k for k in ("activated", "helpful", "unhelpful", "negligible") if k in d]
    tau = d.get("threshold")
    _bars(ax, d["layer"], {k: d[k] for k in keys}, "FFN subvalues",
          "activated / helpful / unhelpful / negligible FFN subvalues"
          + (f"\n(helpful C > {tau:g}, unhelpful C < -{tau:g}, negligible |C| <= {tau:g} nats)" if tau is not None else ""))
    return fig


def _draw_share(plt, d, tgt):
    fig, ax = plt.subplots(figsize=(7, 4))
    layers = np.asarray(d["layer"], dtype=float)
    series = [("top10_share", "helpful", "tab:blue", -0.2)]
    if "top10_share_unhelpful" in d:
        series.append(("top10_share_unhelpful", "unhelpful", "tab:red", 0.2))
    for key, name, color, dx in series:
        lo, hi = (np.array([s[j] if isinstance(s, list) else s for s in d[key]]) for j in (0, 1))
        if d["exact"]:
            ax.bar(layers + dx, lo, 0.4, color=color, label=f"{name} (exact)")
        else:                   # a bound: drawn as the interval it is, never as a bar of a value
            ax.bar(layers + dx, hi - lo, 0.4, bottom=lo, color=color, alpha=0.35, edgecolor=color,
                   label=f"{name}: certified bound [lo, hi] (--share bound; not exact)")
    ax.legend(fontsize=8, loc="lower right")
    _layer_axis(ax, len(d["layer"]))
    ax.set(ylim=(0, 1.05), ylabel="share of summed log-prob increase",
           title="share of the top-10 FFN subvalues" + ("" if d["exact"] else " (BOUNDS, not exact values)"))
    return fig

def _draw_additivity(plt, d, tgt):
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    f = d["f_curves"]
    for col, m, name in zip(axes.T, ("log_prob_increase", "prob_increase"), ("log-prob", "prob")):
        ax = col[0]
        ax.plot(d["k"], d[f"sum_of_{m}s"], ".-", label=f"sum of {name} increases of v1..vk")
        ax.plot(d["k"], d[f"{m}_of_sum"], ".-", label=f"{name} increase of v1+...+vk")
        ax.set(xlabel="k (helpful subvalues, best first)", ylabel=f"{name} increase",
               title=f"additivity of FFN layer {d['layer']} subvalues")
        ax.legend(fontsize=8)
        ax = col[1]
        ax.plot(f["l"], f[m], color="tab:green")
        ax.axhline(0, color="black", lw=0.6)
        ax.axvline(0, color="black", lw=0.6)
        ax.set(xlabel=f"l (added to the bs-value of {tgt})", ylabel=f"{name} increase",
               title=f"F(l): {name} increase on base Lres_{d['layer']}")
    return fig


def _draw_subkey(plt, d, tgt):
    n = len(d["subkeys"])
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.5), squeeze=False)
    for ax, s in zip(axes[0], d["subkeys"]):
        ax.scatter(s["xK"], s["h"], s=5, alpha=0.35, color="tab:gray",
                   label="h = x.K/sigma - mu*lambda/sigma + B (pre-activation)")
        ax.scatter(s["xK"], s["paper_y"], s=6, alpha=0.7, color="tab:blue",
                   label="x.K/sigma - mu*lambda/sigma (as in the paper's Fig. 4)")
        ax.set(xlabel="x.K (inner product with the subkey)", ylabel="value",
               title=f"FFN layer {d['layer']}, {s['which']!r} subkeys of {len(s['h'])} neurons\n"
                     f"mu={s['mu']:.3g}, sigma={s['sigma']:.3g}")
        ax.legend(fontsize=7, loc="upper left")
    return fig


def _draw_activation(plt, d, tgt):
    ps = d["panels"]
    rows = max(4.2, 0.17 * max(len(p["labels"]) for p in ps))
    fig, axes = plt.subplots(len(ps), 2, figsize=(12, rows * len(ps)), squeeze=False)
    for row, p in zip(axes, ps):
        _hbars(row[0], p["labels"], p["values"], f"L{d['layer']} n{d['neuron']} ({p['which']} subkey): "
               f"h = {p['pre_activation']:+.3f} = sum of", "contribution to pre-activation")
        if "source" in p:
            _hbars(row[1], p["source_labels"], p["source_values"],
                   f"{p['source']} ({p['source_total']:+.3f}) by subvalue", "contribution to pre-activation")
        else:
            row[1].set_axis_off()
    return fig


def _draw_trajectory(plt, d, tgt):
    fig, ax = plt.subplots(figsize=(max(7, 0.18 * len(d["states"])), 4.5))
    for j, tok in enumerate(d["tokens"]):
        ax.plot(np.asarray(d["bs"])[:, j], ".-", label=_tok(tok) + (" (target)" if j == 0 else ""))
    step = max(1, -(-len(d["states"]) // 40))
    ax.set_xticks(range(0, len(d["states"]), step), d["states"][::step], rotation=90, fontsize=8)
    ax.set(xlabel="residual state", ylabel="bs-value", title="bs-values along the residual stream")
    ax.legend(fontsize=8)
    return fig


def _draw_difference(plt, d, tgt):
    fig, ax = plt.subplots(figsize=(7, 4))
    L = d["layers"]
    _bars(ax, [x["layer"] for x in L], {"attention": [x["attn"] for x in L], "FFN": [x["ffn"] for x in L]},
          "change of the difference", f"change of bs({_tok(d['tokens'][0])}) - bs({_tok(d['tokens'][1])}) "
          f"per layer\n(Lin_0: {d['start']:+.3f}, final: {d['end']:+.3f})")
    return fig


DRAW = {"layer_significance": _draw_layers, "ffn_counts": _draw_counts, "top10_share": _draw_share,
        "additivity": _draw_additivity, "subkey_linearity": _draw_subkey, "activation_trace": _draw_activation,
        "bs_trajectory": _draw_trajectory, "bs_difference": _draw_difference}


# --- entry point -----------------------------------------------------------------------------

def figure_data(model, src, r) -> dict:
    """Every figure's data (NumPy values) for locate result r, re-running the trace."""
    trace = run(model, src, r.get("prepend_bos") if isinstance(src, str) else None)
    if [int(i) for i in trace.ids] != list(r["ids"]):
        raise RefimplError("the prompt does not match the locate result's token ids")
    t, w = r["position"], r["target"]["id"]
    R = trace.readout(t, r["readout"])
    data = {"layer_significance": _layer_data(r)}
    counts = r["ffn_counts"] if "ffn_counts" in r else ffn_counts(trace, w, t, R, exhaustive=r.get("exhaustive", False))
    data["ffn_counts"] = {k: [c[k] for c in counts] for k in ("layer", "activated", "helpful", "unhelpful", "negligible")}
    data["ffn_counts"]["threshold"] = counts[0]["threshold"] if counts else None
    data["top10_share"] = {"layer": [c["layer"] for c in counts], "top10_share": [c["top10_share"] for c in counts],
                           "top10_share_unhelpful": [c["top10_share_unhelpful"] for c in counts],
                           "exact": all(c.get("share", "exact") == "exact" for c in counts)}
    if trace.layers:
        best = max(range(len(trace.layers)), key=lambda i: (r["layers"][i]["ffn"]["log_prob_increase"], -i))
        data["additivity"] = _additivity_data(trace, best, t, w, R)
        data["subkey_linearity"] = _subkey_data(trace, best, t)
    if r.get("activation_trace"):
        data["activation_trace"] = _activation_data(trace, t, r["activation_trace"])
    # the bs-value difference against the token the locate result compares with (default the
    # runner-up); the trajectory shows the target, that token and the next most probable one
    versus = r["bs_difference"]["versus"]["id"] if "bs_difference" in r else None
    others = [int(x) for x in np.argsort(-trace.log_probs[t], kind="stable") if x != w]
    others = ([versus] + [x for x in others if x != versus])[:2] if versus is not None else others[:2]
    ids = [w] + others
    data["bs_trajectory"] = {**bs_trajectory(trace, ids, t, R), "tokens": [model.token_str(i) for i in ids]}
    if others:
        data["bs_difference"] = {**bs_difference_changes(trace, w, others[0], t, R),
                                 "tokens": [model.token_str(w), model.token_str(others[0])]}
    return data


def figure_paths(outdir) -> dict[str, str]:
    return {name: os.path.join(outdir, f"{name}.png") for name in DRAW}


def check_outdir(outdir, force: bool = False) -> None:
    """Refuse before any work: DIR is not a folder, or (without force) a figure exists there."""
    if os.path.lexists(outdir) and not os.path.isdir(outdir):
        raise RefimplError(f"--plots: {outdir} exists and is not a directory")
    if not force:
        there = [p for p in figure_paths(outdir).values() if os.path.lexists(p)]
        if there:
            raise RefimplError(f"--plots: {there[0]} already exists{f' (and {len(there) - 1} more)' if len(there) > 1 else ''}"
                               f"; use --force to replace the figures")


def write_figures(model, src, r, outdir, force: bool = False) -> dict[str, str]:
    """Write the figures for locate result r into outdir; store their data in r["figure_data"].
    Returns {figure name: PNG path}. Each PNG is written atomically, never through a symbolic
    link, and an existing one is replaced only with `force` (refimpl.files.write_new_file)."""
    plt = require_matplotlib()
    check_outdir(outdir, force)
    try:
        os.makedirs(outdir, exist_ok=True)
    except OSError as e:
        raise RefimplError(f"--plots: cannot create {outdir}: {e.strerror}") from None
    data = _plain(figure_data(model, src, r))
    r["figure_data"] = data
    tgt = _tok(r["target"]["token"])
    head = f"target {tgt} (id {r['target']['id']}) at position {r['position']} ({_tok(r['tokens'][r['position']])})"
    paths = {}
    for name, d in data.items():
        path = os.path.join(outdir, f"{name}.png")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Glyph .* missing from")
            fig = DRAW[name](plt, d, tgt)
            try:
                fig.suptitle(head, fontsize=10)
                fig.tight_layout()
                write_new_file(path, lambda f: fig.savefig(f, dpi=DPI, format="png"), force=force)
            finally:
                plt.close(fig)
        paths[name] = path
    return paths
