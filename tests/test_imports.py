"""Import rules, checked on the source with ``ast`` (nothing is imported):

(a) no cycles between vistok modules, counting imports inside functions too;
(b) imports flow one way: entry scripts -> tokenizers / generators -> losses / evaluation / data
    -> common. ``losses``, ``evaluation``, ``data`` and ``common`` reach ``tokenizers`` or
    ``generators`` only through the interfaces declared in ``INTERFACES``, and ``common`` imports
    nothing but ``common``;
(c) nothing imports an entry script, and no module calls another module's ``main``;
(d) a vistok import inside a function carries a trailing comment saying why it is deferred;
(e) from ``sample.py`` the module that loads the tokenizer is at most 3 imports away.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from conftest import ROOT

PACKAGE = "vistok"
SKIP = {"tests", ".venv", ".git", "runs", "lightning_logs", "build"}

# Scripts run by users, at the top of the flow: they may import anything and nothing imports them.
# The two data/ commands are three-line shims kept under their documented names
# (``python -m vistok.data.extract_codes`` / ``make_posttrain_pairs``): the commands run a
# tokenizer or a generator, so their code lives above data (tokenizers/extract_codes.py,
# generators/posttrain_pairs.py).
ENTRY_SCRIPTS = {
    "vistok.train",
    "vistok.sample",
    "vistok.export",
    "vistok.data.extract_codes",
    "vistok.data.make_posttrain_pairs",
}

# Layers, highest first: a module may import its own layer or a lower one. The root package
# (the public API) and bench/ scripts stand outside, like the entry scripts.
LAYERS = {
    "vistok.tokenizers": 2,
    "vistok.generators": 2,
    "vistok.losses": 1,
    "vistok.evaluation": 1,
    "vistok.data": 1,
    "vistok.common": 0,
}

# The declared interfaces through which a lower layer may use a higher one:
# (importing module, imported module) -> why.
INTERFACES = {
    ("vistok.evaluation.pfid", "vistok.tokenizers.tokenizer"): (
        "pFID perturbs any tokenizer's codes and decodes them: it is written against the "
        "Tokenizer interface (encode / quantize / decode), the contract every family implements"
    ),
    ("vistok.evaluation.posttrain", "vistok.tokenizers.checkpoint"): (
        "comparing decoders before / after post-training reads both tokenizers, through the one "
        "tokenizer-loading module"
    ),
    ("vistok.evaluation.posttrain", "vistok.generators.checkpoint"): (
        "the 'before' side defaults to the tokenizer the generator recorded"
    ),
    ("vistok.evaluation.posttrain", "vistok.generators.sample_cli"): (
        "it samples each side with sample.py's library call; the options it forwards are "
        "sample.py's, read by the same parser"
    ),
}


@dataclass
class Import:
    source: str  # importing module
    target: str  # imported vistok module
    line: int
    local: bool  # inside a function
    comment: str | None  # trailing comment on the import statement


@dataclass
class Graph:
    modules: dict[str, Path] = field(default_factory=dict)
    imports: list[Import] = field(default_factory=list)
    main_calls: list[str] = field(default_factory=list)

    def edges(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {m: set() for m in self.modules}
        for imp in self.imports:
            if imp.target != imp.source:
                out[imp.source].add(imp.target)
        return out


def module_name(root: Path, path: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def _comments(source: str) -> dict[int, str]:
    """Line -> comment text, linter directives (``# noqa: F401``) left out: they give no reason."""
    found = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = re.sub(r"#\s*noqa(:\s*[A-Z]+\d+(,\s*[A-Z]+\d+)*)?", "", tok.string)
            if text.strip(" #"):
                found[tok.start[0]] = text.strip(" #")
    return found


def _targets(node: ast.Import | ast.ImportFrom, source: str, is_pkg: bool, modules) -> set[str]:
    """The package's modules an import statement loads."""
    if isinstance(node, ast.Import):  # ``import a.b.c``: the deepest module of the path
        found = set()
        for alias in node.names:
            parts = alias.name.split(".")
            prefixes = (".".join(parts[:n]) for n in range(len(parts), 0, -1))
            found |= {next((m for m in prefixes if m in modules), None)}
        return found - {None}
    base = node.module or ""
    if node.level:  # relative: resolve against the importing module's package
        parts = source.split(".")
        anchor = parts[: len(parts) - node.level + (1 if is_pkg else 0)]
        base = ".".join([*anchor, base]) if base else ".".join(anchor)
    # ``from base import x``: x when it is a submodule, else base itself
    return {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names} & (
        modules.keys()
    )


def build_graph(root: Path, package: str = PACKAGE) -> Graph:
    graph = Graph()
    for path in sorted(root.rglob("*.py")):
        if SKIP & set(path.relative_to(root).parts):
            continue
        graph.modules[module_name(root, path, package)] = path
    for name, path in graph.modules.items():
        _scan(graph, name, path)
    return graph


def _scan(graph: Graph, name: str, path: Path) -> None:
    """Record the vistok imports of one module, and its calls of an imported ``main``."""
    text = path.read_text()
    tree, comments = ast.parse(text), _comments(text)
    imported_main: set[str] = set()

    def visit(node: ast.AST, local: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            local = True
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target in sorted(_targets(node, name, path.name == "__init__.py", graph.modules)):
                lines = range(node.lineno, (node.end_lineno or node.lineno) + 1)
                comment = next((comments[i] for i in lines if i in comments), None)
                graph.imports.append(Import(name, target, node.lineno, local, comment))
            if isinstance(node, ast.ImportFrom):
                imported_main.update(a.asname or a.name for a in node.names if a.name == "main")
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr == "main") or (
                isinstance(f, ast.Name) and f.id in imported_main
            ):
                graph.main_calls.append(f"{name}:{node.lineno}")
        for child in ast.iter_child_nodes(node):
            visit(child, local)

    visit(tree, False)


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path) per strongly connected component with more than one module
    or a self-loop (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                components.append(comp)

    for v in sorted(edges):
        if v not in index:
            connect(v)
    cycles = []
    for comp in components:
        start = min(comp)
        path = shortest_path(
            {k: {w for w in vs if w in comp} for k, vs in edges.items() if k in comp},
            start,
            start,
        )
        cycles.append(path)
    return cycles


def shortest_path(edges: dict[str, set[str]], start: str, goal: str) -> list[str] | None:
    """Breadth-first path start -> goal of at least one edge."""
    queue = deque([[start, w] for w in sorted(edges.get(start, ()))])
    seen = set()
    while queue:
        path = queue.popleft()
        if path[-1] == goal:
            return path
        if path[-1] in seen:
            continue
        seen.add(path[-1])
        queue.extend(path + [w] for w in sorted(edges.get(path[-1], ())))
    return None


def layer(module: str) -> int | None:
    return next((rank for prefix, rank in LAYERS.items() if module.startswith(prefix + ".")), None)


def layering_violations(graph: Graph, interfaces=INTERFACES) -> list[str]:
    bad = []
    for imp in graph.imports:
        if imp.source in ENTRY_SCRIPTS:
            continue
        src, dst = layer(imp.source), layer(imp.target)
        if src is None or dst is None or dst <= src:
            continue
        if (imp.source, imp.target) not in interfaces:
            bad.append(f"{imp.source}:{imp.line} imports {imp.target}")
    for imp in graph.imports:  # common is the floor: it imports only itself (not even the root)
        if imp.source.startswith("vistok.common.") and not imp.target.startswith("vistok.common."):
            bad.append(f"{imp.source}:{imp.line} imports {imp.target}")
    return sorted(set(bad))


def uncommented_local_imports(graph: Graph) -> list[str]:
    return [
        f"{i.source}:{i.line} imports {i.target} inside a function without a '# why' comment"
        for i in graph.imports
        if i.local and not i.comment
    ]


TOKENIZER_LOADER = "vistok.tokenizers.checkpoint"


# ---------------------------------------------------------------------------------------------
# The rules on this repository


GRAPH = build_graph(ROOT)


def test_no_import_cycles():
    cycles = find_cycles(GRAPH.edges())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_imports_flow_one_way():
    bad = layering_violations(GRAPH)
    assert not bad, "imports against the flow (declare an interface or move the code):\n" + (
        "\n".join(bad)
    )


def test_declared_interfaces_exist_and_are_used():
    used = {(i.source, i.target) for i in GRAPH.imports}
    stale = [pair for pair in INTERFACES if pair not in used]
    assert not stale, f"declared interfaces no longer used (remove them): {stale}"


def test_nothing_imports_an_entry_script_or_calls_a_main():
    importing = [f"{i.source}:{i.line}" for i in GRAPH.imports if i.target in ENTRY_SCRIPTS]
    assert not importing, f"entry scripts are imported by {importing}"
    calls = [c for c in GRAPH.main_calls if c.split(":")[0] not in ENTRY_SCRIPTS]
    assert not calls, f"a library module calls another module's main() at {calls}"


def test_function_local_imports_say_why():
    bad = uncommented_local_imports(GRAPH)
    assert not bad, "\n".join(bad)


def test_sample_reaches_the_tokenizer_loader_in_three_hops():
    path = shortest_path(GRAPH.edges(), "vistok.sample", TOKENIZER_LOADER)
    assert path is not None, f"sample.py does not reach {TOKENIZER_LOADER}"
    assert len(path) - 1 <= 3, " -> ".join(path)


# ---------------------------------------------------------------------------------------------
# The checker itself, on a tiny synthetic package


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_checker_finds_a_cycle_through_a_function_local_import(tmp_path):
    root = _package(
        tmp_path,
        {
            "__init__.py": "",
            "common/a.py": "from vistok.data.b import B\n",
            "data/b.py": "B = 1\n\ndef f():\n    from vistok.common.a import B  # lazy: heavy\n",
            "data/c.py": "from . import b\n",
        },
    )
    graph = build_graph(root)
    assert graph.edges()["vistok.data.c"] == {"vistok.data.b"}  # relative import resolved
    cycles = find_cycles(graph.edges())
    assert cycles == [["vistok.common.a", "vistok.data.b", "vistok.common.a"]]
    assert layering_violations(graph) == ["vistok.common.a:1 imports vistok.data.b"]
    assert uncommented_local_imports(graph) == []


def test_checker_flags_backward_edges_main_calls_and_bare_local_imports(tmp_path):
    root = _package(
        tmp_path,
        {
            "sample.py": "from vistok.generators.g import run\n",
            "generators/g.py": "from vistok.tokenizers import t\nrun = t\n",
            "tokenizers/t.py": "import vistok.common.c\n",
            "common/c.py": "X = 1\n",
            "losses/l.py": (
                "def f():\n    from vistok.generators import g\n    g.main([])\n"
                "    from vistok.sample import run  # why not\n"
                "    import vistok.common.c  # noqa: F401\n"
            ),
        },
    )
    graph = build_graph(root)
    assert find_cycles(graph.edges()) == []
    assert layering_violations(graph) == ["vistok.losses.l:2 imports vistok.generators.g"]
    allowed = {("vistok.losses.l", "vistok.generators.g"): "declared"}
    assert layering_violations(graph, allowed) == []
    assert uncommented_local_imports(graph) == [
        "vistok.losses.l:2 imports vistok.generators.g inside a function without a '# why' comment",
        "vistok.losses.l:5 imports vistok.common.c inside a function without a '# why' comment",
    ]
    assert graph.main_calls == ["vistok.losses.l:3"]
    assert any(i.target == "vistok.sample" for i in graph.imports)
    path = shortest_path(graph.edges(), "vistok.sample", "vistok.common.c")
    assert path == [
        "vistok.sample",
        "vistok.generators.g",
        "vistok.tokenizers.t",
        "vistok.common.c",
    ]
