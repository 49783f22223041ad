"""Run by tests/executors/test_distributed.py under torchrun: every case of a JSON file through
graphgen's Python API in one process group; rank 0 saves the tokens of each case."""
from __future__ import annotations

import json
import sys

import torch

from graphgen import LLM, distributed


def main(cases_file: str, out_file: str) -> None:
    cases = json.loads(open(cases_file).read())
    out = {}
    for c in cases:
        ids, mask = torch.tensor(c["ids"]), torch.tensor(c["mask"])
        with LLM(c["ckpt"], c["overrides"]) as llm:
            out[c["name"]] = llm.generate(ids, attention_mask=mask, max_new_tokens=c["gen"], do_sample=c["sample"],
                                          top_k=c.get("top_k", 0), seed=c.get("seed"))
            out[c["name"] + "/stage_layers"] = llm.graph.graph["stage_layers"]
    if distributed.is_reporter():
        torch.save(out, out_file)
    distributed.teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
