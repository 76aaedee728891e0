"""docs/walkthrough.md stays true: every `>>>` example in it is executed with doctest.

The page walks through the paper's method, from the residual stream to the subkeys, on the
embedded model (capitals-gpt2) with the prompt "The capital of France is"; its printed
outputs are rounded numbers, booleans and token strings, so they do not depend on BLAS
rounding.
"""
import doctest

from tests.conftest import ROOT

DOC = ROOT / "docs" / "walkthrough.md"
MIN_EXAMPLES = 120      # the page has ~150 examples; guards against the parser silently finding none


def test_walkthrough_examples_pass():
    assert DOC.is_file(), f"missing {DOC}"
    result = doctest.testfile(str(DOC), module_relative=False, report=True, verbose=False,
                              optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {DOC.name} failed (see output above)"
    assert result.attempted >= MIN_EXAMPLES, f"only {result.attempted} examples found in {DOC.name}"


def test_walkthrough_code_blocks_are_doctests():
    """Every ```python block holds `>>>` examples (so none is left unexecuted), and each
    block's last output is followed by a blank line (else the closing fence would be
    read as expected output)."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    blocks, cur = [], None
    for ln in lines:
        if cur is None and ln.strip() == "```python":
            cur = []
        elif cur is not None and ln.strip() == "```":
            blocks.append(cur)
            cur = None
        elif cur is not None:
            cur.append(ln)
    assert cur is None, "unclosed ```python block"
    assert len(blocks) >= 15
    for b in blocks:
        assert b and b[0].startswith(">>> "), f"python block not starting with >>>: {b[:1]}"
        assert b[-1] == "", f"python block must end with a blank line before the fence: {b[-3:]}"
