"""The cross-sentence summary of a batch (OUT/summary.json, summary.md, figures), from the records alone.

Per group of prompts and over all of them:

- how often the target is the model's top-1 prediction (`top1`);
- layer-level significance over cases (Fig. 2-3): each attention and FFN layer's
  log-probability and probability increase, mean, std (population) and quantiles;
- the per-layer FFN counts (Fig. 6-7) and top-10 shares, every numeric field of the records'
  `ffn_counts` averaged (a field given as an interval [lo, hi] is averaged end by end);
- recurring subvalues (Section 4, Appendix C, Table 2: "different sentences tend to activate
  similar FFN subvalues"): each (kind, layer, index) in the top-K of at least two prompts,
  how many prompts (and which), its mean log-probability increase, its top tokens and the
  target's worst rank in its vocabulary view. FFN subvalues come first, then attention neurons,
  then attention subvalues by source position (whose index is a position, so recurring means
  "the same position"); within a kind, most frequent first.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict

import numpy as np

from . import output

KIND_ORDER = {"ffn": 0, "attn_neuron": 1, "attn": 2}
QUANTILES = {"q05": 0.05, "q25": 0.25, "median": 0.5, "q75": 0.75, "q95": 0.95}


def stats(values) -> dict:
    """mean, std (population), min, quantiles (linear interpolation), max of a list of numbers."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"n": 0}
    out = {"n": int(v.size), "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min())}
    out.update({k: float(np.quantile(v, q)) for k, q in QUANTILES.items()})
    out["max"] = float(v.max())
    return out


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def average_counts(rows_per_record: list[list[dict]]) -> list[dict]:
    """Per layer, the mean of every numeric field present in the records' ffn_counts rows
    (fields added by newer versions included; a [lo, hi] interval averaged end by end, a number
    next to intervals counted as [x, x]); `n` is how many records had the layer."""
    by_layer: dict[int, list[dict]] = defaultdict(list)
    for rows in rows_per_record:
        for row in rows:
            if isinstance(row, dict) and isinstance(row.get("layer"), int):
                by_layer[row["layer"]].append(row)
    out = []
    for layer in sorted(by_layer):
        rows = by_layer[layer]
        avg: dict = {"layer": layer, "n": len(rows)}
        fields = []
        for r in rows:
            fields += [k for k in r if k != "layer" and k not in fields]
        for k in fields:
            vals = [r[k] for r in rows if k in r]
            if all(_is_num(x) for x in vals):
                avg[k] = float(np.mean(vals))
            elif all(_is_num(x) or (isinstance(x, list) and x and all(_is_num(y) for y in x)) for x in vals):
                width = max(len(x) for x in vals if isinstance(x, list))
                arr = [x if isinstance(x, list) else [x] * width for x in vals]
                if all(len(a) == width for a in arr):
                    avg[k] = [float(c) for c in np.mean(np.array(arr, dtype=np.float64), axis=0)]
        out.append(avg)
    return out


def recurring(records: list[dict]) -> list[dict]:
    """Subvalues in the top-K of at least two of these records (see the module docstring)."""
    occ: dict[tuple, list] = defaultdict(list)
    for r in records:
        seen = set()
        for s in r.get("top_subvalues", []):
            key = (s["kind"], int(s["layer"]), int(s["index"]))
            if key in seen:                 # an attention neuron at two source positions: one prompt
                continue
            seen.add(key)
            occ[key].append((r, s))
    n = len(records)
    out = []
    for (kind, layer, index), hits in occ.items():
        if len(hits) < 2:
            continue
        best = max(hits, key=lambda h: h[1]["log_prob_increase"])[1]
        e = {"kind": kind, "layer": layer, "index": index, "count": len(hits), "share": len(hits) / n,
             "prompts": [h[0]["id"] for h in hits],
             "mean_log_prob_increase": float(np.mean([h[1]["log_prob_increase"] for h in hits])),
             "mean_prob_increase": float(np.mean([h[1]["prob_increase"] for h in hits])),
             "max_target_rank": max(int(h[1]["target_rank"]) for h in hits),
             "top_tokens": list(best.get("top_tokens", []))}
        if kind == "ffn":
            e["mean_coefficient"] = float(np.mean([h[1]["coefficient"] for h in hits]))
        out.append(e)
    out.sort(key=lambda e: (KIND_ORDER.get(e["kind"], 9), -e["count"], -e["mean_log_prob_increase"],
                            e["layer"], e["index"]))
    return out


def group_summary(name, records: list[dict]) -> dict:
    ok = [r for r in records if "error" not in r]
    errors = [r for r in records if "error" in r]
    s = {"group": name, "n_prompts": len(records), "n_analysed": len(ok), "n_errors": len(errors)}
    top1 = sum(1 for r in ok if r["target"]["rank"] == 0)
    s["top1"] = {"count": top1, "rate": top1 / len(ok) if ok else None,
                 "target_prob": stats([r["target"]["prob"] for r in ok])}
    n_layers = max((len(r.get("layers", [])) for r in ok), default=0)
    layers = []
    for i in range(n_layers):
        row = {"layer": i}
        for part in ("attn", "ffn"):
            row[part] = {q: stats([r["layers"][i][part][q] for r in ok if len(r["layers"]) > i])
                         for q in ("log_prob_increase", "prob_increase")}
        layers.append(row)
    s["layers"] = layers
    with_counts = [r["ffn_counts"] for r in ok if isinstance(r.get("ffn_counts"), list)]
    s["ffn_counts"] = {"n": len(with_counts), "layers": average_counts(with_counts)}
    s["recurring"] = recurring(ok)
    s["errors"] = [{"id": r.get("id"), "error": r["error"]} for r in errors]
    return s


def build_summary(records: list[dict], manifest: dict | None = None) -> dict:
    """The summary object of a list of batch records (schema refimpl/data/schemas/batch/summary.json)."""
    groups: dict = defaultdict(list)
    for r in records:
        groups[r.get("group")].append(r)
    names = sorted((g for g in groups if g is not None), key=str) + ([None] if None in groups else [])
    ok = [r for r in records if "error" not in r]
    model = (manifest or {}).get("model") or (ok[0]["model"] if ok else None)
    return {**output.base("batch-summary"), "model": model, "options": (manifest or {}).get("options"),
            "n_prompts": len(records), "n_errors": len(records) - len(ok),
            "refimpl_versions": sorted({str(r.get("refimpl_version")) for r in records}),
            "groups": [group_summary(g, groups[g]) for g in names] if len(names) > 1 or names != [None] else [],
            "overall": group_summary(None, records)}


# --- summary.md ------------------------------------------------------------------------------------

def _f(x, nd=3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _toks(tokens, k=5) -> str:
    return ", ".join(repr(t) for t in tokens[:k]).replace("|", "\\|")


def summary_markdown(s: dict, top: int = 15) -> str:
    m = s.get("model") or {}
    o = s.get("options") or {}
    lines = ["# refimpl batch summary", "",
             f"Model `{m.get('name')}` ({m.get('family')}, {m.get('n_layers')} layers); "
             f"options: {', '.join(f'{k}={v}' for k, v in o.items()) or '-'}.",
             f"{s['n_prompts']} prompts, {s['n_errors']} errors (error records are listed in summary.json)."
             + (f" Records written by several refimpl versions: {', '.join(s['refimpl_versions'])}."
                if len(s.get("refimpl_versions", [])) > 1 else ""), "",
             "| group | prompts | analysed | errors | target is top-1 | mean p(target) |", "|---|---|---|---|---|---|"]
    parts = s["groups"] + [s["overall"]]
    for g in parts:
        name = "**all**" if g is s["overall"] else str(g["group"])
        lines.append(f"| {name} | {g['n_prompts']} | {g['n_analysed']} | {g['n_errors']} | "
                     f"{g['top1']['count']} ({_f(g['top1']['rate'])}) | {_f(g['top1']['target_prob'].get('mean'))} |")
    for g in parts:
        name = "all prompts" if g is s["overall"] else f"group {g['group']}"
        lines += ["", f"## {name}", "",
                  "Layer-level log-probability increase of the target (Fig. 2-3 over cases): mean ± std [median].", "",
                  "| layer | attention | FFN |", "|---|---|---|"]
        for L in g["layers"]:
            a, f = L["attn"]["log_prob_increase"], L["ffn"]["log_prob_increase"]
            lines.append(f"| {L['layer']} | {_f(a.get('mean'))} ± {_f(a.get('std'))} [{_f(a.get('median'))}] | "
                         f"{_f(f.get('mean'))} ± {_f(f.get('std'))} [{_f(f.get('median'))}] |")
        for kind, title in (("ffn", "Recurring FFN subvalues (layer, neuron)"),
                            ("attn_neuron", "Recurring attention neurons (layer, row of W_O)"),
                            ("attn", "Recurring attention subvalues (layer, source position)")):
            rows = [e for e in g["recurring"] if e["kind"] == kind]
            if not rows:
                continue
            lines += ["", f"{title}: in the top-K of how many of the {g['n_analysed']} prompts "
                          f"({len(rows)} recurring; the {min(top, len(rows))} most frequent shown).", "",
                      "| layer | index | prompts | share | mean log-prob increase | worst target rank | top tokens |",
                      "|---|---|---|---|---|---|---|"]
            for e in rows[:top]:
                lines.append(f"| {e['layer']} | {e['index']} | {e['count']} | {_f(e['share'], 2)} | "
                             f"{_f(e['mean_log_prob_increase'], 4)} | {e['max_target_rank']} | {_toks(e['top_tokens'])} |")
        fc = g["ffn_counts"]
        if fc["n"]:
            fields = []
            for L in fc["layers"]:
                fields += [k for k in L if k not in ("layer", "n") and k not in fields]
            lines += ["", f"FFN counts per layer, averaged over the {fc['n']} prompts that have them (Fig. 6-7).", "",
                      "| layer | " + " | ".join(fields) + " |", "|---" * (len(fields) + 1) + "|"]
            for L in fc["layers"]:
                cells = [(_f(L[k], 2) if not isinstance(L[k], list) else "[" + ", ".join(_f(x, 3) for x in L[k]) + "]")
                         if k in L else "-" for k in fields]
                lines.append(f"| {L['layer']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- figures -----------------------------------------------------------------------------------------

def write_figures(s: dict, directory: str) -> dict:
    """Per group: layer-level increases (mean ± std, Fig. 2-3 over cases) and averaged FFN
    counts (Fig. 6-7) as PNGs in `directory` (the batch's own figures folder, rewritten)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for g in s["groups"] + [s["overall"]]:
        tag = "all" if g is s["overall"] else "".join(c if c.isalnum() or c in "-_" else "_" for c in str(g["group"]))
        if not g["layers"]:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        x = [L["layer"] for L in g["layers"]]
        for part, color in (("attn", "tab:blue"), ("ffn", "tab:orange")):
            mean = np.array([L[part]["log_prob_increase"]["mean"] for L in g["layers"]])
            std = np.array([L[part]["log_prob_increase"]["std"] for L in g["layers"]])
            ax.plot(x, mean, marker="o", color=color, label=f"{'attention' if part == 'attn' else 'FFN'}")
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2)
        ax.axhline(0, color="gray", lw=0.5)
        ax.set_xlabel("layer")
        ax.set_ylabel("log-prob increase of the target")
        ax.set_title(f"{'all prompts' if tag == 'all' else g['group']}: mean ± std over {g['n_analysed']} prompts")
        ax.legend()
        fig.tight_layout()
        p = os.path.join(directory, f"layers-{tag}.png")
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths[f"layers-{tag}"] = os.path.abspath(p)
        rows = g["ffn_counts"]["layers"]
        if rows and all("helpful" in L and "unhelpful" in L for L in rows):
            fig, ax = plt.subplots(figsize=(6, 3.5))
            x = np.array([L["layer"] for L in rows])
            ax.bar(x - 0.2, [L["helpful"] for L in rows], 0.4, label="helpful")
            ax.bar(x + 0.2, [L["unhelpful"] for L in rows], 0.4, label="unhelpful")
            ax.set_xlabel("layer")
            ax.set_ylabel("FFN subvalues (mean count)")
            ax.legend()
            fig.tight_layout()
            p = os.path.join(directory, f"counts-{tag}.png")
            fig.savefig(p, dpi=100)
            plt.close(fig)
            paths[f"counts-{tag}"] = os.path.abspath(p)
    return paths
