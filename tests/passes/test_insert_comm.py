"""insert_comm: a send / recv pair on every edge between stages (activations forward, token ids
back), in the flat schedule after the producer and before the consumer; the per-stage memory plan
counts a received activation on the receiver's device; pipelined orders are topological."""
from __future__ import annotations

import pytest

from .test_partition_stages import staged


def comm(g):
    return [m for m in g.graph["ops"] if g.nodes[m].get("op") in ("send", "recv")]


def test_one_stage_has_no_communication():
    g, _ = staged(1, names=None)
    assert comm(g) == []


@pytest.mark.parametrize("schedule", ["zigzag", "row"])
def test_every_crossing_edge_gets_a_send_and_a_recv(schedule):
    g, _ = staged(3, names=None, stage_layers=[3, 4, 3], schedule=schedule)
    ops = g.graph["ops"]
    pos = {m: t for t, m in enumerate(ops)}
    n_tok, nb = 3, 2
    acts = [m for m in comm(g) if m[:2] == ("send", "act")]
    toks = [m for m in comm(g) if m[:2] == ("send", "tok")]
    assert len(acts) == 2 * n_tok * nb and {m[3] for m in acts} == {2, 6}  # out of layers 2 and 6
    assert len(toks) == (n_tok - 1) * nb and {m[3] for m in toks} == {9}  # head -> next step's embedding
    for send in acts + toks:
        recv = ("recv",) + send[1:]
        a, b = g.nodes[send], g.nodes[recv]
        assert (a["stage"], a["peer"]) == (b["peer"], b["stage"]) and a["tag"] == b["tag"]
        assert pos[a["square"]] < pos[send] < pos[recv] < pos[b["square"]]
    assert len({g.nodes[m]["tag"] for m in acts + toks}) == len(acts + toks)


def test_every_op_runs_on_one_stage():
    g, _ = staged(2, names=None, percent=[0, 100, 0, 100, 0, 100])
    assert all(g.nodes[m]["stage"] in (0, 1) for m in g.graph["ops"])
    assert g.graph["stage_peak_bytes"][0]["host"] > 0 and g.graph["stage_peak_bytes"][1]["host"] > 0


def test_sent_activation_stays_on_the_device():
    g, _ = staged(2, names=None, stage_layers=[5, 5], percent=[100, 0, 100, 0, 0, 100])
    assert g.nodes[(0, 4, 0)]["act_home"] == "device" and g.nodes[(0, 3, 0)]["act_home"] == "host"
    assert ("recv", "act", 0, 4, 0) in g.graph["ops"] and ("load", "act", 0, 4, 0) not in g.graph["ops"]


def test_pipelined_zigzag_orders_micro_batches_within_a_step():
    """2 stages, 4 GPU batches = 2 micro-batches of 2: step 0 runs micro-batch 0 through every layer
    (layer by layer, its 2 GPU batches together), then micro-batch 1."""
    g, _ = staged(2, names=["partition_stages", "order"], batches=4)
    seq = sorted((n for n in g.nodes if n[0] == 0), key=lambda n: g.nodes[n]["order"])
    assert [n[2] for n in seq[:4]] == [0, 1, 0, 1] and {n[2] for n in seq[:20]} == {0, 1}
