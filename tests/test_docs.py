"""Docs speak of the project only: a reader with the repository alone finds everything they
point at (no DESIGN.md, no ../shared, no issue numbers)."""
import re

from tests.conftest import ROOT

PATTERNS = [r"DESIGN\.md", r"\.\./shared", r"\bissues? #?\d+", r"\bthe targets of issue"]


def test_no_pointers_outside_the_repository():
    files = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
    files += sorted((ROOT / "refimpl").rglob("*.py")) + sorted((ROOT / "converters").rglob("*.py"))
    bad = []
    for f in files:
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            bad += [f"{f.relative_to(ROOT)}:{n}: {line.strip()}" for p in PATTERNS if re.search(p, line, re.I)]
    assert not bad, "\n".join(bad)
