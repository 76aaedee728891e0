"""Imports flow one way (README "Style"): no import cycle anywhere in refimpl/ or converters/,
counting imports inside functions too, and refimpl never imports converters except where a
conversion is dispatched: the CLI's `convert` (refimpl/cli_model.py) and `--convert`, which
converts an unconverted checkpoint into the user cache (refimpl/checkpoints.py)."""
import ast

from tests.conftest import ROOT


def _modules() -> dict:
    mods = {}
    for pkg in ("refimpl", "converters"):
        for p in (ROOT / pkg).rglob("*.py"):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = p
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> project modules it imports (module level or inside a function)."""
    mods = _modules()
    graph = {}
    for mod, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".")[:len(mod.split(".")) - (path.name != "__init__.py")]
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                if subs and len(subs) == len(node.names):
                    deps.update(subs)           # `from . import x`: x, not the package
                else:
                    deps.update([target] * (target in mods) + subs)
        deps.discard(mod)
        # `from . import __version__` reads the package facade, which Python has run first anyway:
        # an edge to one's own package (or an ancestor) is not a cycle of modules
        deps = {d for d in deps if not mod.startswith(d + ".")}
        graph[mod] = deps
    return graph


def cycles(graph: dict) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycles():
    graph = import_graph()
    assert "converters.torch_pickle" in graph and "refimpl.model" in graph      # the walk found the code
    assert cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_torch_reader_is_one_way():
    g = import_graph()
    assert {"converters.torch_zip", "converters.torch_legacy"} <= g["converters.torch_pickle"]
    for reader in ("converters.torch_zip", "converters.torch_legacy"):
        assert "converters.torch_unpickler" in g[reader] and "converters.torch_pickle" not in g[reader]
    assert not {"converters.torch_pickle", "converters.torch_zip", "converters.torch_legacy"} & \
        g["converters.torch_unpickler"]


def test_refimpl_imports_converters_only_to_dispatch_convert():
    g = import_graph()
    edges = sorted((m, d) for m, deps in g.items() if m.startswith("refimpl")
                   for d in deps if d.split(".")[0] == "converters")
    assert {m for m, _ in edges} <= {"refimpl.cli_model", "refimpl.checkpoints"}, edges
    assert ("refimpl.cli_model", "converters") in edges
