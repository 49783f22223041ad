"""Completion example (FlexGen's apps/completion.py): a few prompts, sampled, printed.

    python -m graphgen.apps.completion                       # the default model (SmolLM2-135M-Instruct)
    python -m graphgen.apps.completion --model /path/to/opt-1.3b policy=host-offload
    python -m graphgen.apps.completion --prompt "Paris is the capital of" --stop . --max-new-tokens 16

Trailing words are Hydra overrides for the LLM config (model.dtype=float32, schedule=row, ...).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, List, Optional, Sequence

from graphgen.api import LLM
from graphgen.apps.batch import left_pad
from graphgen.stopping import Completion, finish

# FlexGen's example prompts: few-shot question answering and extraction
PROMPTS = [
    "Question: Where were the 2004 Olympics held?\n"
    "Answer: Athens, Greece\n"
    "Question: What is the longest river on the earth?\n"
    "Answer:",

    "Extract the airport codes from this text.\n"
    "Text: \"I want a flight from New York to San Francisco.\"\n"
    "Airport codes: JFK, SFO.\n"
    "Text: \"I want you to book a flight from Phoenix to Las Vegas.\"\n"
    "Airport codes:",
]


def complete(llm: Any, prompts: Sequence[str], *, max_new_tokens: int = 32, do_sample: bool = True,
             temperature: float = 0.7, top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = 0,
             stop: Sequence[str] = ("\n",)) -> List[Completion]:
    """Prompts -> completions (one generate call, left-padded), cut at eos or a stop string."""
    tok = llm.tokenizer
    rows = [list(r) for r in tok(list(prompts))["input_ids"]]
    for i, r in enumerate(rows):
        if len(r) + max_new_tokens > llm.spec.max_positions:
            raise ValueError(f"prompt {i + 1} is {len(r)} tokens + {max_new_tokens} new tokens > the model's "
                             f"{llm.spec.max_positions} positions: shorten it or lower --max-new-tokens")
    eos, pad = llm.spec.eos_token_id, llm.spec.pad_token_id
    input_ids, mask = left_pad(rows, pad if pad is not None else (eos or 0))
    out = llm.generate(input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                       temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    new = out[:, input_ids.shape[1]:]  # (B, max_new_tokens)
    return [finish(tok, r, new[b].tolist(), eos_token_id=eos, stop=stop) for b, r in enumerate(rows)]


def show(prompts: Sequence[str], completions: Sequence[Completion], seconds: float) -> None:
    bar = "-" * 70
    bold, end = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")
    for p, c in zip(prompts, completions):
        print(f"{bar}\n{p}{bold}{c.text}{end}  [{c.finish_reason}, {len(c.token_ids)} tokens]")
    n = sum(len(c.token_ids) for c in completions)
    print(f"{bar}\n{len(completions)} completions, {n} tokens in {seconds:.2f} s")


def token_ids_demo(llm: Any, args: argparse.Namespace) -> List[Completion]:
    """No tokenizer at hand (e.g. dummy weights): generate from fixed token ids and print ids."""
    import torch

    print(f"no tokenizer found for {args.model}: showing token ids. For text, point --model (or "
          "model.path=...) at a checkpoint directory with tokenizer files.", file=sys.stderr)
    input_ids = torch.arange(2, 2 + 2 * 8).view(2, 8) % llm.spec.vocab_size  # two synthetic prompts
    out = llm.generate(input_ids, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                       temperature=args.temperature if args.temperature > 0 else 1.0, seed=args.seed)
    for row in out.tolist():
        print(f"{row[:8]} -> {row[8:]}")
    return []


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m graphgen.apps.completion", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="config name (conf/model/), a local HF checkpoint dir or a "
                    ".gguf file (default: the default model of conf/config.yaml)")
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable); default: FlexGen's two examples")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop", action="append", help="stop string (repeatable); default: newline")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. policy=host-offload model.dtype=float32")
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None, llm: Any = None) -> List[Completion]:
    args = parse_args(argv)
    if llm is None:
        try:
            llm = LLM(args.model, overrides=list(args.overrides))
        except ValueError as e:  # a --model that is neither a checkpoint nor a model name
            raise SystemExit(f"completion: {e}") from None
    if llm.tokenizer is None:
        return token_ids_demo(llm, args)
    prompts = args.prompt or PROMPTS
    t0 = time.perf_counter()
    try:
        out = complete(llm, prompts, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                       temperature=args.temperature if args.temperature > 0 else 1.0, top_k=args.top_k,
                       top_p=args.top_p, seed=args.seed, stop=args.stop if args.stop is not None else ["\n"])
    except ValueError as e:  # a prompt too long, a bad sampling setting: say it, no traceback
        raise SystemExit(f"completion: {e}") from None
    show(prompts, out, time.perf_counter() - t0)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
