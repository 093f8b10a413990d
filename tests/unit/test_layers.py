"""moelib's import graph has no cycle (the layers themselves are checked by lint-imports, see .importlinter).

grimp (import-linter's graph library) reads every import statement, those inside functions included, so a
deferred import that closes a circle counts as one: the old model/recompute.py importing MLA, MLP, ...
inside apply_recompute while each of them imported recompute was such a cycle.
"""

import grimp
import pytest

PACKAGES = ("moelib", "moelib_cuda")


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph(*PACKAGES)


def cycles(graph) -> list[tuple[str, ...]]:
    """Every direct import a -> b for which b also reaches a, with the chain that closes the circle."""
    found = []
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if graph.chain_exists(importer=imported, imported=module):
                found.append((module,) + graph.find_shortest_chain(importer=imported, imported=module))
    return found


def test_no_import_cycle(graph):
    assert cycles(graph) == []


def test_a_circle_like_the_old_recompute_one_is_found(graph):
    graph.add_import(importer="moelib.model.recompute", imported="moelib.model.mla")
    try:
        assert ("moelib.model.recompute", "moelib.model.mla", "moelib.model.recompute") in cycles(graph)
    finally:
        graph.remove_import(importer="moelib.model.recompute", imported="moelib.model.mla")
    assert cycles(graph) == []
