"""Nothing in refimpl/ or converters/ imports torch, and analysis runs with torch unavailable."""
import ast
import subprocess
import sys

from tests.conftest import ROOT, STORIES


def test_no_module_imports_torch():
    offenders = []
    for pkg in ("refimpl", "converters"):
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                        "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                    names = [str(node.args[0].value)]
                offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ("torch", "transformers")]
    assert not offenders, offenders


def test_convert_and_analyse_with_torch_blocked(tmp_path):
    script = f"""
import sys
for name in ("torch", "transformers"):
    sys.modules[name] = None          # any `import torch` now raises ImportError
import numpy as np, converters, refimpl
out = converters.convert({str(STORIES / 'stories260K.bin')!r}, {str(tmp_path / 'm')!r},
                         tokenizer={str(STORIES / 'tok512.bin')!r})
model = refimpl.load(out, dtype="float64")
tr = refimpl.run(model, "Once upon a time")
R = tr.readout()
sv = tr.attn_subvalues(2, -1)
err = np.abs(sv.sum(0) + tr.attn_bias_subvalue(2) - tr.ATTN(2)[-1]).max()
assert err <= 1e-12 * np.abs(tr.ATTN(2)[-1]).max(), err          # Eq. 5 in float64
print("ok", R.bs(sv).shape)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok")
