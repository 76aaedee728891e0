"""The training corpus and word-level tokenizer of the embedded model `capitals-gpt2`.

Everything is a pure function of `facts.py` and a seed, so the corpus is reproducible:

    python training/make_corpus.py --out /tmp/capitals-corpus      # writes train.txt, eval.jsonl, tokenizer.json

Sentences are plain English in several templates per relation. The paper's two templates
(Yu & Ananiadou, Section 3) are used verbatim: "The capital of X is Y." and "Y is located in
the country of X." (for every city, capitals included); both are in the training set for every
fact, so the quality bar (measured on those two templates over all countries and cities) is a
test of what the model stored, not of generalisation. The other templates give held-out
numbers: per relation one template is never trained on ("unseen"), and for the remaining
templates a seeded 30% of the facts is held out in one template (each fact is still trained in
its other templates). Filler sentences use the same names in non-factual sentences so the
model has to read the template, not just the subject.

The tokenizer is a `tokenizers` WordLevel model trained on the corpus: case kept, words split
on whitespace, punctuation and the possessive "'s" split off; every multi-word or punctuated
name ("Buenos Aires", "New Zealand", "US dollar", "N'Djamena", "Guinea-Bissau") is an added
token matched before splitting, so every fact's object is one token. `<|endoftext|>` (id 0)
ends each sentence and pads; `<|unk|>` (id 1) stands for words outside the corpus.
Decoding joins tokens with spaces.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import facts as F  # noqa: E402

SEED = 1234
HOLDOUT_FRACTION = 0.3
N_FILLER = 2000
EOS, UNK = "<|endoftext|>", "<|unk|>"

# relation -> list of (template name, sentence template, target slot, role)
#   role "paper": trained for every fact, and the quality bar
#   role "train": trained, except for a seeded HOLDOUT_FRACTION of facts
#   role "unseen": never trained (template generalisation)
# Slots: {X} country phrase, {Y} city, {L} language, {C} currency, {K} continent.
# The target is always the last slot, right before the final ".".
TEMPLATES = {
    "capital": [
        ("capital_of_X_is", "The capital of {X} is {Y}.", "Y", "paper"),
        ("X_capital_city_is", "{X}'s capital city is {Y}.", "Y", "train"),
        ("capital_city_of_X_is", "The capital city of {X} is {Y}.", "Y", "train"),
        ("national_capital_of_X_is", "The national capital of {X} is {Y}.", "Y", "train"),
        ("X_has_its_capital_in", "{X} has its capital in {Y}.", "Y", "unseen"),
    ],
    "capital_of": [            # the reverse direction: capital -> country
        ("Y_is_the_capital_of", "{Y} is the capital of {X}.", "X", "train"),
        ("Y_is_the_capital_city_of", "{Y} is the capital city of {X}.", "X", "train"),
        ("Y_serves_as_the_capital_of", "{Y} serves as the capital of {X}.", "X", "unseen"),
    ],
    "city_in": [               # every city, capitals included -> its country
        ("Y_located_in_country_of", "{Y} is located in the country of {X}.", "X", "paper"),
        ("city_of_Y_is_in", "The city of {Y} is in {X}.", "X", "train"),
        ("Y_is_a_city_in", "{Y} is a city in {X}.", "X", "train"),
        ("Y_lies_in", "{Y} lies in {X}.", "X", "unseen"),
    ],
    "language": [
        ("people_in_X_speak", "People in {X} speak {L}.", "L", "train"),
        ("main_language_of_X_is", "The main language of {X} is {L}.", "L", "train"),
        ("in_X_most_people_speak", "In {X}, most people speak {L}.", "L", "train"),
        ("language_spoken_in_X_is", "The language spoken in {X} is {L}.", "L", "unseen"),
    ],
    "currency": [
        ("currency_of_X_is_the", "The currency of {X} is the {C}.", "C", "train"),
        ("in_X_people_pay_with_the", "In {X}, people pay with the {C}.", "C", "train"),
        ("official_currency_of_X_is_the", "The official currency of {X} is the {C}.", "C", "train"),
        ("money_used_in_X_is_the", "The money used in {X} is the {C}.", "C", "unseen"),
    ],
    "continent": [
        ("X_is_a_country_in", "{X} is a country in {K}.", "K", "train"),
        ("X_lies_on_the_continent_of", "{X} lies on the continent of {K}.", "K", "train"),
        ("country_of_X_is_in", "The country of {X} is in {K}.", "K", "train"),
        ("X_is_part_of", "{X} is part of {K}.", "K", "unseen"),
    ],
}

# Filler: the same names in sentences that state no fact of the relations above.
FILLER = [
    "Many people visit {Y} every year.",
    "The weather in {X} was warm.",
    "The weather in {Y} was cold today.",
    "She flew from {Y} to {Y2}.",
    "He moved from {X} to {X2} last year.",
    "They talked about {X} and {X2}.",
    "A new road connects {Y} and {Y2}.",
    "The train to {Y} was late.",
    "I have never been to {X}.",
    "We met a teacher from {Y}.",
    "My friend is learning {L}.",
    "She speaks {L} and {L2}.",
    "He changed some money into the {C}.",
    "The {C} fell against the {C2}.",
    "A book about {K} is on the table.",
    "The team from {X} won the game.",
    "The museum in {Y} is very old.",
    "Food in {Y} is good.",
    "The news from {X} was about the weather.",
    "Our trip to {K} was long.",
    "The capital is a big city.",
    "Every country has a capital.",
    "A city is a place where many people live.",
    "The map shows {X}, {X2} and {X3}.",
    "People in the city speak many languages.",
    "The market in {Y} opens early.",
    # words that the unseen templates need, in sentences that state no fact
    "{X} has its own football team.",
    "The old school serves as a museum now.",
    "Money is used to buy food.",
    "{L} is spoken by many people.",
    "The old part of {Y} is very beautiful.",
    "A small lake lies near {Y}.",
    "Every language has many words.",
]


def _fill(template: str, c: dict | None = None, city: str | None = None, rng: random.Random | None = None) -> str:
    """Fill a template; {X} at the very start of a sentence gets a capital "The"."""
    vals = {}
    if c is not None:
        vals.update(L=c["language"], C=c["currency"], K=c["continent"])
    if city is not None:
        vals["Y"] = city
    out = template
    if "{X}" in out:
        out = out.replace("{X}", F.country_phrase(c, start=out.startswith("{X}")), 1) if out.startswith("{X}") \
            else out.replace("{X}", F.country_phrase(c))
    for k, v in vals.items():
        if v is not None:
            out = out.replace("{" + k + "}", v)
    return out


def fact_rows() -> list[dict]:
    """Every (relation, template, fact): prompt, target, sentence and split ("train"/"heldout"/"unseen")."""
    rng = random.Random(SEED)
    rows = []
    for rel, temps in TEMPLATES.items():
        if rel in ("capital", "capital_of"):
            subjects = [(c, c["capital"]) for c in F.COUNTRIES]
        elif rel == "city_in":
            subjects = [(c, y) for y, c in F.city_facts()]
        else:
            subjects = [(c, None) for c in F.COUNTRIES]
        holdable = [t for t in temps if t[3] == "train"]
        for c, y in subjects:
            if rel == "currency" and c["currency"] is None:
                continue
            held = rng.choice(holdable)[0] if rng.random() < HOLDOUT_FRACTION else None
            for name, tmpl, slot, role in temps:
                sentence = _fill(tmpl, c, y)
                target = {"X": c["name"],
                          "Y": y, "L": c["language"], "C": c["currency"], "K": c["continent"]}[slot]
                assert sentence.endswith(" " + target + "."), (sentence, target)
                split = "unseen" if role == "unseen" else "heldout" if name == held else "train"
                rows.append(dict(relation=rel, template=name, role=role, split=split, country=c["name"], city=y,
                                 sentence=sentence, prompt=sentence[:-len(target) - 2], target=target))
    return rows


def filler_sentences(n: int = N_FILLER, seed: int = SEED) -> list[str]:
    rng = random.Random(seed + 1)
    cities = [y for y, _ in F.city_facts()]
    langs = sorted({c["language"] for c in F.COUNTRIES})
    curs = sorted({c["currency"] for c in F.COUNTRIES if c["currency"]})
    out = []
    for _ in range(n):
        t = rng.choice(FILLER)
        cs = rng.sample(F.COUNTRIES, 3)
        ys, ls, cu = rng.sample(cities, 2), rng.sample(langs, 2), rng.sample(curs, 2)
        s = t
        for key, val in (("{X2}", F.country_phrase(cs[1])), ("{X3}", F.country_phrase(cs[2])),
                         ("{Y2}", ys[1]), ("{L2}", ls[1]), ("{C2}", cu[1])):
            s = s.replace(key, val)
        s = s.replace("{Y}", ys[0]).replace("{L}", ls[0]).replace("{C}", cu[0]).replace("{K}", rng.choice(F.CONTINENTS))
        if "{X}" in s:
            s = s.replace("{X}", F.country_phrase(cs[0], start=s.startswith("{X}")))
        out.append(s)
    return out


def corpus(seed: int = SEED) -> tuple[list[str], list[dict]]:
    """(training sentences in a seeded order, all fact rows for evaluation)."""
    rows = fact_rows()
    train = [r["sentence"] for r in rows if r["split"] == "train"] + filler_sentences(seed=seed)
    random.Random(seed + 2).shuffle(train)
    return train, rows


# --- tokenizer ---------------------------------------------------------------------------

def names() -> list[str]:
    """Every name the corpus uses as a fact's object or subject."""
    out = set()
    for c in F.COUNTRIES:
        out.update([c["name"], c["capital"], c["language"], c["continent"], *c["cities"]])
        if c["currency"]:
            out.add(c["currency"])
    return sorted(out)


