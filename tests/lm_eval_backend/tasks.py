"""Offline lm-eval tasks from local JSONL files: multiple choice, generate_until, rolling log-likelihood."""
from __future__ import annotations

import json
from pathlib import Path

MC = [{"question": q, "choices": c, "answer": a} for q, c, a in [
    ("The sky is", [" blue", " green", " loud"], 0), ("Two plus two is", [" four", " five"], 0),
    ("Cats say", [" meow", " woof", " moo", " quack"], 0), ("Ice is", [" cold", " hot"], 0),
    ("The sun rises in the", [" east", " west"], 0), ("Fish live in", [" water", " trees", " sand"], 0)]]
GEN = [{"question": q, "answer": a} for q, a in [
    ("Q: What is the capital of France?\nA:", "Paris"), ("Q: 2+2=?\nA:", "4"), ("Q: Say hi.\nA:", "hi"),
    ("Q: Color of grass?\nA:", "green"), ("Q: Opposite of up?\nA:", "down")]]
TEXT = [{"text": "It was the best of times, it was the worst of times, it was the age of wisdom, it was "
                 "the age of foolishness, it was the epoch of belief, it was the epoch of incredulity."},
        {"text": "Call me Ishmael. Some years ago, never mind how long precisely, having little money."}]

YAML = {
    "gg_mc": """task: gg_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "gg_gen": """task: gg_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: " {{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
""",
    "gg_text": """task: gg_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
}
DATA = {"gg_mc": MC, "gg_gen": GEN, "gg_text": TEXT}


def write_tasks(folder: Path) -> Path:
    """The three tasks' JSONL + YAML in folder (absolute data paths): pass it as include_path."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in DATA.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"{name}.yaml").write_text(YAML[name].format(data=data))
    return folder
