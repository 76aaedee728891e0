import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = (ROOT / ".." / "shared" / "fixtures").resolve()
STORIES = FIXTURES / "stories260K"


def pytest_configure(config):
    os.environ.setdefault("HYPOTHESIS_PROFILE", "ci")


@pytest.fixture(scope="session")
def stories_dir():
    """stories260K converted once per session with the project's own converter."""
    if not STORIES.exists():
        pytest.fail(f"fixture missing: {STORIES}")
    import converters
    d = tempfile.mkdtemp(prefix="stories260K-")
    out = os.path.join(d, "model")
    converters.convert(str(STORIES / "stories260K.bin"), out, tokenizer=str(STORIES / "tok512.bin"))
    yield out
    shutil.rmtree(d, ignore_errors=True)
