"""passes/order.py: the traversal order is a sort key; zigzag and row on the paper's figure."""
import pytest

from passes import PassError

from .graphs import compiled, config, order_of


def test_zigzag_goes_layer_by_layer_across_batches():
    g, _ = compiled(config("zigzag"), names=["order"])
    assert order_of(g)[:6] == [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 0, 3), (0, 1, 0), (0, 1, 1)]


def test_row_runs_one_batch_through_everything():
    g, _ = compiled(config("row"), names=["order"])
    seq = order_of(g)
    assert seq[:5] == [(0, 0, 0), (0, 1, 0), (0, 2, 0), (0, 3, 0), (1, 0, 0)]
    assert seq[12] == (0, 0, 1)


def test_unknown_schedule_names_the_known_ones():
    with pytest.raises(PassError, match="known orders: row, zigzag"):
        compiled(config("diagonal"), names=["order"])
