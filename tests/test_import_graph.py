"""The package's import structure: no cycles, the layering the architecture promises, docs/layers.md current.

Reads the source with docs/import_graph.py (ast only), so nothing here imports torch or diffalign.
"""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_tool() -> ModuleType:
    # docs/ is not a package: load the script by path.
    spec = importlib.util.spec_from_file_location("import_graph", REPO / "docs" / "import_graph.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ig = _load_tool()


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return ig.build_graph(REPO)


@pytest.fixture(scope="module")
def platform_modules() -> dict[str, Path]:
    base = REPO / "platform"
    return {m: p for m, p in ig.module_files(REPO).items() if p.is_relative_to(base)}


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _describe_cycles(graph: dict[str, set[str]]) -> str:
    lines = []
    for cycle in ig.find_cycles(graph):
        component = next(c for c in ig.strongly_connected(graph) if cycle[0] in c)
        lines.append(" -> ".join(cycle) + f"   (component of {len(component)}: {', '.join(component)})")
    return "\n".join(lines)


def test_no_module_import_cycle(graph: dict[str, set[str]]) -> None:
    # Imports inside functions count: they run the first time the function does, so a cycle through
    # them still fails (or half-initialises a module) at that moment.
    cycles = ig.find_cycles(graph)
    assert not cycles, "import cycles:\n" + _describe_cycles(graph)


def test_package_graph_has_no_cycle(graph: dict[str, set[str]]) -> None:
    pkgs = ig.package_graph(graph)
    cycles = ig.find_cycles(pkgs)
    lines = []
    for cycle in cycles:
        lines.append(" -> ".join(cycle))
        # The module imports behind each step, so the one to move or invert is in the message.
        for src, dst in zip(cycle, cycle[1:]):
            edges = sorted(
                f"{m} -> {t}" for m in graph if _package(m) == src for t in graph[m] if _package(t) == dst
            )
            lines.append(f"    {src} -> {dst}: " + ", ".join(edges))
    assert not cycles, "package cycles:\n" + "\n".join(lines)


def test_platform_never_imports_actors(
    graph: dict[str, set[str]], platform_modules: dict[str, Path]
) -> None:
    # The Ray layer sits on top: diffalign must work (and be tested) without it.
    bad = sorted(
        f"{m} -> {t}" for m in platform_modules for t in graph[m] if _within(t, (ig.ACTORS_PACKAGE,))
    )
    assert not bad, "platform modules importing diffalign.actors:\n" + "\n".join(bad)


def test_platform_never_imports_ray(platform_modules: dict[str, Path]) -> None:
    # Every import statement, TYPE_CHECKING ones too: ray is an optional extra.
    bad = sorted(
        f"{path.relative_to(REPO)}:{line}: {name}"
        for path in platform_modules.values()
        for line, name in ig.raw_imports(path, include_type_checking=True)
        if name.split(".")[0] == "ray"
    )
    assert not bad, "ray imported under platform/:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "prefix, allowed",
    [("diffalign.objectives", ("diffalign.objectives",)), ("diffalign.timesteps", ())],
)
def test_leaf_packages_import_no_other_package(
    graph: dict[str, set[str]], prefix: str, allowed: tuple[str, ...]
) -> None:
    # Losses and timestep samplers are pure tensor code: any diffalign import would drag config,
    # models or data into every process that only computes a loss.
    modules = [m for m in graph if _within(m, (prefix,))]
    assert modules, f"no module named {prefix}*"
    bad = sorted(f"{m} -> {t}" for m in modules for t in graph[m] if not _within(t, allowed))
    assert not bad, f"{prefix} imports other diffalign packages:\n" + "\n".join(bad)


CONFIG_MAY_REACH = (
    "diffalign.config",
    "diffalign.objectives",
    "diffalign.timesteps",
    "diffalign.specs",
    "diffalign.models",
    "diffalign.reference",
)


def test_config_closure_stays_low(graph: dict[str, set[str]]) -> None:
    # Every Ray process unpickles a config: what it pulls in must not include data, train, eval,
    # tracking, curate/build, actors or report.
    start = [m for m in graph if _within(m, ("diffalign.config",))]
    assert start, "no diffalign.config module"
    parent: dict[str, str | None] = {m: None for m in start}
    todo = list(start)
    while todo:
        module = todo.pop()
        for target in sorted(graph.get(module, ())):
            if target not in parent:
                parent[target] = module
                todo.append(target)

    def chain(module: str) -> str:
        path = [module]
        while parent[path[-1]] is not None:
            path.append(parent[path[-1]])
        return " -> ".join(reversed(path))

    # Timesteps and specs are single modules; the root package's __init__ imports nothing.
    exact = {"diffalign", "diffalign.timesteps", "diffalign.specs"}
    prefixes = tuple(p for p in CONFIG_MAY_REACH if p not in exact)
    bad = sorted(chain(m) for m in parent if m not in exact and not _within(m, prefixes))
    assert not bad, "diffalign.config reaches:\n" + "\n".join(bad)


