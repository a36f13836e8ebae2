"""Import graph of the diffalign package: module cycles, package layers, docs/layers.md and layers.png.

    python docs/import_graph.py           # regenerate docs/layers.md and docs/layers.png
    python docs/import_graph.py --check   # exit 1 on a module import cycle or a stale docs/layers.md

Reads the source with `ast` only (never imports diffalign), so it runs without torch and sees every
import a module can execute, including the ones deferred into functions.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import deque
from pathlib import Path

ROOT_PACKAGE = "diffalign"
ACTORS_PACKAGE = "diffalign.actors"
GENERATE_COMMAND = "python docs/import_graph.py"


# ---------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------


def _module_name(rel: Path, prefix: str) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([prefix, *parts]) if parts else prefix


def module_files(repo_root: Path) -> dict[str, Path]:
    """Every module of the import package, by dotted name: platform/diffalign/ and actors/."""
    roots = [(repo_root / "platform" / ROOT_PACKAGE, ROOT_PACKAGE), (repo_root / "actors", ACTORS_PACKAGE)]
    files: dict[str, Path] = {}
    for base, prefix in roots:
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base)
            if "__pycache__" in rel.parts:
                continue
            name = _module_name(rel, prefix)
            # `x/__init__.py` and `x.py` side by side (mid-restructuring): Python's finder takes the
            # package, so the plain file is dead code and must not add edges.
            if name in files and path.name != "__init__.py":
                continue
            files[name] = path
    return dict(sorted(files.items()))


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _literal_import_call(node: ast.Call) -> str | None:
    """The module of `importlib.import_module("a.b")` / `__import__("a.b")` with a constant name.

    Names built at run time (f-strings, concatenation) cannot be resolved statically and are skipped.
    """
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if name not in ("import_module", "__import__") or not node.args:
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not arg.value.startswith("."):
        return arg.value
    return None


class _Imports(ast.NodeVisitor):
    """Every import statement of one file, wherever it sits (functions, classes, try/except).

    Each record is (line, level, module, names, type_checking_only): `names` is None for `import a.b`
    and the imported names for `from a.b import c, d`.
    """

    def __init__(self) -> None:
        self.records: list[tuple[int, int, str | None, tuple[str, ...] | None, bool]] = []
        self._type_checking = 0

    def _visit_all(self, nodes: list[ast.stmt], type_checking: bool) -> None:
        self._type_checking += type_checking
        for child in nodes:
            self.visit(child)
        self._type_checking -= type_checking

    def visit_If(self, node: ast.If) -> None:
        # Code under `if TYPE_CHECKING:` only runs in a type checker, never at import time, so it
        # cannot take part in an import cycle; `if not TYPE_CHECKING:` is the mirror image.
        self.visit(node.test)
        negated = isinstance(node.test, ast.UnaryOp) and isinstance(node.test.op, ast.Not)
        test = node.test.operand if negated else node.test
        guarded = _is_type_checking(test)
        self._visit_all(node.body, guarded and not negated)
        self._visit_all(node.orelse, guarded and negated)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.records.append((node.lineno, 0, alias.name, None, self._type_checking > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        names = tuple(alias.name for alias in node.names)
        self.records.append((node.lineno, node.level, node.module, names, self._type_checking > 0))

    def visit_Call(self, node: ast.Call) -> None:
        target = _literal_import_call(node)
        if target is not None:
            self.records.append((node.lineno, 0, target, None, self._type_checking > 0))
        self.generic_visit(node)


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _records(path: Path) -> list[tuple[int, int, str | None, tuple[str, ...] | None, bool]]:
    visitor = _Imports()
    visitor.visit(_parse(path))
    return visitor.records


def raw_imports(path: Path, include_type_checking: bool = True) -> list[tuple[int, str]]:
    """(line, absolute module name) of each absolute import in one file, unresolved and unfiltered."""
    out = []
    for line, level, module, _names, type_checking in _records(path):
        if level == 0 and module and (include_type_checking or not type_checking):
            out.append((line, module))
    return out


def _lazy_where(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, submodule) from a module-level `_WHERE = {"Name": "submodule", ...}` (PEP 562 lazy names)."""
    out = []
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign):
            targets, value = stmt.targets, stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            targets, value = [stmt.target], stmt.value
        else:
            continue
        if not any(isinstance(t, ast.Name) and t.id == "_WHERE" for t in targets):
            continue
        if isinstance(value, ast.Dict):
            for v in value.values:
                if isinstance(v, ast.Constant) and isinstance(v.value, str):
                    out.append((v.lineno, v.value))
    return out


