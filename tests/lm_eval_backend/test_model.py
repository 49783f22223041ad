"""The lm-eval backend: on local tasks its scores and generations equal lm-eval's own `hf` backend
(float32, same checkpoint), fully offline; requests batch into graphgen's blocks."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402

from graphgen.lm_eval.model import GraphgenLM, overrides_of  # noqa: E402
from tests.fake_llm import make_llama_checkpoint  # noqa: E402
from tests.lm_eval_backend.tasks import write_tasks  # noqa: E402

TASKS = ["gg_mc", "gg_gen", "gg_text"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-eval")
    return make_llama_checkpoint(root / "ckpt"), write_tasks(root / "tasks")


def evaluate(model, model_args, tasks_dir, batch_size=3):
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=TASKS, batch_size=batch_size, device="cpu",
                                   task_manager=TaskManager(include_path=str(tasks_dir)), log_samples=True,
                                   random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)


def responses(res, task):
    return [s["filtered_resps"] for s in sorted(res["samples"][task], key=lambda s: s["doc_id"])]


def test_scores_and_generations_equal_the_hf_backend(setup):
    ckpt, tasks = setup
    hf = evaluate("hf", f"pretrained={ckpt},dtype=float32", tasks)
    gg = evaluate("graphgen", f"pretrained={ckpt},model.dtype=float32,policy.num_gpu_batches=2", tasks)
    for task in TASKS:
        for metric, want in hf["results"][task].items():
            if isinstance(want, float):
                assert gg["results"][task][metric] == pytest.approx(want, rel=1e-5, abs=1e-6), (task, metric)
    for got, want in zip(responses(gg, "gg_mc"), responses(hf, "gg_mc")):
        assert [g[1] for g in got] == [w[1] for w in want]  # is-greedy flags
        assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-4)
    assert responses(gg, "gg_gen") == responses(hf, "gg_gen")
    assert any(r[0] for r in responses(gg, "gg_gen"))  # something was generated
    assert [r[0] for r in responses(gg, "gg_text")] == pytest.approx([r[0] for r in responses(hf, "gg_text")],
                                                                      abs=1e-4)


def test_requests_run_in_graphgen_blocks(setup):
    ckpt, tasks = setup
    lm = GraphgenLM(str(ckpt), batch_size=4, **{"model.dtype": "float32", "policy.num_gpu_batches": 2})
    assert lm.llm.cfg.policy.gpu_batch_size == 4
    evaluate(lm, None, tasks)
    shapes = {key[2:4] for key in lm.llm._graphs}  # (gpu batch, GPU batches) of the compiled blocks
    assert shapes <= {(4, 2), (4, 1), (3, 1), (2, 1), (1, 1)} and (4, 2) in shapes


def test_model_args_become_graphgen_overrides():
    assert overrides_of({"policy.percent": [0, 100, 0, 100, 0, 100], "policy.cpu_attention": True,
                         "model.dtype": "float32"}) == ["policy.percent=[0,100,0,100,0,100]",
                                                        "policy.cpu_attention=true", "model.dtype=float32"]