def test_layers_md_is_current(graph: dict[str, set[str]]) -> None:
    path = REPO / "docs" / "layers.md"
    expected = ig.render_markdown(graph)
    current = path.read_text(encoding="utf-8") if path.exists() else ""
    assert current == expected, f"docs/layers.md is out of date: run `{ig.GENERATE_COMMAND}`"


# ---------------------------------------------------------------------------------------------------------
# The tool itself, on tiny synthetic trees (a check that cannot fail proves nothing)
# ---------------------------------------------------------------------------------------------------------


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in {"platform/diffalign/__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return root


def test_cycle_through_function_import_is_found(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "platform/diffalign/a.py": "from diffalign.b import g\n",
        "platform/diffalign/b.py": "def g():\n    from diffalign import a\n    return a\n",
    })
    assert ig.find_cycles(ig.build_graph(root)) == [["diffalign.a", "diffalign.b", "diffalign.a"]]


GUARDS = ["from typing import TYPE_CHECKING\nif TYPE_CHECKING:", "import typing\nif typing.TYPE_CHECKING:"]


@pytest.mark.parametrize("guard", GUARDS)
def test_type_checking_import_is_no_edge(tmp_path: Path, guard: str) -> None:
    root = _tree(tmp_path, {
        "platform/diffalign/a.py": "import diffalign.b\n",
        "platform/diffalign/b.py": f"{guard}\n    from diffalign.a import X\nelse:\n    import json\n",
    })
    graph = ig.build_graph(root)
    assert graph["diffalign.b"] == set()
    assert ig.find_cycles(graph) == []


def test_else_of_type_checking_still_counts(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "platform/diffalign/a.py": "",
        "platform/diffalign/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    pass\n"
        "else:\n    from diffalign import a\n",
    })
    assert ig.build_graph(root)["diffalign.b"] == {"diffalign.a"}


def test_relative_imports_resolve(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "platform/diffalign/pkg/__init__.py": "from .y import f\n",
        "platform/diffalign/pkg/x.py": "VALUE = 1\n",
        "platform/diffalign/pkg/y.py": "from . import x\nfrom .. import top\n\ndef f():\n    return x\n",
        "platform/diffalign/top.py": "from diffalign.pkg import VALUE\n",
    })
    graph = ig.build_graph(root)
    assert graph["diffalign.pkg"] == {"diffalign.pkg.y"}
    assert graph["diffalign.pkg.y"] == {"diffalign.pkg.x", "diffalign.top"}
    # A name of the package, not a submodule: the edge goes to the package (and no further).
    assert graph["diffalign.top"] == {"diffalign.pkg"}


def test_lazy_where_and_actors_mapping(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "platform/diffalign/m/__init__.py": (
            "import importlib\n_WHERE = {'A': 'one', 'B': 'sub.two'}\n\n"
            "def __getattr__(name):\n    return importlib.import_module(f'diffalign.m.{_WHERE[name]}')\n"
        ),
        "platform/diffalign/m/one.py": "",
        "platform/diffalign/m/sub/__init__.py": "",
        "platform/diffalign/m/sub/two.py": "",
        "actors/__init__.py": "",
        "actors/learner.py": "from diffalign.m import one\nfrom .ref import R\n",
        "actors/ref.py": "import ray\n",
    })
    graph = ig.build_graph(root)
    assert graph["diffalign.m"] == {"diffalign.m.one", "diffalign.m.sub.two"}
    assert graph["diffalign.actors.learner"] == {"diffalign.m.one", "diffalign.actors.ref"}
    assert ig.package_graph(graph) == {
        "diffalign": set(), "diffalign.actors": {"diffalign.m"}, "diffalign.m": set(),
    }
    assert (1, "ray") in ig.raw_imports(root / "actors" / "ref.py")


def test_layers_and_package_cycles() -> None:
    pkgs = {"d.a": set(), "d.b": {"d.a"}, "d.c": {"d.b", "d.a"}, "d.x": {"d.y"}, "d.y": {"d.x", "d.a"}}
    assert ig.layers(pkgs) == [["d.a"], ["d.b", "d.x", "d.y"], ["d.c"]]
    assert ig.find_cycles(pkgs) == [["d.x", "d.y", "d.x"]]
