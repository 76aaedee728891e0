"""The prompt files shipped for `refimpl batch` (refimpl/data/prompts/): the embedded model's facts.

    python training/make_prompts.py            # rewrites refimpl/data/prompts/capitals-gpt2-*.jsonl

- capitals-gpt2-paper.jsonl: the paper's two templates (Section 3) over every fact the
  embedded model was trained on: "The capital of X is" -> capital (169 prompts, group
  `capital`) and "Y is located in the country of" -> country (533 cities, group `city_in`).
- capitals-gpt2-relations.jsonl: every relation of training/make_corpus.py in its first
  template, one prompt per fact, group = relation: capital, capital_of ("Y is the capital of"),
  city_in, language ("People in X speak"), currency ("The currency of X is the"), continent
  ("X is a country in"). In the trained templates other than the paper's two, a seeded 30% of
  facts is held out in one template (docs/embedded-model.md), so a few of these prompts were
  not seen in training in exactly this wording.

Each line: {"id": "<relation>/<subject>", "prompt", "target", "group"}; targets are one token
of the model's word-level vocabulary. Pure function of facts.py and make_corpus.py.
"""
from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_corpus as MC  # noqa: E402

OUT = os.path.join(os.path.dirname(HERE), "refimpl", "data", "prompts")


def prompt_files() -> dict[str, list[dict]]:
    """{file name: items} of the shipped prompt files."""
    rows = MC.fact_rows()
    first = {rel: temps[0][0] for rel, temps in MC.TEMPLATES.items()}

    def item(r):
        subject = r["city"] if r["relation"] in ("capital_of", "city_in") else r["country"]
        return {"id": f"{r['relation']}/{subject}", "prompt": r["prompt"], "target": r["target"], "group": r["relation"]}
    paper = [item(r) for r in rows if r["role"] == "paper"]
    relations = [item(r) for r in rows if r["template"] == first[r["relation"]]]
    return {"capitals-gpt2-paper.jsonl": paper, "capitals-gpt2-relations.jsonl": relations}


def render(items: list[dict]) -> str:
    return "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items)


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    for name, items in prompt_files().items():
        with open(os.path.join(OUT, name), "w", encoding="utf-8") as f:
            f.write(render(items))
        print(f"{os.path.join(OUT, name)}: {len(items)} prompts")
