"""partition_stages: contiguous stages, embedding first and head last, balanced by per-layer time
(not layer count) within each stage's budgets; pinned splits; bad input refused with the key."""
from __future__ import annotations

from dataclasses import replace

import pytest

from graphgen.build import build_graph
from graphgen.config import ParallelConfig
from graphgen.models import build_spec, hf_config_from_arch
from passes import PassError, run_pipeline
from passes.partition_stages import balanced

from .graphs import config

# 4 decoder layers: embed, 4 x (attn, mlp), head = 10 layers; the head (vocab 512) outweighs a layer
ARCH = {"model_type": "opt", "vocab_size": 512, "hidden_size": 32, "num_hidden_layers": 4, "ffn_dim": 64,
        "num_attention_heads": 4, "max_position_embeddings": 64, "word_embed_proj_dim": 32}


def staged(stages, names=("partition_stages",), batches=2, stage_layers=(), stage_budgets=(), **knobs):
    """(graph after `names` (None: the whole pipeline), cfg) for ARCH in `stages` stages."""
    cfg = replace(config(**knobs), parallel=ParallelConfig(stages=stages, stage_layers=list(stage_layers),
                                                           stage_budgets=list(stage_budgets)))
    g = build_graph(build_spec(hf_config_from_arch(ARCH)), batch=2, num_batches=batches, prompt_len=4, gen_len=3)
    return run_pipeline(g, cfg, None if names is None else list(names)), cfg


def test_one_stage_changes_nothing():
    g, _ = staged(1)
    assert g.graph["stage_layers"] == [10] and "stage" not in g.nodes[(0, 0, 0)]


def test_stages_are_contiguous_with_embedding_first_and_head_last():
    g, _ = staged(3)
    of = g.graph["stage_of_layer"]
    assert of == sorted(of) and of[0] == 0 and of[-1] == 2 and set(of) == {0, 1, 2}
    assert all(g.nodes[n]["stage"] == of[n[1]] for n in g.nodes)


def test_balanced_by_time_not_layer_count():
    """The head's matmul costs more than several decoder layers: the last stage gets fewer layers."""
    g, _ = staged(2)
    first, last = g.graph["stage_layers"]
    assert first > last


def test_balanced_split_minimises_the_slowest_stage():
    budgets = [{"device": 100, "host": 0, "disk": 0}] * 2
    assert balanced([1, 1, 1, 1, 4], None, budgets) == [4, 1]
    assert balanced([3, 1, 1, 1, 1], None, budgets) == [1, 4]


def test_split_keeps_each_stage_within_its_budgets():
    """Stage 1 holds 3 bytes: the fastest split (2 / 2) does not fit, 3 / 1 does."""
    nbytes = [{"device": 2, "host": 0, "disk": 0}] * 4
    small = [{"device": 100, "host": 0, "disk": 0}, {"device": 3, "host": 0, "disk": 0}]
    assert balanced([1, 1, 1, 1], nbytes, small) == [3, 1]
    assert balanced([1, 1, 1, 1], nbytes, [{"device": 3, "host": 0, "disk": 0}] * 2) is None


def test_a_stage_keeps_room_for_its_largest_transient():
    """Workspace and activations while a layer computes count once per stage (its largest), not summed."""
    nbytes = [{"device": 1, "host": 0, "disk": 0, "transient": 2}] * 4
    room = lambda n: {"device": n, "host": 0, "disk": 0}  # noqa: E731
    assert balanced([1, 1, 1, 1], nbytes, [room(100), room(3)]) == [3, 1]  # 1 + 2 on stage 1
    assert balanced([1, 1, 1, 1], nbytes, [room(4), room(4)]) == [2, 2]  # 2 + 2 each, not 2 + 4
    assert balanced([1, 1, 1, 1], nbytes, [room(3), room(3)]) is None


def test_stage_layers_pins_the_split():
    g, _ = staged(2, stage_layers=[5, 5])
    assert g.graph["stage_layers"] == [5, 5]


@pytest.mark.parametrize("stages,layers,key", [
    (11, (), "parallel.stages"),
    (2, [9, 2], "parallel.stage_layers"),
    (2, [10, 0], "parallel.stage_layers"),
])
def test_bad_splits_are_refused_with_the_key(stages, layers, key):
    with pytest.raises(PassError, match=key.replace(".", r"\.")):
        staged(stages, stage_layers=layers)


def test_a_stage_over_its_budget_is_refused_naming_it():
    """Stage 1's budget holds a tenth of what its pinned share needs."""
    with pytest.raises(PassError, match=r"pipeline stage 1 .*hardware\.device_mem") as e:
        staged(2, names=None, stage_layers=[5, 5], stage_budgets=[{}, {"device_mem": 20000}])
    assert "parallel.stage_budgets" in str(e.value)
