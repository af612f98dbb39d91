"""The import graph of ecsnap (shared/DESIGN.md, "Layers"): no module reaches itself, the
domain uses the standard library only. The other layer rules are the import-linter
contracts in pyproject.toml, run by `make lint` (lint-imports); its own cycle contract,
acyclic_siblings, does not see a package's `__init__` and one of its modules importing
each other, and does not name the chain.

The graph is grimp's, as lint-imports sees it: imports inside functions count, imports under
`if TYPE_CHECKING:` do not.
"""

from __future__ import annotations

import sys
from collections import deque
from itertools import pairwise

import grimp
import pytest

LAYERS = ["domain", "service", "adapters", "entrypoints"]


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    # cache_dir=None: no .grimp_cache left in the work tree (a build takes ~0.1 s)
    return grimp.build_graph("ecsnap", exclude_type_checking_imports=True, cache_dir=None)


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Every module that reaches itself, as its shortest chain [m, ..., m]; a cycle found
    from several of its modules is given once, starting at its smallest module name."""
    cycles: set[tuple[str, ...]] = set()
    for start in graph.modules:
        # breadth-first from what `start` imports, back to `start`
        came_from: dict[str, str] = {}
        queue = deque([start])
        while queue:
            module = queue.popleft()
            for imported in sorted(graph.find_modules_directly_imported_by(module)):
                if imported == start:
                    chain = [module]
                    while chain[-1] != start:
                        chain.append(came_from[chain[-1]])
                    chain.reverse()
                    low = chain.index(min(chain))
                    cycles.add(tuple(chain[low:] + chain[:low]))
                    queue.clear()
                    break
                if imported not in came_from:
                    came_from[imported] = module
                    queue.append(imported)
    return [[*cycle, cycle[0]] for cycle in sorted(cycles)]


def describe(graph: grimp.ImportGraph, chain: list[str]) -> str:
    """`a (line 12) -> b (line 3) -> a`: the line of each module that imports the next."""
    links = []
    for importer, imported in pairwise(chain):
        lines = sorted({d["line_number"] for d in graph.get_import_details(
            importer=importer, imported=imported)})
        links.append(f"{importer} (line {', '.join(map(str, lines))})")
    return " -> ".join([*links, chain[-1]])


def layer_of(cycle: list[str]) -> str | None:
    """The top-level package of ecsnap that holds the whole cycle, if one does."""
    tops = {module.split(".")[1] if module.count(".") else "" for module in cycle}
    return tops.pop() if len(tops) == 1 else None


def failure(graph: grimp.ImportGraph, cycles: list[list[str]], shown: int = 20) -> str:
    lines = [f"  {describe(graph, c)}" for c in cycles[:shown]]
    if len(cycles) > shown:
        lines.append(f"  ... and {len(cycles) - shown} more")
    return "import cycles:\n" + "\n".join(lines)


@pytest.mark.parametrize("layer", LAYERS)
def test_no_import_cycle_within(graph: grimp.ImportGraph, layer: str) -> None:
    cycles = [c for c in import_cycles(graph) if layer_of(c) == layer]
    assert not cycles, failure(graph, cycles)


def test_no_import_cycle_across_layers_or_elsewhere(graph: grimp.ImportGraph) -> None:
    cycles = [c for c in import_cycles(graph) if layer_of(c) not in LAYERS]
    assert not cycles, failure(graph, cycles)


def test_a_cycle_is_found_and_named() -> None:
    graph = grimp.ImportGraph()
    for importer, imported, line in [("pkg.b", "pkg.c", 5), ("pkg.c", "pkg.a", 7),
                                     ("pkg.a", "pkg.b", 3), ("pkg.c", "pkg.d", 8),
                                     ("pkg", "pkg.d", 1), ("pkg.d", "pkg", 2)]:
        graph.add_import(importer=importer, imported=imported, line_number=line,
                         line_contents=f"import {imported}")
    cycles = import_cycles(graph)
    # a package and its own module count too (lint-imports' acyclic_siblings misses those)
    assert cycles == [["pkg", "pkg.d", "pkg"], ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    assert describe(graph, cycles[1]) == "pkg.a (line 3) -> pkg.b (line 5) -> pkg.c (line 7) " \
                                         "-> pkg.a"


def test_domain_imports_the_standard_library_only() -> None:
    graph = grimp.build_graph("ecsnap", include_external_packages=True,
                              exclude_type_checking_imports=True, cache_dir=None)
    domain = {"ecsnap.domain", *graph.find_descendants("ecsnap.domain")}
    outside = {f"{module} imports {imported}" for module in domain
               for imported in graph.find_modules_directly_imported_by(module)
               if imported.split(".")[0] not in {"ecsnap", *sys.stdlib_module_names}}
    assert not outside, sorted(outside)

