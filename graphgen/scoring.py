"""Log-likelihood scoring through the compiled graph (LLM.score, score_tokens, score_rolling).

A scored sequence runs as a prefill-only block (gen_len=1: only the prompt squares) whose head
square also scores every position that has a target (BlockShape.score; the executor keeps log
p(target) and "target is the argmax" per position, a chunk of logits at a time). Placement,
offloading and compression are the run's, as for generation. Pairs are tokenised and truncated
as lm-evaluation-harness does for its `hf` backend, so the numbers compare one to one.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

import torch

from .sampling import Sampling

Pair = Tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)
LENGTH_STEP = 16  # a block's length is rounded up to this: fewer distinct shapes to compile


def prefix_token(tokenizer: Any) -> int:
    """What an empty context becomes: bos, else eos (lm-eval's prefix_token_id)."""
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise ValueError("scoring needs a bos or eos token for empty contexts; this tokenizer has neither")
    return tid


def encode(tokenizer: Any, text: str) -> List[int]:
    """The tokenizer's own special tokens, unless the text already starts with the prefix token's text."""
    starts = text.startswith(tokenizer.decode(prefix_token(tokenizer)))
    return tokenizer.encode(text, add_special_tokens=False) if starts else tokenizer.encode(text)


def encode_pair(tokenizer: Any, context: str, continuation: str) -> Pair:
    """lm-eval's split: trailing spaces of the context move to the continuation; the continuation's
    tokens are what tokenising context + continuation adds to the context's tokens."""
    if context == "":
        return [prefix_token(tokenizer)], encode(tokenizer, continuation)
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = encode(tokenizer, context + continuation), encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def rolling_windows(ids: Sequence[int], prefix: int, max_len: int) -> List[Pair]:
    """A long text -> disjoint (context, continuation) windows of at most max_len tokens that score
    every token once (lm-eval's loglikelihood_rolling)."""
    from lm_eval import utils  # optional dependency (the eval extra): its own window definition

    return [tuple(map(list, utils.make_disjoint_window(w)))
            for w in utils.get_rolling_token_windows(token_list=list(ids), prefix_token=prefix,
                                                     max_seq_len=max_len, context_len=1)]


def score_tokens(llm: Any, pairs: Sequence[Pair], max_len: Optional[int] = None) -> List[Tuple[float, bool]]:
    """(context ids, continuation ids) -> (sum of log p(continuation), is it the greedy continuation).
    The last max_len tokens of context + continuation are fed (lm-eval's truncation)."""
    max_len = max_len or llm.spec.max_positions
    rows = []
    for n, (ctx, cont) in enumerate(pairs):
        if not cont:
            raise ValueError(f"pair {n}: the continuation has no tokens; there is nothing to score")
        if len(cont) > max_len:
            raise ValueError(f"pair {n}: the continuation has {len(cont)} tokens, more than the "
                             f"{max_len} the model sees at once; use score_rolling for long texts")
        whole = (list(ctx) + list(cont))[-(max_len + 1):]
        rows.append((whole[:-1], len(cont), list(cont)))
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][0]))  # similar lengths share a block
    out: List[Optional[Tuple[float, bool]]] = [None] * len(rows)
    block = llm.cfg.policy.gpu_batch_size * llm.cfg.policy.num_gpu_batches
    for b in range(0, len(order), block):
        part = order[b:b + block]
        for r, res in zip(part, _score_block(llm, [rows[r] for r in part], max_len)):
            out[r] = res
    return out  # type: ignore[return-value]


def _score_block(llm: Any, rows, max_len: int) -> List[Tuple[float, bool]]:
    S = min(max_len, math.ceil(max(len(r[0]) for r in rows) / LENGTH_STEP) * LENGTH_STEP)
    spec = llm.spec
    pad = spec.pad_token_id if spec.pad_token_id is not None else (spec.eos_token_id or 0)
    ids = torch.full((len(rows), S), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    targets = torch.full_like(ids, -1)
    for b, (inp, n, cont) in enumerate(rows):  # left-padded; the continuation ends each row
        ids[b, S - len(inp):], mask[b, S - len(inp):] = torch.tensor(inp), 1
        targets[b, S - n:] = torch.tensor(cont)
    _, _, (lp, greedy) = llm._generate_ids(ids, mask, 1, Sampling(), targets=targets)
    return [(float(lp[b].double().sum()), bool(greedy[b].all())) for b in range(len(rows))]


def score(llm: Any, contexts: Sequence[str], continuations: Sequence[str]) -> List[Tuple[float, bool]]:
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations: give one of each per pair")
    tok = _tokenizer(llm)
    return score_tokens(llm, [encode_pair(tok, c, x) for c, x in zip(contexts, continuations)])


def score_rolling(llm: Any, texts: Sequence[str], max_len: Optional[int] = None) -> List[float]:
    tok = _tokenizer(llm)
    max_len = max_len or llm.spec.max_positions
    windows = [rolling_windows(encode(tok, t), prefix_token(tok), max_len) for t in texts]
    flat = score_tokens(llm, [w for ws in windows for w in ws], max_len)
    out, at = [], 0
    for ws in windows:
        out.append(sum(lp for lp, _ in flat[at:at + len(ws)]))
        at += len(ws)
    return out


def _tokenizer(llm: Any):
    if llm.tokenizer is None:
        raise ValueError("scoring text needs a tokenizer: this model has no checkpoint tokenizer (dummy "
                         "weights?); pass token ids to LLM.score_tokens instead")
    return llm.tokenizer