def _resolve_base(name: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute module a (possibly relative) `from ... import` names before its imported names."""
    if level == 0:
        return module or ""
    parts = name.split(".") if is_package else name.split(".")[:-1]
    parts = parts[: len(parts) - (level - 1)] if level > 1 else parts
    base = ".".join(parts)
    return f"{base}.{module}" if module else base


def _targets(name: str, path: Path, modules: set[str], include_type_checking: bool) -> list[tuple[int, str]]:
    """(line, target module) for every import of module `name` that names a module of the tree."""
    is_package = path.name == "__init__.py"
    targets: list[tuple[int, str]] = []
    for line, level, module, names, type_checking in _records(path):
        if type_checking and not include_type_checking:
            continue
        base = _resolve_base(name, is_package, level, module)
        if names is None:
            targets.append((line, base))
            continue
        for imported in names:
            sub = f"{base}.{imported}" if base else imported
            # `from a.b import c` loads the submodule a.b.c when there is one, else takes a name of a.b.
            targets.append((line, sub if sub in modules else base))
    if is_package:
        for line, sub in _lazy_where(_parse(path)):
            relative = f"{name}.{sub.lstrip('.')}"
            targets.append((line, relative if relative in modules or sub not in modules else sub))
    return targets


def build_graph(repo_root: Path) -> dict[str, set[str]]:
    """Module -> internal modules it imports (anywhere in the file, except under `if TYPE_CHECKING:`).

    Only direct edges: importing `diffalign.data.issues` is an edge to that module alone, not to the
    `diffalign.data` package Python also runs first, so a package is not tied to everything under it.
    """
    files = module_files(repo_root)
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        graph[name] = {t for _, t in _targets(name, path, modules, False) if t in modules and t != name}
    return graph


def unresolved_imports(repo_root: Path) -> list[tuple[str, int, str]]:
    """(module, line, target) for imports of `diffalign.*` names that match no module of the tree.

    These would fail at run time (or are guarded by try/except); the graph cannot place them.
    """
    files = module_files(repo_root)
    modules = set(files)
    out = []
    for name, path in files.items():
        for line, target in _targets(name, path, modules, False):
            internal = target == ROOT_PACKAGE or target.startswith(ROOT_PACKAGE + ".")
            if internal and target not in modules:
                out.append((name, line, target))
    return sorted(set(out))


# ---------------------------------------------------------------------------------------------------------
# Graph algorithms
# ---------------------------------------------------------------------------------------------------------


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component (singletons included), members sorted, by smallest member."""
    nodes = sorted(set(graph) | {t for ts in graph.values() for t in ts})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    # Iterative Tarjan: a deep import chain must not hit Python's recursion limit.
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return sorted(components)


def _shortest_cycle(graph: dict[str, set[str]], members: set[str], start: str) -> list[str]:
    previous: dict[str, str] = {}
    queue = deque([start])
    seen = {start}
    while queue:
        node = queue.popleft()
        for child in sorted(graph.get(node, ())):
            if child not in members:
                continue
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if child not in seen:
                seen.add(child)
                previous[child] = node
                queue.append(child)
    raise AssertionError(f"{start} lies on no cycle of its component")


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle [a, b, ..., a] per strongly connected component of more than one module.

    The shortest cycle through the component's smallest name: breaking it may leave another cycle in
    the same component, so look at `strongly_connected` for all the modules involved.
    """
    cycles = []
    for component in strongly_connected(graph):
        if len(component) > 1:
            cycles.append(_shortest_cycle(graph, set(component), component[0]))
    return cycles


def _package_of(module: str, depth: int) -> str:
    return ".".join(module.split(".")[:depth])


def package_graph(graph: dict[str, set[str]], depth: int = 2) -> dict[str, set[str]]:
    """Modules collapsed to their first `depth` name parts (diffalign.train.loop -> diffalign.train)."""
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        edges = packages.setdefault(_package_of(module, depth), set())
        for target in targets:
            edges.add(_package_of(target, depth))
            packages.setdefault(_package_of(target, depth), set())
    for package, edges in packages.items():
        edges.discard(package)
    return dict(sorted(packages.items()))


def layers(pkg_graph: dict[str, set[str]]) -> list[list[str]]:
    """Longest-path layering: layer 0 imports no other package, each package sits one above the highest
    package it imports. The members of a package cycle share one layer (`find_cycles` names them).
    """
    component_of = {}
    components = strongly_connected(pkg_graph)
    for i, component in enumerate(components):
        for member in component:
            component_of[member] = i
    depends = [
        {component_of[t] for m in component for t in pkg_graph.get(m, ())} - {i}
        for i, component in enumerate(components)
    ]
    level: dict[int, int] = {}

    def height(i: int) -> int:
        # The condensation is acyclic and has a dozen nodes: plain recursion is safe.
        if i not in level:
            level[i] = 1 + max((height(j) for j in depends[i]), default=-1)
        return level[i]

    out: list[list[str]] = []
    for i, component in enumerate(components):
        h = height(i)
        while len(out) <= h:
            out.append([])
        out[h].extend(component)
    return [sorted(layer) for layer in out]


# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------


def _short(package: str) -> str:
    return package if package == ROOT_PACKAGE else package.removeprefix(ROOT_PACKAGE + ".")


def render_markdown(graph: dict[str, set[str]]) -> str:
    """docs/layers.md for a module graph: banner, layer table bottom-up, Mermaid package graph."""
    pkgs = package_graph(graph)
    stack = layers(pkgs)
    cyclic = {m: c for c in strongly_connected(pkgs) if len(c) > 1 for m in c}
    lines = [
        f"<!-- Generated by `{GENERATE_COMMAND}` from the source; do not edit by hand. -->",
        "",
        "# Package layers",
        "",
        "Each package imports only packages in lower layers: layer 0 imports no other diffalign package,",
        "and every package sits one layer above the highest package it imports. Imports inside functions",
        "count (they run as soon as the function does); imports under `if TYPE_CHECKING:` do not.",
        f"`{GENERATE_COMMAND} --check` (and tests/test_import_graph.py) fail when an import cycle",
        "appears or when this file no longer matches the source.",
        "",
        "| layer | package | imports |",
        "|---|---|---|",
    ]
    for number, layer in enumerate(stack):
        for package in layer:
            name = f"`{package}`"
            if package in cyclic:
                others = ", ".join(f"`{p}`" for p in cyclic[package] if p != package)
                name += f" (cycle with {others})"
            imports = ", ".join(f"`{p}`" for p in sorted(pkgs[package])) or "-"
            lines.append(f"| {number} | {name} | {imports} |")
    cycles = find_cycles(pkgs)
    lines += ["", "Package cycles:" + (" none." if not cycles else "")]
    lines += [f"- `{' -> '.join(cycle)}`" for cycle in cycles]
    lines += [
        "",
        "Mermaid draws `A --> B` with B above A in a bottom-to-top chart, so each arrow below goes up",
        "from a package to a package that imports it. docs/layers.png draws the same graph with arrows",
        "from the importing package down to the imported one.",
        "",
        "```mermaid",
        "flowchart BT",
    ]
    ids = {p: "p_" + _short(p).replace(".", "_") for p in pkgs}
    for package in pkgs:
        lines.append(f'    {ids[package]}["{package}"]')
    for package, targets in pkgs.items():
        for target in sorted(targets):
            lines.append(f"    {ids[target]} --> {ids[package]}")
    if cyclic:
        lines.append("    classDef cycle fill:#fdd,stroke:#c00")
        lines.append(f"    class {','.join(ids[p] for p in sorted(cyclic))} cycle")
    lines += ["```", ""]
    return "\n".join(lines)


def _row_orders(pkgs: dict[str, set[str]], stack: list[list[str]]) -> list[list[str]]:
    """Order each row by the mean position of its neighbours in the other rows (fewer crossing arrows).

    Barycentre sweeps, up then down then up again; ties keep the previous (alphabetical) order, so
    the picture is a pure function of the graph.
    """
    rows = [list(layer) for layer in stack]
    importers: dict[str, set[str]] = {p: set() for p in pkgs}
    for package, targets in pkgs.items():
        for target in targets:
            importers[target].add(package)
    position = {p: (i + 0.5) / len(row) for row in rows for i, p in enumerate(row)}

    def sweep(order: list[int], neighbours: dict[str, set[str]]) -> None:
        for number in order:
            row = rows[number]

            def key(p: str) -> tuple[float, float]:
                near = [position[q] for q in neighbours[p]]
                return (sum(near) / len(near) if near else position[p], position[p])

            row.sort(key=key)
            position.update({p: (i + 0.5) / len(row) for i, p in enumerate(row)})

    up = list(range(1, len(rows)))
    sweep(up, pkgs)
    sweep(list(reversed(range(len(rows) - 1))), importers)
    sweep(up, pkgs)
    return rows


def render_png(graph: dict[str, set[str]], out: Path) -> None:
    """docs/layers.png: one row of boxes per layer (layer 0 at the bottom), an arrow per package import."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    pkgs = package_graph(graph)
    rows = _row_orders(pkgs, layers(pkgs))
    cyclic = {m for c in strongly_connected(pkgs) if len(c) > 1 for m in c}
    # tab10 without its red (kept for cycles) and grey (kept for packages that import nothing).
    palette = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i not in (3, 7)]
    # One colour per importing package, so an arrow can be followed back to the box it leaves.
    importers = sorted(p for p in pkgs if pkgs[p])
    colour_of = {p: palette[i % len(palette)] for i, p in enumerate(importers)}
    row_height, box_h, width, left = 1.6, 0.55, 14.0, 1.6
    n_rows = max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(width, 1.2 + row_height * n_rows), dpi=100)
    ax.set_xlim(0, width)
    ax.set_ylim(-0.8, row_height * n_rows - 0.4)
    ax.axis("off")
    centre: dict[str, tuple[float, float]] = {}
    boxes = {}
    for number, row in enumerate(rows):
        y = number * row_height
        ax.text(0.15, y, f"layer {number}", va="center", ha="left", fontsize=12, color="#555")
        slot = (width - left) / len(row)
        box_w = min(1.9, 0.78 * slot)
        for i, package in enumerate(row):
            x = left + slot * (i + 0.5)
            centre[package] = (x, y)
            edge = "#c00" if package in cyclic else colour_of.get(package, "#555")
            box = FancyBboxPatch(
                (x - box_w / 2, y - box_h / 2), box_w, box_h, boxstyle="round,pad=0.05",
                facecolor="#fdd" if package in cyclic else "#f4f6fa", edgecolor=edge,
                linewidth=2.0, zorder=3,
            )
            ax.add_patch(box)
            boxes[package] = box
            ax.text(x, y, _short(package), ha="center", va="center", fontsize=12, zorder=4)
    layer_of = {p: n for n, row in enumerate(rows) for p in row}
    for package, targets in pkgs.items():
        for target in sorted(targets):
            span = layer_of[package] - layer_of[target]
            # Bend arrows that skip rows or stay in one (cycles) so they do not run through boxes.
            rad = 0.0 if span == 1 else 0.35 if span == 0 else 0.12
            in_cycle = package in cyclic and target in cyclic
            ax.add_patch(FancyArrowPatch(
                centre[package], centre[target], patchA=boxes[package], patchB=boxes[target],
                arrowstyle="-|>", mutation_scale=14, connectionstyle=f"arc3,rad={rad}",
                color="#c00" if in_cycle else colour_of[package], linewidth=1.3, alpha=0.75, zorder=2,
            ))
    title = "diffalign package layers (arrow: importer -> imported, coloured by importer; red: package cycle)"
    ax.set_title(title, fontsize=14)
    fig.tight_layout()
    fig.savefig(out, metadata={"Software": None})
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="report cycles and a stale layers.md, write nothing"
    )
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args(argv)
    repo: Path = args.repo
    graph = build_graph(repo)
    markdown = render_markdown(graph)
    md_path, png_path = repo / "docs" / "layers.md", repo / "docs" / "layers.png"
    for module, line, target in unresolved_imports(repo):
        print(f"warning: {module}:{line} imports {target}, which is no module of the tree", file=sys.stderr)
    if not args.check:
        md_path.write_text(markdown, encoding="utf-8")
        render_png(graph, png_path)
        print(f"wrote {md_path.relative_to(repo)} and {png_path.relative_to(repo)}")
        return 0
    status = 0
    cycles = find_cycles(graph)
    for cycle in cycles:
        print("import cycle: " + " -> ".join(cycle))
    if cycles:
        status = 1
    current = md_path.read_text(encoding="utf-8") if md_path.exists() else None
    if current != markdown:
        print(f"docs/layers.md is out of date: run `{GENERATE_COMMAND}`")
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