def added_names() -> list[str]:
    """Names the pre-tokenizer would split (a space, an apostrophe or a hyphen): added tokens."""
    return [n for n in names() if not re.fullmatch(r"\w+", n)]


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                    pre_tokenizers.Split(Regex(r"'s\b|[^\w\s]"), behavior="isolated")])


def build_tokenizer(sentences: list[str]):
    """A WordLevel tokenizer trained on `sentences` (tokenizers' WordLevelTrainer), names as added tokens."""
    from tokenizers import AddedToken, Tokenizer, models, trainers
    specials = [EOS, UNK]
    multi = [AddedToken(n, single_word=True, normalized=False) for n in added_names()]
    # pass 1: count words with the names already matched whole, so their pieces never become words
    counter = Tokenizer(models.WordLevel(unk_token=UNK))
    counter.pre_tokenizer = _pre_tokenizer()
    counter.add_special_tokens(specials)
    counter.add_tokens(multi)
    counter.train_from_iterator(sentences, trainers.WordLevelTrainer(special_tokens=specials, min_frequency=1))
    added = {t.content for t in multi}
    words = [w for w, _ in sorted(counter.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1])
             if w not in added and w not in specials]
    # pass 2: the final tokenizer: specials, trained words, then the names
    vocab = {EOS: 0, UNK: 1}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.add_tokens(multi)
    return tok


