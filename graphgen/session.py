"""Chat sessions: each turn prefills only its new tokens against the KV cache kept from
earlier turns (FlexGen's chatbot re-encoded the whole history every turn).

The cache lives in the tiers like any block's (placement, budgets and CPU attention apply);
a turn is a graph whose squares start at past_len with a cache of max_context positions.
Tokens generated after a turn's cut (eos or a stop) stay in the cache but are masked out.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

from executors import BlockInputs

from .inputs import check_max_new_tokens, check_vocab
from .sampling import Sampling


class ContextFull(ValueError):
    """A turn would overflow the session's cache: nothing was generated."""


class ChatSession:
    def __init__(self, llm, max_context: Optional[int] = None):
        if llm.session is not None:
            raise RuntimeError("this LLM already has an open chat session: close it first")
        self.llm, self.spec = llm, llm.spec
        self.cache_len = min(max_context or self.spec.max_positions, self.spec.max_positions)
        self.mask = torch.zeros(1, 0, dtype=torch.long)  # cache slots so far: 1 = in the context
        self.pending: List[int] = []  # the last generated token, not yet in the cache
        self.ex = llm._executor()
        self.ex.keep_cache = True
        self.closed = False
        llm.session = self

    @property
    def context_len(self) -> int:
        return int(self.mask.sum()) + len(self.pending)

    def send(self, ids: Sequence[int], max_new_tokens: int = 32, sampling: Sampling = Sampling(),
             cut: Optional[Callable[[List[int]], int]] = None) -> List[int]:
        """Append ids to the conversation and generate; returns the reply's tokens up to the cut
        (default: through the first eos)."""
        if self.closed:
            raise RuntimeError("this chat session is closed (its cache was dropped): start a new one with llm.chat()")
        check_max_new_tokens(max_new_tokens)
        ids = list(ids)
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"send() needs a non-empty list of integer token ids, got {ids[:8]!r}")
        check_vocab(torch.tensor(ids), self.spec.vocab_size, "ids")
        new = self.pending + ids
        past, S = self.mask.shape[1], len(new)
        if past + S + max_new_tokens > self.cache_len:
            raise ContextFull(f"the conversation needs {past + S + max_new_tokens} cache positions but the "
                              f"session holds {self.cache_len}: start a new session (llm.chat(max_context=...))")
        graph = self.llm.compile(S, max_new_tokens, 1, 1, past_len=past, cache_len=self.cache_len)
        mask = torch.cat([self.mask, torch.ones(1, S, dtype=torch.long)], 1)
        inp = BlockInputs(torch.tensor(new)[None, None], mask[None], sampling, 0)
        tokens = self.ex.run_block(graph, inp)[0, 0].tolist()  # [gen]
        keep = (cut or self._through_eos)(tokens)
        # the cache now holds the prompt and the first gen-1 generated tokens; the last one is pending
        written = max_new_tokens - 1
        kept = [1] * min(keep, written) + [0] * (written - min(keep, written))
        self.mask = torch.cat([mask, torch.tensor([kept], dtype=torch.long)], 1)
        self.pending = tokens[written:] if keep == max_new_tokens else []
        return tokens[:keep]

    def _through_eos(self, tokens: List[int]) -> int:
        eos = self.spec.eos_token_id
        return tokens.index(eos) + 1 if eos in tokens else len(tokens)

    def close(self) -> None:
        self.closed = True
        if self.llm.session is self:
            self.ex.keep_cache = False
            self.ex.drop_cache()
            self.llm.session = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
