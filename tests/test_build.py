"""graphgen/build.py: squares (token, layer, batch) and their dependency edges."""
from graphgen.build import build_graph, squares

from .passes.graphs import tiny_spec


def test_graph_shape_and_edges():
    g = build_graph(tiny_spec(), batch=2, num_batches=4, prompt_len=4, gen_len=3)
    assert len(list(squares(g))) == 3 * 4 * 4
    deps = {d for _, _, d in g.edges(data="dep")}
    assert deps == {"act", "kv", "token"}
    assert g.edges[(0, 3, 1), (1, 0, 1)]["dep"] == "token"
    assert g.edges[(0, 1, 2), (1, 1, 2)]["dep"] == "kv"
    assert g.nodes[(0, 1, 0)]["s"] == 4 and g.nodes[(2, 1, 0)]["ctx"] == 6