def check_tokenizer(tok, rows: list[dict], sentences: list[str]) -> None:
    """Every target is one token, nothing in the corpus is unknown, decode(encode(x)) reads back."""
    unk = tok.token_to_id(UNK)
    for s in sentences + [r["sentence"] for r in rows]:
        ids = tok.encode(s, add_special_tokens=False).ids
        assert unk not in ids, f"unknown word in {s!r}: {tok.encode(s).tokens}"
        assert tok.decode(ids).replace(" 's", "'s").replace(" .", ".").replace(" ,", ",") == s, (s, tok.decode(ids))
    for r in rows:
        enc = tok.encode(r["target"], add_special_tokens=False)
        assert len(enc.ids) == 1, f"target {r['target']!r} is {enc.tokens}"
        p = tok.encode(r["prompt"], add_special_tokens=False).ids
        full = tok.encode(r["sentence"], add_special_tokens=False).ids
        assert full[:len(p) + 1] == p + enc.ids, (r["sentence"], r["prompt"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for train.txt, eval.jsonl, tokenizer.json")
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)
    train, rows = corpus(args.seed)
    tok = build_tokenizer(train)
    check_tokenizer(tok, rows, train)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "train.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(train) + "\n")
    with open(os.path.join(args.out, "eval.jsonl"), "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    tok.save(os.path.join(args.out, "tokenizer.json"))
    n_tok = sum(len(tok.encode(s, add_special_tokens=False).ids) + 1 for s in train)
    splits = {k: sum(r["split"] == k for r in rows) for k in ("train", "heldout", "unseen")}
    print(f"{len(F.COUNTRIES)} countries, {len(F.city_facts())} cities; {len(train)} training sentences "
          f"({n_tok} tokens with EOS), fact rows {splits}; vocabulary {tok.get_vocab_size()} "
          f"({len(added_names())} added multi-word/punctuated names)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
