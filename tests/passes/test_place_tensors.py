"""passes/place_tensors.py: FlexGen's six percents, split by the midpoint rule."""
import pytest

from graphgen.build import squares
from passes import PassError
from passes.place_tensors import split

from .graphs import compiled, config


def test_split_matches_percents_by_midpoint():
    assert split([1] * 10, 30, 50) == ["device"] * 3 + ["host"] * 5 + ["disk"] * 2
    assert split([1, 1, 8], 50, 50) == ["device", "device", "host"]


def test_placement_follows_the_six_percents():
    g, _ = compiled(config(percent=[50, 50, 0, 50, 0, 0]), names=["order", "place_tensors"])
    kv = [g.nodes[(0, 1, k)]["kv_home"] for k in range(4)]
    assert kv == ["host", "host", "disk", "disk"]
    assert {g.nodes[n]["act_home"] for n in squares(g) if g.nodes[n]["kind"] != "head"} == {"disk"}
    assert g.nodes[(0, 0, 0)]["w_home"] == "device"  # the embedding is the first half of the bytes


def test_bad_percent_is_refused_naming_the_key():
    with pytest.raises(PassError, match="policy.percent"):
        compiled(config(percent=[80, 40, 0, 0, 0, 0]), names=["order", "place_tensors"])
