"""Where does the embedded model keep capitals? The paper's Appendix C, over every country.

    python training/analyze_capitals.py [--model DIR] [--figures docs/figures] [--no-cities]

Runs `refimpl.locate.locate(model, "The capital of X is", target=<capital>)` for every country
of facts.py and aggregates what the paper reports for single cases:

1. layers: mean log-probability increase of the capital by each attention and FFN layer;
2. attention subvalues by source position (heads summed), grouped by the position's role
   ("The", "capital", "of", the country, the last word "is"); and whether the attention
   subvalue written from the country position has the country or the capital among its
   top-10 tokens in vocabulary space;
3. FFN subvalues: how often the same (layer, neuron) is among the 10 most significant, what
   those neurons' vocabulary views hold (capitals? other cities? countries?);
4. what activates the most significant FFN subvalue (Section 4.2): the largest level-1
   source (attention or FFN output of which layer, or an embedding part) and, at level 2,
   which source position of that vector contributes most;

and the same layer/position aggregates for "Y is located in the country of" over all cities.
Prints the tables pasted into docs/embedded-model.md and writes small PNGs. Needs only
refimpl, numpy and matplotlib.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import Counter, defaultdict

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import facts as F  # noqa: E402

import refimpl  # noqa: E402
from refimpl.embedded import resolve_model  # noqa: E402
from refimpl.locate import locate  # noqa: E402
from refimpl.readout import rank_of, top_ids  # noqa: E402
from refimpl.significance import attn_subvalue_significance, layer_significance  # noqa: E402

TOP = 10
CAPITAL_ROLES = ["The", "capital", "of", "the", "country", "is"]
CITY_ROLES = ["city", "is", "located", "in", "the(1)", "country", "of", "the(2)"]


def capital_roles(tokens: list[str]) -> list[str]:
    """Role of each position of 'The capital of [the] X is'."""
    roles = ["The", "capital", "of"] + (["the"] if len(tokens) == 6 else []) + ["country", "is"]
    assert len(roles) == len(tokens), tokens
    return roles


def city_roles(tokens: list[str]) -> list[str]:
    """Role of each position of 'Y is located in the country of [the]'."""
    assert len(tokens) in (7, 8), tokens
    return ["city", "is", "located", "in", "the(1)", "country", "of", "the(2)"][:len(tokens)]


def kinds_of_names():
    """token -> kind: capital, city (non-capital), country, language, currency, continent."""
    kind = {}
    for c in F.COUNTRIES:
        kind[c["name"]] = "country"
        kind[c["capital"]] = "capital"
        for y in c["cities"]:
            kind[y] = "city"
        kind[c["language"]] = "language"
        if c["currency"]:
            kind[c["currency"]] = "currency"
        kind[c["continent"]] = "continent"
    return kind


def model_vocab(a) -> int:
    return a["vocab"]


def mean_se(a) -> tuple[float, float]:
    a = np.asarray(a, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else 0.0


def analyse_capitals(model, kind):
    L = model.cfg.n_layers
    res = defaultdict(list)
    pos_scores = defaultdict(list)             # (layer, role) -> [C]
    country_top = defaultdict(dict)            # layer -> counts of country/capital in top-10, capital's ranks
    capital_pos_kinds = defaultdict(Counter)   # layer -> kinds of names among the top-10 of the "capital" position
    ffn_top = Counter()
    ffn_views = {}
    ffn_layer_of_top = Counter()
    ffn_top_kinds = Counter()
    act_lvl1, act_lvl2, act_lvl2_role = Counter(), Counter(), Counter()
    n_correct, rows = 0, []
    for c in F.COUNTRIES:
        prompt = F.capital_prompt(c)
        r = locate(model, prompt, target=c["capital"])
        ok = r["prediction"]["id"] == r["target"]["id"]
        n_correct += ok
        rows.append((c["name"], c["capital"], r["prediction"]["token"], r["target"]["prob"]))
        for lay in r["layers"]:
            res[("attn", lay["layer"])].append(lay["attn"]["log_prob_increase"])
            res[("ffn", lay["layer"])].append(lay["ffn"]["log_prob_increase"])
        # attention subvalues by source position, every layer
        trace = refimpl.run(model, prompt)
        t, w = trace.T - 1, r["target"]["id"]
        R = trace.readout(t)
        roles = capital_roles(trace.tokens)
        cpos = roles.index("country")
        for i in range(L):
            s = attn_subvalue_significance(trace, i, w, t, "position", R)["log_prob_increase"]
            for j, role in enumerate(roles):
                pos_scores[(i, role)].append(float(s[j]))
            sv = trace.attn_subvalues(i, t, "position")
            top = set(int(x) for x in top_ids(R.bs(sv[cpos]), TOP))
            for key, hit in (("country", trace.ids[cpos] in top), ("capital", w in top),
                             ("either", trace.ids[cpos] in top or w in top)):
                country_top[i][key] = country_top[i].get(key, 0) + hit
            country_top[i].setdefault("ranks", []).append(rank_of(R.bs(sv[cpos]), w))
            top_cap = [model.token_str(int(x)) for x in top_ids(R.bs(sv[roles.index("capital")]), TOP)]
            capital_pos_kinds[i].update(kind.get(x, "other") for x in top_cap)
        # FFN subvalues
        ffns = [x for x in r["top_subvalues"] if x["kind"] == "ffn"]
        for x in ffns:
            key = (x["layer"], x["index"])
            ffn_top[key] += 1
            ffn_views.setdefault(key, x["top_tokens"])
            ffn_layer_of_top[x["layer"]] += 1
            ffn_top_kinds.update(kind.get(tok, "other") for tok in x["top_tokens"])
        # what activates the most significant FFN subvalue
        for a in r.get("activation_trace", []):
            srcs = [x for x in a["contributions"] if x["source"] != "remainder"]
            sign = 1.0 if a["pre_activation"] >= 0 else -1.0
            best = max(srcs, key=lambda x: sign * x["value"])
            act_lvl1[best["source"]] += 1
            if "top_source" in a:
                lab = a["top_source"]["subvalues"][0]["label"]
                act_lvl2[re.sub(r":.*", "", lab.replace(a["top_source"]["source"] + ".", ""))] += 1
                m = re.search(r"pos(\d+)", lab)
                src = a["top_source"]["source"]
                act_lvl2_role[f"{src} @ {roles[int(m.group(1))]}" if m else
                              f"{src} (an FFN neuron)" if src.startswith("ffn.") else lab] += 1
    n = len(F.COUNTRIES)
    vocab_kinds = Counter(kind.get(model.token_str(i), "other") for i in range(model.cfg.d_vocab))
    return dict(n=n, vocab=model.cfg.d_vocab, vocab_kinds=vocab_kinds, correct=n_correct, layers=res, pos=pos_scores, country_top=country_top,
                capital_pos_kinds=capital_pos_kinds, ffn_top=ffn_top, ffn_views=ffn_views,
                ffn_layer_of_top=ffn_layer_of_top, ffn_top_kinds=ffn_top_kinds, act_lvl1=act_lvl1,
                act_lvl2=act_lvl2, act_lvl2_role=act_lvl2_role, rows=rows)


def analyse_cities(model):
    L = model.cfg.n_layers
    res, pos_scores, correct = defaultdict(list), defaultdict(list), 0
    for y, c in F.city_facts():
        prompt = F.city_prompt(y, c)
        trace = refimpl.run(model, prompt)
        t = trace.T - 1
        w = model.tokenizer.token_to_id(c["name"])
        correct += int(np.argmax(trace.log_probs[t])) == w
        R = trace.readout(t)
        for lay in layer_significance(trace, w, t, R):
            res[("attn", lay["layer"])].append(lay["attn"]["log_prob_increase"])
            res[("ffn", lay["layer"])].append(lay["ffn"]["log_prob_increase"])
        roles = city_roles(trace.tokens)
        for i in range(L):
            s = attn_subvalue_significance(trace, i, w, t, "position", R)["log_prob_increase"]
            for j, role in enumerate(roles):
                pos_scores[(i, role)].append(float(s[j]))
    return dict(n=len(F.city_facts()), correct=correct, layers=res, pos=pos_scores)


# --- printing ------------------------------------------------------------------------------

def layer_table(a, L) -> str:
    lines = [f"{'layer':>5}  {'attention':>17}  {'FFN':>17}",
             f"{'':>5}  {'mean C':>9} {'(s.e.)':>7}  {'mean C':>9} {'(s.e.)':>7}"]
    tot = {"attn": 0.0, "ffn": 0.0}
    for i in range(L):
        cells = []
        for k in ("attn", "ffn"):
            m, se = mean_se(a["layers"][(k, i)])
            tot[k] += m
            cells.append(f"{m:>+9.3f} {se:>7.3f}")
        lines.append(f"{i:>5}  " + "  ".join(cells))
    lines.append(f"{'sum':>5}  {tot['attn']:>+9.3f} {'':>7}  {tot['ffn']:>+9.3f}")
    return "\n".join(lines)


def position_table(a, L, roles) -> str:
    roles = [r for r in roles if a["pos"].get((0, r))]
    lines = [f"{'layer':>5}  " + " ".join(f"{r:>9}" for r in roles)]
    for i in range(L):
        lines.append(f"{i:>5}  " + " ".join(f"{np.mean(a['pos'][(i, r)]):>+9.3f}" for r in roles))
    return "\n".join(lines)


def print_capitals(a, L):
    n = a["n"]
    print(f"## 'The capital of X is' over {n} countries (target: the capital)")
    print(f"top-1 correct (refimpl forward): {a['correct']}/{n}")
    probs = [p for *_, p in a["rows"]]
    print(f"probability of the capital: median {np.median(probs):.3f}, min {min(probs):.3f}")
    wrong = [(x, y, z) for x, y, z, _ in a["rows"] if y != z]
    if wrong:
        print("wrong: " + "; ".join(f"{x}: {z} (not {y})" for x, y, z in wrong))
    print("\n### log-probability increase of the capital by layer (mean over countries)")
    print(layer_table(a, L))
    print("\n### attention subvalues by source position: mean log-probability increase (heads summed)")
    print("('the' only for the countries written with an article)")
    print(position_table(a, L, CAPITAL_ROLES))
    print(f"\n### the attention subvalue written from the country position: top-{TOP} tokens contain ...")
    print(f"{'layer':>5}  {'the country':>12} {'the capital':>12} {'either':>8}   capital's rank: median (of {model_vocab(a)})")
    for i in range(L):
        ct = a["country_top"][i]
        print(f"{i:>5}  {ct['country']:>6}/{n:<5} {ct['capital']:>6}/{n:<5} {ct['either']:>4}/{n}   "
              f"{int(np.median(ct['ranks'])):>6}")
    print(f"\n### the attention subvalue written from the 'capital' position: kinds of its top-{TOP} tokens "
          f"(all prompts pooled)")
    kinds = ["capital", "city", "country", "language", "currency", "continent", "other"]
    print(f"{'layer':>5}  " + " ".join(f"{k:>9}" for k in kinds))
    for i in range(L):
        ck = a["capital_pos_kinds"][i]
        tot = sum(ck.values())
        print(f"{i:>5}  " + " ".join(f"{100 * ck[k] / tot:>8.1f}%" for k in kinds))
    print(f"\n### FFN subvalues: the {TOP} most significant per prompt")
    total = sum(a["ffn_layer_of_top"].values())
    print("by layer: " + ", ".join(f"L{i} {100 * a['ffn_layer_of_top'][i] / total:.1f}%" for i in range(L)))
    print(f"distinct (layer, neuron) among the {total} top-{TOP} entries: {len(a['ffn_top'])}")
    print(f"most frequent (layer, neuron): in how many prompts' top-{TOP}, and its vocabulary view "
          f"(top tokens of the subvalue, first prompt where it appeared)")
    for (i, k), cnt in a["ffn_top"].most_common(12):
        print(f"  L{i} n{k:<4} {cnt:>4}/{n} ({100 * cnt / n:5.1f}%)  top: {' '.join(repr(x) for x in a['ffn_views'][(i, k)][:8])}")
    tk = a["ffn_top_kinds"]
    tot = sum(tk.values())
    print("kinds of the top-10 tokens of the top FFN subvalues (pooled): " +
          ", ".join(f"{k} {100 * tk[k] / tot:.1f}%" for k in kinds))
    base = a["vocab_kinds"]
    print("  for comparison, share of each kind in the vocabulary: " +
          ", ".join(f"{k} {100 * base[k] / sum(base.values()):.1f}%" for k in kinds))
    print("\n### what activates the most significant FFN subvalue (Section 4.2)")
    print("level 1, the largest contribution to its pre-activation: " +
          ", ".join(f"{s} {c}" for s, c in a["act_lvl1"].most_common()))
    print("level 2, the largest subvalue of that source, by position role: " + ", ".join(f"{s} {c}" for s, c in a["act_lvl2_role"].most_common()))


def print_cities(a, L):
    print(f"\n## 'Y is located in the country of' over {a['n']} cities (target: the country)")
    print(f"top-1 correct (refimpl forward): {a['correct']}/{a['n']}")
    print("\n### log-probability increase of the country by layer (mean over cities)")
    print(layer_table(a, L))
    print("\n### attention subvalues by source position: mean log-probability increase (heads summed)")
    print("('the(2)' only for the countries written with an article: the prompt ends '... of the')")
    print(position_table(a, L, CITY_ROLES))


# --- figures -----------------------------------------------------------------------------

def figures(a, b, L, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(out, exist_ok=True)
    written = []
    fig, axes = plt.subplots(1, 2 if b else 1, figsize=(8 if b else 4.2, 3), dpi=90, squeeze=False)
    for ax, res, title in zip(axes[0], [a, b] if b else [a], ["The capital of X is -> capital",
                                                              "Y is located in the country of -> X"]):
        x = np.arange(L)
        for off, k, col in ((-0.2, "attn", "tab:blue"), (0.2, "ffn", "tab:orange")):
            ms = [mean_se(res["layers"][(k, i)]) for i in x]
            ax.bar(x + off, [m for m, _ in ms], 0.4, yerr=[s for _, s in ms], color=col,
                   label="attention" if k == "attn" else "FFN")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xticks(x)
        ax.set_xlabel("layer")
        ax.set_ylabel("mean log-prob increase")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    p = os.path.join(out, "capitals-layers.png")
    fig.savefig(p)
    plt.close(fig)
    written.append(p)

    for res, roles, name, title in ((a, CAPITAL_ROLES, "capitals-attn-positions.png", "The capital of X is"),
                                    (b, CITY_ROLES, "cities-attn-positions.png", "Y is located in the country of")):
        if not res:
            continue
        roles = [r for r in roles if res["pos"].get((0, r))]
        M = np.array([[np.mean(res["pos"][(i, r)]) for r in roles] for i in range(L)])
        fig, ax = plt.subplots(figsize=(0.75 * len(roles) + 1.6, 0.45 * L + 1.2), dpi=90)
        v = np.abs(M).max()
        im = ax.imshow(M, cmap="RdBu_r", vmin=-v, vmax=v, aspect="auto")
        for i in range(L):
            for j in range(len(roles)):
                ax.text(j, i, f"{M[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(M[i, j]) > 0.6 * v else "black")
        ax.set_xticks(range(len(roles)))
        ax.set_xticklabels(roles, fontsize=8)
        ax.set_yticks(range(L))
        ax.set_ylabel("layer")
        ax.set_title(f"attention subvalues by source position\n'{title}' (mean log-prob increase)", fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.8)
        fig.tight_layout()
        p = os.path.join(out, name)
        fig.savefig(p)
        plt.close(fig)
        written.append(p)

    top = a["ffn_top"].most_common(15)
    fig, ax = plt.subplots(figsize=(5.5, 3), dpi=90)
    ax.bar(range(len(top)), [100 * c / a["n"] for _, c in top], color="tab:orange")
    ax.set_xticks(range(len(top)))
    ax.set_xticklabels([f"L{i}\nn{k}" for (i, k), _ in top], fontsize=7)
    ax.set_ylabel(f"% of prompts in top-{TOP}")
    ax.set_title(f"most frequent FFN subvalues among the top-{TOP} ('The capital of X is')", fontsize=9)
    fig.tight_layout()
    p = os.path.join(out, "capitals-ffn-neurons.png")
    fig.savefig(p)
    plt.close(fig)
    written.append(p)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="canonical model directory (default: the embedded capitals-gpt2)")
    ap.add_argument("--figures", default=os.path.join(os.path.dirname(HERE), "docs", "figures"),
                    help="where to write the PNGs (default docs/figures)")
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument("--no-cities", action="store_true", help="skip the 'Y is located in the country of' part")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    model = refimpl.load(resolve_model(args.model), dtype="float64")
    L = model.cfg.n_layers
    a = analyse_capitals(model, kinds_of_names())
    print_capitals(a, L)
    b = None
    if not args.no_cities:
        b = analyse_cities(model)
        print_cities(b, L)
    if not args.no_figures:
        for p in figures(a, b, L, args.figures):
            print(f"wrote {os.path.relpath(p)}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
