"""Accuracy of a lossy policy (compression) against a reference run, through the real engine.

Teacher forcing: every run is fed the same tokens (the reference's greedy choices), so each
step's next-token distribution is compared under the same context, not after a divergence:
    top-1 agreement: fraction of (prompt, step) whose argmax is unchanged;
    mean KL(ref || run) of the next-token distributions, in nats.
The executor's sample() is wrapped for the call (see forced_logits): it records the logits
and appends the forced token instead of the sampled one. Decode steps read the KV cache, so
cache compression is measured too.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F


@torch.no_grad()
def forced_logits(llm, ids: torch.Tensor, mask: torch.Tensor, gen_len: int,
                  forced: Optional[torch.Tensor] = None):
    """(logits [B, gen_len, V] float32, tokens fed back [B, gen_len]) of llm on left-padded
    ids [B, S]; forced [B, gen_len]: the tokens to feed back (None: its own greedy choices)."""
    B = ids.shape[0]
    ex = llm._executor()
    gbs = min(llm.cfg.policy.gpu_batch_size, B)
    block = gbs * min(llm.cfg.policy.num_gpu_batches, -(-B // gbs))
    rows: Dict = {}  # (row, step) -> (logits, token fed back)
    plain = ex.sample

    def sample(n, logits):
        i, _, k = n
        st = ex.state
        first = st.inputs.block * block + k * gbs
        plain(n, logits)
        if forced is not None:
            want = forced[first:first + logits.shape[0], i]
            if len(want) < logits.shape[0]:  # the padded tail of the last block
                want = torch.cat([want, st.tokens[k][-1][len(want):]])
            st.tokens[k][-1] = want.to(st.tokens[k][-1])
        for r in range(logits.shape[0]):
            rows[(first + r, i)] = (logits[r].float().cpu(), int(st.tokens[k][-1][r]))

    ex.sample = sample
    try:
        llm.generate(ids, attention_mask=mask, max_new_tokens=gen_len)
    finally:
        del ex.sample  # back to the class's method
    logits = torch.stack([torch.stack([rows[(r, i)][0] for i in range(gen_len)]) for r in range(B)])
    return logits, torch.tensor([[rows[(r, i)][1] for i in range(gen_len)] for r in range(B)])


def agreement(ref: torch.Tensor, logits: torch.Tensor) -> Dict[str, float]:
    """top-1 agreement and mean KL(ref || logits) (nats) over all leading positions; [..., V]."""
    lp, lq = F.log_softmax(ref.float(), -1), F.log_softmax(logits.float(), -1)
    return {"top1": (ref.argmax(-1) == logits.argmax(-1)).float().mean().item(),
            "kl": (lp.exp() * (lp - lq)).sum(-1).mean().item()}
