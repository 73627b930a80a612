"""No import cycle among the modules of models/, a package's __init__ included.

import-linter's acyclic_siblings contract (pyproject) checks siblings; a submodule importing
its own package (`from models.backends import x` inside models/backends/) is a cycle through
the package's __init__ that it does not see, so this walks grimp's graph of every module.
"""

from __future__ import annotations

import grimp


def test_models_has_no_import_cycle_through_any_module():
    graph = grimp.build_graph("models")
    imports = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        path.append(module)
        for imported in sorted(imports.get(module, ())):
            if state.get(imported) == 1:
                cycles.append([*path[path.index(imported) :], imported])
            elif imported in imports and not state.get(imported):
                visit(imported, path)
        path.pop()
        state[module] = 2

    for module in sorted(imports):
        if not state.get(module):
            visit(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
