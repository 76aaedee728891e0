"""Prompt files of `refimpl batch`: what a researcher's list of prompts can look like.

Four layouts, told apart by the file name's ending (`--format` overrides):

- JSON Lines (`.jsonl`, `.ndjson`): one object a line, `{"prompt": ..., "target": optional,
  "group": optional, "id": optional}`; blank lines are skipped.
- CSV (`.csv`): a header row naming the same columns (`prompt` required).
- JSON (`.json`): a list of such objects, or the known-facts layout of factual-recall
  research (a list of objects with `prompt`, `subject`, `attribute` and `relation_id`, as in
  the known_1000 set): the target is the attribute as it continues the prompt (with a
  leading space: `" Paris"`), the group is `relation_id`, the id `known_id` where given.
- plain text (anything else): one prompt a line, blank lines skipped.

An item's id defaults to its line number (1-based; for CSV the line in the file, header
included; for JSON the position in the list). A column or key outside these, a missing
prompt, a line that is not JSON or two items with one id are errors naming the file and
line: a typo never silently becomes "no target".

Shipped prompt files (refimpl/data/prompts/) are found by name (`refimpl batch capitals`).
"""
from __future__ import annotations

import csv
import io
import json
import os

from .config import short
from .errors import RefimplError

PROMPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "prompts")
COLUMNS = ("prompt", "target", "group", "id")
KNOWN_FACTS = ("prompt", "subject", "attribute", "relation_id")
FORMATS = ("auto", "jsonl", "csv", "json", "text")
MAX_BYTES = 1 << 30             # a prompt file is read whole; a 1 GiB one is surely a mistake


def shipped_prompts() -> dict[str, str]:
    """{name: path} of the prompt files shipped with the package."""
    if not os.path.isdir(PROMPTS_DIR):
        return {}
    return {os.path.splitext(n)[0]: os.path.join(PROMPTS_DIR, n) for n in sorted(os.listdir(PROMPTS_DIR))
            if n.endswith((".jsonl", ".csv", ".json", ".txt"))}


def resolve_prompts(arg: str) -> str:
    """A PROMPTS argument to a file: a path, or the name of a shipped prompt file."""
    if os.path.exists(arg):
        if os.path.isdir(arg):
            raise RefimplError(f"{arg}: is a directory, not a prompt file")
        return arg
    shipped = shipped_prompts()
    if arg in shipped:
        return shipped[arg]
    raise RefimplError(f"{arg}: prompt file not found (and not a shipped prompt file: {', '.join(shipped) or 'none'})")


def detect_format(path: str) -> str:
    low = path.lower()
    for ends, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".csv", "csv"), (".json", "json")):
        if low.endswith(ends):
            return fmt
    return "text"


def _item(where: str, d: dict, default_id) -> dict:
    """One prompt item from a JSON object / CSV row, checked."""
    unknown = [k for k in d if k not in COLUMNS]
    if unknown:
        raise RefimplError(f"{where}: unknown key {short(str(unknown[0]), 40)} (known: {', '.join(COLUMNS)})")
    p = d.get("prompt")
    if not isinstance(p, str) or not p.strip():
        raise RefimplError(f"{where}: {'no prompt' if p is None else 'the prompt is empty' if isinstance(p, str) else 'the prompt is not a string'}")
    t = d.get("target")
    if t is not None and not isinstance(t, str):
        raise RefimplError(f"{where}: the target must be a string, got {short(json.dumps(t), 40)}")
    g = d.get("group")
    if g is not None and not isinstance(g, str):
        g = json.dumps(g) if not isinstance(g, (int, float)) or isinstance(g, bool) else str(g)
    i = d.get("id", default_id)
    if not isinstance(i, (str, int)) or isinstance(i, bool):
        raise RefimplError(f"{where}: the id must be a string or an integer, got {short(json.dumps(i), 40)}")
    return {"id": i, "prompt": p, "target": t if t != "" else None, "group": g if g != "" else None}


def _read_text(path: str) -> str:
    from .files import check_regular
    check_regular(path)                  # a FIFO or device would block or never end
    try:
        size = os.path.getsize(path)
        if size > MAX_BYTES:
            raise RefimplError(f"{path}: {size} bytes; a prompt file is read whole (at most {MAX_BYTES} bytes)")
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except IsADirectoryError:
        raise RefimplError(f"{path}: is a directory, not a prompt file") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise RefimplError(f"{path}: not UTF-8 text (byte {e.start})") from None


