"""pyproject.toml's runtime dependencies are exactly the third-party packages refimpl/ and
converters/ import; packages imported only for an optional feature are in an extra."""
import ast
import sys
import tomllib

from tests.conftest import ROOT

# import name -> distribution name, where they differ
DIST = {}
OPTIONAL = {"matplotlib": "plot", "pandas": "pandas", "jsonschema": "jsonschema", "distributed": "cluster"}


def imported_packages() -> set[str]:
    out = set()
    for pkg in ("refimpl", "converters"):
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    out |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    out.add(node.module.split(".")[0])
    return {n for n in out if n not in sys.stdlib_module_names and n not in ("refimpl", "converters", "__future__")}


def _name(req: str) -> str:
    return req.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().lower()


def test_runtime_dependencies_are_what_is_imported():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_name(r) for r in project["dependencies"]}
    imported = {DIST.get(n, n).lower() for n in imported_packages()}
    assert runtime == imported - set(OPTIONAL), (f"imported but not a dependency: {imported - set(OPTIONAL) - runtime}; "
                                                 f"a dependency never imported: {runtime - imported}")
    extras = project["optional-dependencies"]
    for mod, extra in OPTIONAL.items():
        assert mod in imported, f"{mod} is no longer imported: drop the {extra!r} extra"
        assert mod in {_name(r) for r in extras[extra]}, f"{mod} missing from the {extra!r} extra"
        assert mod in {_name(r) for r in extras["test"]}, f"the tests need {mod}: add it to the test extra"
