"""The vendored fixtures are exactly what tests/fixtures/PROVENANCE.md says they are.

Every listed file exists with the listed size and sha256, and every file in tests/fixtures/
(outside fairseq_tiny/, which has its own manifest) is listed: a fixture cannot be swapped or
added without its provenance being updated.
"""
import hashlib
import re

from tests.conftest import FIXTURES

ROW = re.compile(r"^\| `([^`]+)` \| (\d+) \| `([0-9a-f]{64})` \|")


def listed() -> dict[str, tuple[int, str]]:
    rows = {}
    for line in (FIXTURES / "PROVENANCE.md").read_text(encoding="utf-8").splitlines():
        m = ROW.match(line)
        if m:
            rows[m.group(1)] = (int(m.group(2)), m.group(3))
    return rows


def test_every_listed_fixture_matches_its_hash():
    rows = listed()
    assert len(rows) == 11
    for name, (size, digest) in rows.items():
        data = (FIXTURES / name).read_bytes()
        assert len(data) == size, name
        assert hashlib.sha256(data).hexdigest() == digest, name


def test_every_fixture_is_listed():
    on_disk = {p.relative_to(FIXTURES).as_posix() for p in FIXTURES.rglob("*") if p.is_file()}
    on_disk = {p for p in on_disk if not p.startswith("fairseq_tiny/")} - {"PROVENANCE.md", "LICENSE-MIT", "tokenizers/llama/NOTICE"}
    assert on_disk == set(listed())