def read_prompts(path: str, fmt: str = "auto") -> list[dict]:
    """The items of a prompt file: [{id, prompt, target, group}] (see the module docstring)."""
    if fmt not in FORMATS:
        raise RefimplError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    text = _read_text(path)
    items: list[dict] = []
    if fmt == "jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                d = json.loads(line)
            except ValueError as e:
                raise RefimplError(f"{where}: not a JSON object ({e.msg})") from None
            if not isinstance(d, dict):
                raise RefimplError(f"{where}: not a JSON object")
            items.append(_item(where, d, n))
    elif fmt == "csv":
        rows = csv.reader(io.StringIO(text, newline=""), strict=True)      # an unclosed quote is an error
        try:
            header = next(rows)
        except StopIteration:
            raise RefimplError(f"{path}: empty CSV file (needs a header row with a `prompt` column)") from None
        except csv.Error as e:
            raise RefimplError(f"{path} line 1: not CSV ({e})") from None
        for c in header:
            if c not in COLUMNS:
                raise RefimplError(f"{path} line 1: unknown column {short(c, 40)} (known: {', '.join(COLUMNS)})")
        if "prompt" not in header:
            raise RefimplError(f"{path} line 1: no `prompt` column (the header is {short(','.join(header), 80)})")
        if len(set(header)) != len(header):
            raise RefimplError(f"{path} line 1: a column is named twice")
        start = rows.line_num + 1                   # the line where the row being read starts
        try:
            for row in rows:
                n, start = start, rows.line_num + 1
                if not any(c.strip() for c in row):
                    continue
                if len(row) != len(header):
                    raise RefimplError(f"{path} line {n}: {len(row)} fields, the header has {len(header)}")
                d = {k: v for k, v in zip(header, row)}
                if d.get("id", "") == "":
                    d.pop("id", None)
                items.append(_item(f"{path} line {n}", d, n))
        except csv.Error as e:
            if "unexpected end of data" in str(e):
                raise RefimplError(f"{path} line {start}: not CSV (a quoted field opened on this row is never "
                                   f"closed: it would swallow every line after it)") from None
            raise RefimplError(f"{path} line {start}: not CSV ({e})") from None
    elif fmt == "json":
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise RefimplError(f"{path} line {e.lineno}: not JSON ({e.msg})") from None
        if not isinstance(doc, list) or not all(isinstance(d, dict) for d in doc):
            raise RefimplError(f"{path}: expected a JSON list of objects (a prompt list or the known-facts layout)")
        facts = bool(doc) and all(all(k in d for k in KNOWN_FACTS) for d in doc)
        for n, d in enumerate(doc, 1):
            where = f"{path} item {n}"
            if facts:
                items.append(_known_fact(where, d, n))
            else:
                items.append(_item(where, d, n))
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                items.append({"id": n, "prompt": line, "target": None, "group": None})
    if not items:
        raise RefimplError(f"{path}: no prompts in the file")
    seen: dict = {}
    for it in items:
        key = (type(it["id"]).__name__, it["id"])
        if key in seen:
            raise RefimplError(f"{path}: two prompts have the id {short(it['id'], 40)}")
        seen[key] = True
    return items


def _known_fact(where: str, d: dict, n: int) -> dict:
    """An item of the known-facts layout: target " " + attribute, group relation_id, id known_id."""
    p, a, r = d["prompt"], d["attribute"], d["relation_id"]
    if not isinstance(p, str) or not p.strip():
        raise RefimplError(f"{where}: the prompt is empty or not a string")
    if not isinstance(a, str) or not a.strip():
        raise RefimplError(f"{where}: the attribute is empty or not a string")
    i = d.get("known_id", n)
    if not isinstance(i, (str, int)) or isinstance(i, bool):
        raise RefimplError(f"{where}: known_id must be a string or an integer")
    target = a if a.startswith(" ") or p.endswith(" ") else " " + a
    return {"id": i, "prompt": p, "target": target, "group": str(r)}
