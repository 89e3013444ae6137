"""The layer order: ``pretrain`` is the base (it imports nothing of ``transfer`` or ``tools``), and no two of the
project's modules import each other, directly or through others (imports inside functions count too)."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules():
    """module name -> file, for pretrain/, transfer/ (packages) and tools/ (scripts, named tools.<file>)."""
    out = {}
    for path in glob.glob(os.path.join(ROOT, "pretrain", "**", "*.py"), recursive=True) + \
            glob.glob(os.path.join(ROOT, "transfer", "**", "*.py"), recursive=True) + \
            glob.glob(os.path.join(ROOT, "tools", "*.py")):
        rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
        if rel[-1] == "__init__":
            rel = rel[:-1]
        out[".".join(rel)] = path
    return out


def _imports(name: str, path: str, modules) -> set:
    """The project modules ``name`` imports (the deepest existing module of each dotted name)."""
    is_pkg = path.endswith("__init__.py")
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_pretrain_imports_nothing_from_transfer_or_tools():
    bad = sorted(f"{m} -> {d}" for m, deps in _graph().items() if m.split(".")[0] == "pretrain"
                 for d in deps if d.split(".")[0] in ("transfer", "tools"))
    assert not bad, bad


def test_no_import_cycles():
    graph = _graph()
    # Tarjan's strongly connected components: any component of more than one module is a cycle
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_graph_sees_imports():
    """The checks above would pass vacuously if the parser saw no edges."""
    graph = _graph()
    assert "pretrain.engine" in graph and "pretrain.model" in graph["pretrain.trainer"]
    assert "pretrain.knn" in graph["transfer.knn"] and "pretrain.methods" in graph["pretrain.testbeds.mocov2"]
