import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"          # vendored real data: tests/fixtures/PROVENANCE.md
STORIES = FIXTURES / "stories260K"

# Hypothesis profiles (HYPOTHESIS_PROFILE=ci|dev|soak; default ci). Tests that set their own
# max_examples keep it; everything else (deadline, health checks, reporting) comes from here.
# No deadline: two shared cores make single examples slow now and then, which is not a failure.
settings.register_profile("ci", deadline=None, max_examples=100, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", parent=settings.get_profile("ci"), max_examples=20)
settings.register_profile("soak", parent=settings.get_profile("ci"), max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


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


def fairseq_python() -> Path:
    """The python of a virtualenv with real fairseq (fairseq-fixed==0.12.3.1 and torch==2.13.0),
    named by REFIMPL_FAIRSEQ_PYTHON. Without it the real-fairseq parity tests skip, saying why;
    with REFIMPL_REQUIRE_FAIRSEQ=1 (set by .ci/run) they fail instead, so CI cannot pass by
    skipping them."""
    py = os.environ.get("REFIMPL_FAIRSEQ_PYTHON")
    why = ("real fairseq not available: set REFIMPL_FAIRSEQ_PYTHON to the python of a venv with "
           "torch==2.13.0 and fairseq-fixed==0.12.3.1 (tests/fixtures/fairseq_tiny/README.md; .ci/run builds one)")
    if py and Path(py).is_file():
        return Path(py)
    if py:
        why = f"REFIMPL_FAIRSEQ_PYTHON={py}: no such file"
    if os.environ.get("REFIMPL_REQUIRE_FAIRSEQ") == "1":
        pytest.fail(why)
    pytest.skip(why)
